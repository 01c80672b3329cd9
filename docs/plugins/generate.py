"""The generated parts of the documentation, rendered from the code at build time.

A page asks for one with a marker line, ``<!-- generated: NAME [ARG] -->``, which ``hooks.py``
replaces when MkDocs builds the site; nothing generated is committed, so nothing can drift.

- ``settings``: every setting of ``service.settings.Settings`` (the source of ``--help`` too);
- ``http-api``: every HTTP endpoint and body from the app's OpenAPI document (no server needed);
- ``close-codes``: the websocket close codes of ``service.engine.errors.CLOSE_CODES``;
- ``cli COMMAND``: the ``--help`` of a command line (``service``, ``client``, ``training ...``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
HELP_WIDTH = "100"  # argparse wraps help text to $COLUMNS
# FastAPI declares its own 422 body on routes without one; the app answers every error, validation
# included, as ErrorBody (service/api/errors.py), so these are shown as ErrorBody and not listed.
FASTAPI_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")


def settings_table() -> str:
    """One section per setting, in declaration order, each with an anchor of its own name."""
    from service.settings import describe_settings

    sections = []
    for s in describe_settings():
        default = f"`{s.default}`" if s.default else "none"
        sections.append(
            f"## `{s.flag}` {{#{s.name}}}\n\n`{s.env}` · {s.kind} · default: {default}\n\n{s.doc}"
        )
    return "\n\n".join(sections)


def close_codes_table() -> str:
    from service.engine.errors import CLOSE_CODES

    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {code} | {_cell(text)} |" for code, text in sorted(CLOSE_CODES.items())]
    return "\n".join(rows)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of an app serving the shipped models (built, never started)."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(models_dir=ROOT / "models", providers=["CPUExecutionProvider"])
    document: dict[str, Any] = create_app(settings).openapi()
    return document


def http_api(document: dict[str, Any] | None = None) -> str:
    """Markdown for every operation of an OpenAPI document, grouped by tag, then its schemas."""
    document = document or openapi_document()
    by_tag: dict[str, list[str]] = {}
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                operation = item[method]
                tag = (operation.get("tags") or ["other"])[0]
                by_tag.setdefault(tag, []).append(_operation(method, path, operation))
    parts = []
    for tag, operations in by_tag.items():
        parts += [f"## {tag.capitalize()}", *operations]
    parts.append("## Schemas")
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        if name not in FASTAPI_ERROR_SCHEMAS:
            parts.append(_schema_section(name, schema))
    return "\n\n".join(parts)


def _operation(method: str, path: str, operation: dict[str, Any]) -> str:
    lines = [f"### `{method.upper()} {path}`", ""]
    if operation.get("description") or operation.get("summary"):
        lines += [_prose(operation.get("description") or operation["summary"]), ""]
    params = operation.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required |", "|---|---|---|---|"]
        lines += [
            f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))} | "
            f"{'yes' if p.get('required') else 'no'} |"
            for p in params
        ]
        lines.append("")
    body = operation.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        lines += [f"Request body ({media}): {_type(content.get('schema', {}))}", ""]
    lines += ["| status | answer |", "|---|---|"]
    errors = []
    for status, response in operation.get("responses", {}).items():
        schema = next(iter(response.get("content", {}).values()), {}).get("schema", {})
        if schema.get("$ref", "").rsplit("/", 1)[-1] in ("ErrorBody", *FASTAPI_ERROR_SCHEMAS):
            errors.append(status)
        else:
            lines.append(f"| {status} | {_type(schema) if schema else 'no content'} |")
    if errors:
        lines.append(
            f"| {', '.join(errors)} | [ErrorBody](#schema-errorbody), see [Errors](errors.md) |"
        )
    return "\n".join(lines)


def _schema_section(name: str, schema: dict[str, Any]) -> str:
    lines = [f"### {name} {{#schema-{name.lower()}}}", ""]
    if schema.get("description"):
        lines += [_prose(schema["description"]), ""]
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    if properties:
        lines += ["| field | type | required | description |", "|---|---|---|---|"]
        lines += [
            f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'} | "
            f"{_cell(spec.get('description', ''))} |"
            for field, spec in properties.items()
        ]
    else:
        lines.append(f"Type: {_type(schema)}.")
    for example in schema.get("examples", [])[:1]:
        lines += ["", "Example:", "", "```json", json.dumps(example), "```"]
    return "\n".join(lines)


def _type(schema: dict[str, Any]) -> str:
    """A short readable type: ``array of number``, links to schemas, ``X or null``."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " or ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return str(kind)


def _cell(text: str) -> str:
    """Text fit for one table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _prose(text: str) -> str:
    return " ".join(text.split())


def cli_help(*command: str) -> str:
    """``COMMAND --help`` as a code block; COMMAND is ``service``, ``client`` or ``training X``."""
    parser = _parser(*command)
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        text = parser.format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return f"```text\n{text.rstrip()}\n```"


def _parser(program: str, *sub: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser
    if program == "service":
        from service.__main__ import build_parser

        parser = build_parser()
    elif program == "client":
        from service.client.__main__ import build_parser as build_client_parser

        parser = build_client_parser()
    elif program == "training":
        from training.cli import make_parser

        parser = make_parser()
    else:
        raise ValueError(f"unknown command {program!r}: service, client or training")
    for name in sub:
        parser = _subparser(parser, name)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            chosen: argparse.ArgumentParser = action.choices[name]
            return chosen
    raise ValueError(f"{parser.prog} has no subcommand {name!r}")


GENERATORS: dict[str, Callable[..., str]] = {
    "settings": settings_table,
    "http-api": http_api,
    "close-codes": close_codes_table,
    "cli": cli_help,
}


def render(name: str, *args: str) -> str:
    """The markdown a ``<!-- generated: NAME ARGS -->`` marker stands for."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generated section {name!r}; known: {', '.join(GENERATORS)}")
    return GENERATORS[name](*args)
