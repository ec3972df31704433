"""Paths a user names (the dashboard's "Files on disk", a path in its URL), read only under the
data root of a shared deployment (``SAMS_DATA_ROOT``, see :mod:`sams_core.settings`)."""

from __future__ import annotations

import os
from pathlib import Path

from sams_core.errors import SamsError
from sams_core.settings import SETTINGS, Settings


def readable_path(path: str | os.PathLike, settings: Settings | None = None) -> Path:
    """``path`` resolved once it lies under the data root or the shipped assets.

    Raises :class:`SamsError` otherwise; the message says the same whether or not the path
    exists, so a visitor cannot probe which server paths exist.
    """
    s = settings or SETTINGS
    if str(path).strip() == "":
        raise SamsError("No path given. Give the path of a file under the data folder.")
    resolved = s.readable(path)
    if resolved is None:
        raise SamsError(
            f"{path} is outside the data folder this server reads ({s.data_root}). Give a path under it, "
            "upload the file instead, or ask the administrator to set SAMS_DATA_ROOT."
        )
    return resolved


__all__ = ["readable_path"]
