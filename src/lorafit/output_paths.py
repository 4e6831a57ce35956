"""Where a command will write, checked before any slow work, and file-system failures told in one line."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from lorafit.errors import LorafitError


def check_output_dir(path: str | Path, flag: str) -> None:
    """``path`` can become a folder: it is one already or does not exist, and no parent is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorafitError(f"{flag} '{path}' is a file; pass a folder path (new or empty)")
    _check_parents(path, flag)


def check_output_file(path: str | Path, flag: str, example: str, input_file: str | Path | None = None,
                      what: str = "input") -> None:
    """``path`` can become a file: it is not a folder, no parent is a file, and it is not the input."""
    path = Path(path)
    if path.is_dir():
        raise LorafitError(f"{flag} '{path}' is a directory; pass a file name such as {example}")
    _check_parents(path, flag)
    if input_file is not None and path.resolve() == Path(input_file).resolve():
        raise LorafitError(f"{flag} '{path}' is the --input file; writing it would replace the {what}; "
                           f"pass another file name such as {example}")


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LorafitError(f"{flag} '{path}': '{parent}' is a file, not a folder; pass another path")
            return


def as_os_error(err: BaseException) -> OSError | None:
    """``err`` as an OSError: itself, or one rebuilt from the "(os error 28)" text that Rust-backed
    libraries (safetensors, tokenizers) raise instead."""
    if isinstance(err, OSError):
        return err
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None:
        return None
    number = int(found[1])
    return OSError(number, os.strerror(number))


def describe_os_error(err: OSError, writing: str | Path | None = None) -> str:
    """One line for a failed read or write: what went wrong, on which path, and what to do.

    ``writing`` names the command's output for errors that do not carry a file name."""
    path = err.filename or writing
    if writing and err.filename and Path(err.filename).name.startswith(f".{Path(writing).name}."):
        path = writing  # the temporary beside the output, which the user never named
    where = f" ('{path}')" if path else ""
    reason = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}{where}; free some space or write elsewhere, then run again"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}{where}; pick a location you may write to, or fix its permissions"
    return f"{reason}{where}; check the path and run again"
