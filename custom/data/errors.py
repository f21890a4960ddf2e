"""Errors of the data layer, and the last line of a command that died of one.

Every data error is a :class:`BraTSDataError` naming the case and the file (:class:`NotNiftiError`
when the file is not a readable NIfTI file at all); an output that cannot be written is an
:class:`OutputError` naming the path.
"""

from __future__ import annotations

import re
import sys


class BraTSDataError(ValueError):
    """A dataset folder, case or file that does not fit the BraTS conventions."""


class NotNiftiError(BraTSDataError):
    """A file that is not a readable NIfTI file at all (empty, not gzip, another format, cut header)."""


class OutputError(OSError):
    """An output folder or file that cannot be written (full disk, not a folder, no permission); the
    message names the path. Like ``BraTSDataError``, repeated as the last line of a failed command."""


def clear_error(exc: BaseException) -> tuple[str, str] | None:
    """``(name, message)`` of the ``BraTSDataError`` or ``OutputError`` that caused ``exc`` (through
    ``__cause__``/``__context__``, or in the text of an exception re-raised from a DataLoader worker
    process), if any; ``name`` is ``"BraTSDataError"`` for a data error of any kind."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (BraTSDataError, OutputError)):
            return ("OutputError" if isinstance(e, OutputError) else "BraTSDataError"), str(e)
        match = re.search(r"(?:^|\n)(?:[\w.]+\.)?(BraTSDataError|NotNiftiError|OutputError): (.*?)(?:\n\n|\Z)", str(e), re.S)
        if match:
            return ("OutputError" if match.group(1) == "OutputError" else "BraTSDataError"), match.group(2).strip()
        e = e.__cause__ or e.__context__
    return None


def data_error_message(exc: BaseException) -> str | None:
    """The message of the data or output error that caused ``exc`` (see :func:`clear_error`), if any."""
    found = clear_error(exc)
    return found[1] if found else None


def install_excepthook() -> None:
    """Make an uncaught exception caused by a ``BraTSDataError`` or ``OutputError`` end stderr with
    that error's message.

    MONAI wraps errors raised while parsing a bundle config or applying a transform in its own
    ``RuntimeError`` ("Failed to evaluate ...", "applying transform ..."), so the traceback's last
    line says nothing about the data; this prints ``BraTSDataError: <case and file: what is wrong>``
    after the usual traceback. Other exceptions are untouched. Installed by the command-line
    entry points and by the bundle configs' ``initialize`` step; idempotent.
    """
    previous = sys.excepthook
    if getattr(previous, "_brats_hook", False):
        return

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        found = clear_error(exc) if isinstance(exc, BaseException) else None
        if found and not isinstance(exc, (BraTSDataError, OutputError)):
            sys.stderr.write(f"\n{found[0]}: {found[1]}\n")
            sys.stderr.flush()

    hook._brats_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
