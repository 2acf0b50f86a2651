"""The configuration reference (docs/reference/): one Markdown page per spec section, generated from the pydantic
models' fields, types, defaults and descriptions, so it cannot drift from what the specs accept.

    python -m chatforge.reference docs/reference      # write the pages
    python -m chatforge.reference --check docs/reference   # exit 1 when a page is stale

Nested models are listed under their own dotted key (``curate.dedup.near``), lists of models by their item fields
(``serve.variants[].weight``).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from chatforge.config import Spec

PAGES = {
    "ray": ("ray",),
    "curate": ("curate",),
    "train": ("model", "train", "deepspeed", "method", "lora", "scaling"),
    "tune": ("tune",),
    "eval": ("eval",),
    "serve": ("serve",),
    "loop": ("loop",),
    "tracking": ("tracking",),
}


PIPE = "\\|"  # a pipe inside a table cell


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """(the pydantic model inside ``annotation``, "" or "[]" when it is a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], "[]"
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0], ""
    return None, ""


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None").replace("chatforge.config.", "")


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [item.model_dump(mode="json") for item in value]
    return f"`{json.dumps(value, default=str)}`"


def rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every field of ``model`` under ``prefix``, nested models expanded."""
    found = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        nested, suffix = _model_of(field.annotation)
        description = (field.description or "").replace("|", PIPE).replace("\n", " ")
        if nested is not None:
            kind = f"list of {nested.__name__}" if suffix else nested.__name__
            found.append((key, kind, _default(field), description or (nested.__doc__ or "").split("\n")[0]))
            found += rows(nested, key + suffix)
        else:
            found.append((key, _type_name(field.annotation), _default(field), description))
    return found


def page(name: str) -> str:
    keys = PAGES[name]
    lines = [
        f"# Configuration reference: {', '.join(f'`{k}`' for k in keys)}",
        "",
        "Generated from `chatforge.config` by `python -m chatforge.reference docs/reference`; a test fails when it "
        "is stale. Set a key in a spec's YAML, or on the command line as `key.path=value`.",
        "",
        "| key | type | default | what |",
        "| --- | --- | --- | --- |",
    ]
    for key in keys:
        field = Spec.model_fields[key]
        nested, _ = _model_of(field.annotation)
        if nested is None:
            lines.append(
                f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |"
            )
            continue
        for row_key, kind, default, description in rows(nested, key):
            kind, default = kind.replace("|", "or"), default.replace("|", PIPE)
            lines.append(f"| `{row_key}` | {kind} | {default} | {description} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    index = ["# Configuration reference", "", "One page per spec section, generated from `chatforge.config`:", ""]
    index += [f"- [{name}]({name}.md): {', '.join(f'`{k}`' for k in keys)}" for name, keys in PAGES.items()]
    return {"README.md": "\n".join(index) + "\n", **{f"{name}.md": page(name) for name in PAGES}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 when a page differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for name, text in pages().items():
        path = args.directory / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m chatforge.reference {args.directory}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
