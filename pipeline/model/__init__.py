"""Build time: Hugging Face model directory → versioned, validated ONNX artifact.

Serving code imports none of it (the manifest lives in ``pipeline/manifest.py``); ``export``, ``train`` and ``build`` need the
``train`` extra (torch, transformers, onnx).
"""

import importlib.util


def require_train(what: str) -> None:
    """Say plainly (no traceback) when a build-time command runs in a serving-only install."""
    missing = [m for m in ("torch", "transformers", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        from pipeline.errors import UsageError

        raise UsageError(f"{what} needs the train extra, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         "not installed here",
                         hint="pip install -e '.[train]' (or `make setup`); serving a built artifact needs none of it")
