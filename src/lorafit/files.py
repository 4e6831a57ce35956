"""Everything lorafit writes goes through here: files and folders replaced atomically, what interrupted
writes leave behind recovered, the user's permissions, and output paths checked before slow work.

One naming scheme for temporaries, known only to this module: a file or folder being written as
``<dir>/<name>`` is built as ``<dir>/.<name>.<random>.tmp``; a folder set aside while its replacement is
renamed in (only where the file system cannot swap two folders in one step) is ``<dir>/.<name>.old``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from lorafit.errors import LorafitError, first_line

_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[^./]+\.tmp")
_SET_ASIDE = re.compile(r"\.(?P<target>.+)\.old")


def _temporary(target: Path, directory: bool) -> Path:
    make = tempfile.mkdtemp if directory else tempfile.mkstemp
    made = make(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    if not directory:
        os.close(made[0])
        made = made[1]
    return Path(made)


def _set_aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def usual_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give under the user's umask (temporary ones are 0600 / 0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # read without setting: os.umask can only be read by changing it, for every thread at once
        status = Path("/proc/self/status").read_text(encoding="ascii")
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


# --- files ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it over ``path`` only once writing succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, directory=False)
    try:
        yield tmp
        os.chmod(tmp, usual_mode())  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- folders --------------------------------------------------------------------------------------------

def replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Build a folder with ``write(tmp)`` beside ``target`` and swap it in once complete.

    Where the file system swaps two folders in one step (Linux), ``target`` is complete at every moment.
    Elsewhere the previous folder is set aside before the new one is renamed in: at every moment
    ``target`` or the set-aside copy is complete, and recover_interrupted() puts the copy back after a kill.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _put_back(target)
    tmp = _temporary(target, directory=True)
    old = _set_aside(target)
    try:
        write(tmp)
        os.chmod(tmp, usual_mode(directory=True))  # mkdtemp makes it 0700
        if not (target.exists() and _swap(tmp, target)):  # after a swap, tmp holds the previous folder
            if target.exists():
                os.rename(target, old)
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _put_back(target)  # stopped (Ctrl-C, SIGTERM) between the two renames


def create_dir_once(target: Path, build: Callable[[Path], None], stale_after: float) -> Path:
    """Return ``target``, first building it with ``build(tmp)`` and renaming it into place if missing.

    For caches that several processes may fill at once: the first complete copy wins and is never
    replaced; temporaries older than ``stale_after`` seconds are crash leftovers and are removed.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target.parent, lambda name: name == target.name, older_than=stale_after)
    tmp = _temporary(target, directory=True)
    try:
        build(tmp)
        os.chmod(tmp, usual_mode(directory=True))  # mkdtemp makes it 0700
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its finished copy into place first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def exists_or_set_aside(target: Path) -> bool:
    """``target`` exists, or an interrupted replace_dir() set it aside and recover_interrupted() will put it back."""
    return target.exists() or _set_aside(target).is_dir()


def recover_interrupted(folder: Path, owned: Callable[[str], bool], older_than: float | None = None) -> None:
    """Finish what killed writes left in ``folder`` for the names ``owned`` accepts: put back a folder whose
    replacement never arrived, and delete temporaries (only those older than ``older_than`` seconds if
    given, since another process may still be writing them)."""
    if not folder.is_dir():
        return
    for entry in folder.glob(".*.old"):
        match = _SET_ASIDE.fullmatch(entry.name)
        if match and owned(match["target"]) and entry.is_dir():
            _put_back(folder / match["target"])
    now = time.time()
    for entry in folder.glob(".*.tmp"):
        match = _TEMPORARY.fullmatch(entry.name)
        if not match or not owned(match["target"]):
            continue
        try:
            if older_than is not None and now - entry.stat().st_mtime <= older_than:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except FileNotFoundError:  # another process removed it meanwhile
            pass


def _put_back(target: Path) -> None:
    """A set-aside copy goes back if ``target`` never arrived, and is deleted once ``target`` is there."""
    old = _set_aside(target)
    if old.is_dir() and not target.exists():
        os.rename(old, target)
    shutil.rmtree(old, ignore_errors=True)


def _swap(new: Path, target: Path) -> bool:
    """Exchange ``new`` and ``target`` in one step; False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE from <fcntl.h> and <linux/fs.h>
    if renameat2(at_cwd, os.fsencode(new), at_cwd, os.fsencode(target), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        raise OSError(code, os.strerror(code), str(target))
    # a kernel or file system without the swap (EINVAL, ENOSYS, EOPNOTSUPP), or a sandbox that blocks the
    # call (EPERM): the two-rename fallback runs and reports any real failure itself
    return False


@functools.cache
def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux (Windows refuses CDLL(None)), or a C library without it
        return None


# --- output paths, checked before any slow work, and file-system failures in one line --------------------

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
    temporary = _TEMPORARY.fullmatch(Path(err.filename).name) if err.filename else None
    if writing and temporary and temporary["target"] == Path(writing).name:
        path = writing  # the temporary beside the output, which the user never named
    where = f" ('{path}')" if path else ""
    reason = err.strerror or first_line(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}{where}; free some space or write elsewhere, then run again"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}{where}; pick a location you may write to, or fix its permissions"
    return f"{reason}{where}; check the path and run again"
