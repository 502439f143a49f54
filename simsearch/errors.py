"""Errors a user sees as one line. The CLI prints `error: <message>` and exits non-zero.

A message names the caller's parameters, never a command-line flag: written `{name}` in the message
with its value in `params`, it reads `name='value'` here and as the flag that sets it where the CLI
prints it (simsearch.cli.errors).
"""

from __future__ import annotations

import re
from typing import Callable

NAME_ONLY = ...  # a parameter named without a value: `pairs` here, `--pairs` on the command line


def _python_spelling(name: str, value) -> str:
    if value is NAME_ONLY:
        return name
    return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"


class SimsearchError(Exception):
    """Base class: anything the user can fix (bad input, wrong database, missing weights)."""

    def __init__(self, message: str = "", **params):
        self.template, self.params = message, params
        super().__init__(self.spelled(_python_spelling))

    def spelled(self, spell: Callable[[str, object], str]) -> str:
        """The message with each `{name}` of `params` as `spell(name, value)` writes it."""
        if not self.params:
            return self.template
        return re.sub(r"\{(\w+)\}", lambda m: spell(m[1], self.params[m[1]]) if m[1] in self.params else m[0],
                      self.template)


class ImageError(SimsearchError):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigMismatchError(SimsearchError):
    """A database built with one model/descriptor configuration used with another."""


class WeightsNotFoundError(SimsearchError):
    """Weights could not be resolved from the registry name, hub id or local directory."""


class EmptyIndexError(SimsearchError):
    """A query against a database that does not exist or holds no images. `db`: that database, when
    adding images to it is the fix."""

    def __init__(self, message: str, db=None, **params):
        super().__init__(message, **params)
        self.db = None if db is None else str(db)
