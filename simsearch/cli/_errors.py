"""How a library error reads on the command line: the one place that turns the parameters a message
names into this CLI's flags, and adds the command that fixes it."""

from __future__ import annotations

import shlex

from ..errors import NAME_ONLY, EmptyIndexError, SimsearchError


def flag(name: str, value) -> str:
    """A library parameter as the option that sets it: every option is its parameter's name with `-`
    for `_` (`device='cuda'` is `--device cuda`; booleans are `--all-pairs` / `--no-log-bin`)."""
    option = name.replace("_", "-")
    if value is NAME_ONLY or value is True:
        return f"--{option}"
    if value is False:
        return f"--no-{option}"
    return f"--{option} {shlex.quote(str(value))}"


def cli_message(e: SimsearchError) -> str:
    message = e.spelled(flag)
    if isinstance(e, EmptyIndexError) and e.db is not None:
        message += f" (run `simsearch index FOLDER --db {e.db}`)"
    return message
