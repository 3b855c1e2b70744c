"""``ModelManifest``: what an artifact is, read and verified at load (no torch needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import ModelError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
VARIANTS = ("fp32", "int8", "fp16", "int4")
# The provider each variant is meant for: INT8 dynamic quantization is a CPU technique, FP16 a GPU one.
DEFAULT_PROVIDER = {
    "fp32": "CPUExecutionProvider",
    "int8": "CPUExecutionProvider",
    "fp16": "CUDAExecutionProvider",
    "int4": "CPUExecutionProvider",  # generators: 4-bit weight-only (MatMulNBits)
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Variant:
    name: str
    file: str
    sha256: str
    bytes: int
    provider: str
    parity: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] | None = None
    throughput: dict[str, Any] | None = None
    note: str | None = None
    extra_files: dict[str, str] = field(default_factory=dict)  # more files this variant loads: path → sha256
    validated: bool = True  # False: not checked on the build machine (e.g. fp16 CUDA built on a CPU): never auto-chosen


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: int
    labels: tuple[str, ...]
    max_length: int
    inputs: tuple[str, ...]
    tokenizer_file: str
    tokenizer_sha256: str
    variants: dict[str, Variant]
    base_model: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    task: str = "text-classification"  # or "text-generation"
    generation: dict[str, Any] = field(default_factory=dict)  # generators: prompt format, eos ids, KV shapes, defaults
    schema_version: int = SCHEMA_VERSION

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)
        data["inputs"] = list(self.inputs)
        return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ModelManifest:
        try:
            variants = {k: Variant(**v) for k, v in data["variants"].items()}
            fields = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in data.items() if k in fields and k != "variants"}
            kwargs["labels"] = tuple(data["labels"])
            kwargs["inputs"] = tuple(data["inputs"])
            return cls(variants=variants, **kwargs)
        except (KeyError, TypeError) as exc:
            raise ModelError(
                f"manifest is incomplete or has an unknown shape ({exc})",
                where=where,
                hint="rebuild the artifact with `streamlabel model build`",
            ) from None

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            have = ", ".join(sorted(self.variants)) or "none"
            raise ModelError(
                f"artifact {self.model_id} has no '{name}' variant (it has: {have})",
                hint="pick one of those with --variant, or rebuild with that variant",
            )
        return self.variants[name]


def resolve_artifact_dir(path: str | Path) -> Path:
    """Accept a version directory (``models/sentiment-minilm/3``) or a name directory (highest version)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(
            "artifact directory does not exist",
            where=str(p),
            hint="build one with `streamlabel model build --preset sentiment-minilm --out models`",
        )
    if (p / MANIFEST).is_file():
        return p
    versions = [c for c in p.iterdir() if c.is_dir() and re.fullmatch(r"\d+", c.name) and (c / MANIFEST).is_file()]
    if not versions:
        raise ModelError(
            f"no {MANIFEST} here and no numbered version directories holding one",
            where=str(p),
            hint="point at an artifact built by `streamlabel model build` (e.g. models/sentiment-minilm)",
        )
    return max(versions, key=lambda c: int(c.name))


def load_manifest(path: str | Path, *, verify: bool = True, variants: tuple[str, ...] | None = None) -> tuple[Path, ModelManifest]:
    """Read an artifact's manifest; with ``verify`` check that its files exist and match their sha256."""
    root = resolve_artifact_dir(path)
    mpath = root / MANIFEST
    try:
        data = orjson.loads(mpath.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ModelError(f"manifest is not valid JSON ({exc})", where=str(mpath), hint="rebuild the artifact") from None
    if not isinstance(data, dict):
        raise ModelError("manifest is not a JSON object", where=str(mpath), hint="rebuild the artifact")
    manifest = ModelManifest.from_dict(data, str(mpath))
    if verify:
        checks = [(manifest.tokenizer_file, manifest.tokenizer_sha256)]
        for name, v in manifest.variants.items():
            if variants is None or name in variants:
                checks.append((v.file, v.sha256))
                checks.extend(v.extra_files.items())
        for rel, digest in checks:
            fpath = root / rel
            if not fpath.is_file():
                raise ModelError(
                    f"file '{rel}' named in the manifest is missing (incomplete copy?)",
                    where=str(root),
                    hint="copy the whole artifact directory again or rebuild it",
                )
            actual = sha256_file(fpath)
            if actual != digest:
                raise ModelError(
                    f"file '{rel}' is corrupt: sha256 {actual[:12]}… differs from the manifest's {digest[:12]}…",
                    where=str(root),
                    hint="copy the artifact again or rebuild it; never edit artifact files by hand",
                )
    return root, manifest
