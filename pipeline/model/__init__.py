"""Build time: Hugging Face model directory → versioned, validated ONNX artifact.

Only ``manifest`` and ``data`` are imported by serving code; ``export``, ``train`` and ``build`` need the
``train`` extra (torch, transformers, onnx).
"""
