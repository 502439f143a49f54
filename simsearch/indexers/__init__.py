"""Turning folders (or streams of files) into rows of the store."""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError, SimsearchError

ENGINES = ("local", "ray")


def is_uri(source) -> bool:
    return "://" in str(source)


def check_source(source: str | Path, engine: str = "local") -> Path | str:
    """What `Index.add_folder` can index, checked without a model or a table: an `engine` of ENGINES and
    a folder or file that exists, or with engine "ray" also a URI. -> the source (a local path expanded)."""
    if engine not in ENGINES:
        raise SimsearchError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    if is_uri(source):
        if engine != "ray":
            raise SimsearchError(f"{source}: URIs are read by {{engine}} only", engine="ray")
        return str(source)
    root = Path(source).expanduser()
    if not root.exists():
        raise ImageError(root, "no such file or directory")
    return root
