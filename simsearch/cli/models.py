"""`simsearch models`: the registry and what is present locally."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ._common import cell, note, out


def models(fetch: Annotated[bool, typer.Option(help="Download and convert the embedded default now.")] = False,
           as_json: Annotated[bool, typer.Option("--json")] = False):
    """Backbones simsearch knows, and whether their weights are present locally."""
    from ..backbones import DEFAULT_MODEL, MODELS, embedded, is_local

    if fetch:
        note(f"embedded model ready in {embedded.ensure_converted()}")
    rows = [{"name": c.name, "family": c.family, "source": c.source, "local": is_local(c.name),
             "default": c.name == DEFAULT_MODEL, "description": c.description} for c in MODELS.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="models (any hub id or local checkpoint directory works too)", title_justify="left")
    for col in ("name", "family", "source", "local", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(cell(name), r["family"], cell(r["source"]), "yes" if r["local"] else "no", cell(r["description"]))
    out.print(table)
