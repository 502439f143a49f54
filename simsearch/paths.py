"""The one spelling of a file path that simsearch stores, compares and prints.

Every entry point (indexer, scoring, benchmarks, CLI) passes user paths through `normalize`, so a
file reached as `../refs/a.jpg`, `./a.jpg` or `~/refs/a.jpg` is one row and one dictionary key.
Light on purpose: no third-party imports, so the CLI can check its inputs before loading torch.
"""

from __future__ import annotations

import os
from pathlib import Path

TABLE = "images"  # the LanceDB table of embedded images (see store.py)


def normalize(path: str | os.PathLike) -> str:
    """Absolute, `~` expanded, `.` and `..` folded. Symlinks are kept: a link is a file of its own."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def is_under(path: str, folder: str) -> bool:
    """Whether normalized `path` is `folder` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def database_exists(root: str | os.PathLike) -> bool:
    """Whether `root` holds a simsearch table, without importing LanceDB."""
    return (Path(root).expanduser() / f"{TABLE}.lance").is_dir()
