"""Checks of the files and folders that the libraries and the tools write, run before any work starts.

A path that cannot be written (a directory given for a file, a folder that is missing or is a file, no
write permission) is a ``ValueError`` naming the argument, instead of an ``OSError`` after minutes of
work (an export, a parity grid, a training sweep). Nothing is created: a folder an output needs is made
by the writer, once the work succeeded.
"""

from __future__ import annotations

import os
from typing import Any


def _fspath(path: Any, what: str) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise ValueError(f"{what}={path!r} must be a path (str or os.PathLike)") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"{what} is empty; give a path")
    return path


def _nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists (a file or a folder)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_file(path: Any, what: str) -> str:
    """``path`` as a ``str`` if a file can be written there: it is not a directory, its folder exists
    and is writable (and an existing file is writable). ``what`` names the argument in the error
    (``'--out'``, ``'save_safetensors: path'``)."""
    path = _fspath(path, what)
    if os.path.isdir(path):
        raise ValueError(f"{what}={path!r} is a directory; give the name of a file (in it or elsewhere)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        blocker = _nearest_existing(folder)
        reason = (
            f"the folder {folder!r} does not exist"
            if os.path.isdir(blocker)
            else f"{blocker!r} is a file, not a folder"
        )
        raise ValueError(f"{what}={path!r} cannot be written: {reason}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={path!r} cannot be written: the folder {folder!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{what}={path!r} exists and is not writable")
    return path


def check_output_dir(path: Any, what: str) -> str:
    """``path`` as a ``str`` if it is a writable folder or one that can be created (its nearest existing
    ancestor is a writable folder, not a file). Nothing is created here."""
    path = _fspath(path, what)
    blocker = _nearest_existing(path)
    if not os.path.isdir(blocker):
        if blocker == os.path.abspath(path):
            raise ValueError(f"{what}={path!r} is a file, not a folder")
        raise ValueError(f"{what}={path!r} cannot be created: {blocker!r} is a file")
    if not os.access(blocker, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={path!r} cannot be written: {blocker!r} is not writable")
    return path
