"""The `simsearch` command: parses arguments, calls the library, prints. No logic of its own.

One module per command group; the options they share are defined once in `_common`. Modules import
the library inside the command functions, so `simsearch --help` and input errors stay fast.
"""

from __future__ import annotations

import os
import sys

import typer

from . import bench, coseg, dedup, index, match, models, query, score, serve
from ._common import err, esc
from ._errors import cli_message
from ..errors import SimsearchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find images like this one (content) or in this style, on DINOv2 / DINO / SD descriptors.")
for command in (index.index, query.query, index.info, models.models, match.match, coseg.coseg, score.score,
                dedup.dedup, serve.serve):
    app.command()(command)
app.add_typer(bench.app, name="bench")


def _bare_rerank(argv: list[str]) -> list[str]:
    """`--rerank` without a name means the default reranker (Typer options always take a value)."""
    from ..rerank import DEFAULT_RERANKER

    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--rerank" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            argv.insert(i + 1, DEFAULT_RERANKER)
    return argv


def main() -> None:
    # Idle OpenMP workers sleep instead of spinning. On a machine whose cores are busy with other work,
    # spinning workers made one 224 px forward take 3.9 s instead of 0.22 s (2 cores, load 8, measured).
    # The console script gets here before torch loads its OpenMP runtime; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app(args=_bare_rerank(sys.argv[1:]))
    except SimsearchError as e:
        err.print(f"[red]error[/]: {esc(cli_message(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted: what was committed is kept; run the same command again to resume")
        sys.exit(130)
