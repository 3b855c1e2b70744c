"""mkdocs hook: the configuration reference, generated from ``pipeline.config.Settings`` at build time.

``docs/configuration.md`` holds a marker line, ``<!-- settings-reference -->``; this hook replaces it with one
table per section of ``Settings`` (``[kafka]``, ``[topics]``, …): each field's key, type (as written in the
source), default (from the dataclass) and explanation (the inline ``#`` comment on the field's line in
``pipeline/config.py``, read with ``tokenize``), under the section class's docstring if it has one. The
reference cannot drift from the code: a new field, a changed default or comment shows up on the next build.

The build fails (``PluginError``) when the marker is missing, when ``configuration.md`` is missing, or when a
field of ``Settings`` cannot be found in the source; a field without a comment gets an empty cell.

``pipeline.config`` needs only the standard library; it is imported from this repository (the directory of
``mkdocs.yml``), never from whatever ``pipeline`` another install puts on ``sys.path``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import sys
import tokenize
import typing
from pathlib import Path

from mkdocs.exceptions import PluginError

MARKER = "<!-- settings-reference -->"
PAGE = "configuration.md"

_root: Path | None = None


def on_config(config):
    global _root
    _root = Path(config.config_file_path).resolve().parent
    return config


def on_files(files, config):
    if files.get_file_from_path(PAGE) is None:
        raise PluginError(f"settings_reference: docs/{PAGE} is missing; it must hold the line {MARKER}")
    return files


def on_page_markdown(markdown: str, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    lines = markdown.splitlines()
    hits = [i for i, line in enumerate(lines) if line.strip() == MARKER]
    if len(hits) != 1:
        raise PluginError(f"settings_reference: docs/{PAGE} must hold the line {MARKER} exactly once "
                          f"(found {len(hits)}); the configuration reference is generated there")
    lines[hits[0]:hits[0] + 1] = reference().splitlines()
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- the reference
def _config_module():
    root = _root or Path(__file__).resolve().parents[2]
    source = root / "pipeline" / "config.py"
    if not source.is_file():
        raise PluginError(f"settings_reference: {source} not found")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        if not str(Path(getattr(sys.modules[name], "__file__", "") or "").resolve()).startswith(str(root)):
            del sys.modules[name]  # another checkout's package: read this repository's
    mod = importlib.import_module("pipeline.config")
    if Path(mod.__file__).resolve() != source.resolve():
        raise PluginError(f"settings_reference: imported {mod.__file__}, expected {source}")
    return mod, source


def _comments(text: str) -> dict[int, str]:
    """Line number → the text of the ``#`` comment on that line (inline or alone)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _field_lines(cls: ast.ClassDef, text: str) -> dict[str, tuple[int, str]]:
    """Field name → (line of its annotation, the annotation as written)."""
    out = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = (node.lineno, ast.get_source_segment(text, node.annotation) or "")
    return out


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _toml(value: object) -> str:
    """A default as it would be written in the TOML file."""
    if value is dataclasses.MISSING:
        return ""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    return f"`{value}`"


def _cell(text: str) -> str:
    """Text for a table cell: a ``|`` outside code spans would end the cell (inside them it is literal)."""
    parts = text.replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def reference() -> str:
    mod, source = _config_module()
    text = source.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(source))
    classes = _classes(tree)
    comments = _comments(text)
    settings = mod.Settings
    hints = typing.get_type_hints(settings)
    out: list[str] = []
    for section in dataclasses.fields(settings):
        cls = hints[section.name]
        node = classes.get(cls.__name__)
        if node is None:
            raise PluginError(f"settings_reference: class {cls.__name__} ([{section.name}]) not found in {source}")
        lines = _field_lines(node, text)
        out += [f"### `[{section.name}]`", ""]
        doc = ast.get_docstring(node)
        if doc:
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | explanation |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.name not in lines:
                raise PluginError(f"settings_reference: field {section.name}.{f.name} not found in {source}")
            lineno, annotation = lines[f.name]
            why = comments.get(lineno, "")
            kind = " ".join(annotation.split())
            out.append(f"| `{f.name}` | `{kind}` | {_cell(_toml(_default(f)))} | {_cell(why)} |")
        out.append("")
    return "\n".join(out)
