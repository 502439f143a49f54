"""Errors a user sees as one line. The CLI prints `error: <message>` and exits non-zero."""


class SimsearchError(Exception):
    """Base class: anything the user can fix (bad input, wrong database, missing weights)."""


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
    """A query against a database that does not exist or holds no images."""
