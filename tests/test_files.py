"""Tests for lorafit.files: atomic files and folders, recovery after a kill, permissions, output paths."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from lorafit import files
from lorafit.errors import LorafitError
from lorafit.files import (as_os_error, atomic_path, check_output_dir, check_output_file, create_dir_once,
                           describe_os_error, exists_or_set_aside, recover_interrupted, replace_dir, write_json,
                           write_text)


@pytest.fixture(params=["swap", "no-swap"])
def swap(request, monkeypatch):
    """Run a test both where the file system swaps two folders in one step and where it cannot."""
    if request.param == "no-swap":
        monkeypatch.setattr(files, "_swap", lambda new, target: False)
    return request.param == "swap"


def _watch(monkeypatch, check) -> list:
    """Record ``check()`` after every rename and folder deletion."""
    seen = []

    def watched(function):
        def run(*args, **kwargs):
            result = function(*args, **kwargs)
            seen.append(check())
            return result
        return run

    monkeypatch.setattr(os, "rename", watched(os.rename))
    monkeypatch.setattr(shutil, "rmtree", watched(shutil.rmtree))
    return seen


# --- files ----------------------------------------------------------------------------------------------

def test_a_failed_file_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    write_text(tmp_path / "notes.txt", "one")
    with pytest.raises(OSError, match="disk full"), atomic_path(tmp_path / "notes.txt") as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "one"
    write_json(tmp_path / "notes.txt", {"b": 1, "a": [2]})
    assert (tmp_path / "notes.txt").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


# --- folders --------------------------------------------------------------------------------------------

def test_replace_dir(tmp_path, swap):
    target = tmp_path / "best"
    replace_dir(target, lambda tmp: (tmp / "v").write_text("1"))
    replace_dir(target, lambda tmp: (tmp / "v").write_text("2"))
    assert (target / "v").read_text() == "2"

    def failing(tmp):
        (tmp / "v").write_text("3")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_dir(target, failing)
    assert (target / "v").read_text() == "2"  # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # and no temporary is left


def test_replace_dir_keeps_the_folder_in_place_where_it_can_swap(tmp_path, monkeypatch):
    target = tmp_path / "best"
    replace_dir(target, lambda tmp: (tmp / "v").write_text("1"))
    seen = _watch(monkeypatch, lambda: (target / "v").is_file())
    replace_dir(target, lambda tmp: (tmp / "v").write_text("2"))
    monkeypatch.undo()
    assert seen and all(seen), seen
    assert (target / "v").read_text() == "2"


@pytest.mark.parametrize("code", [errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_replace_dir_falls_back_where_the_swap_is_refused(tmp_path, monkeypatch, code):
    """A sandbox that blocks renameat2 (EPERM), or a kernel or file system without the swap: two renames."""
    import ctypes

    def refused(*args):
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(files, "_renameat2", lambda: refused)
    target = tmp_path / "best"
    replace_dir(target, lambda tmp: (tmp / "v").write_text("1"))
    replace_dir(target, lambda tmp: (tmp / "v").write_text("2"))
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_replace_dir_stopped_between_its_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    """Without the swap, Ctrl-C or SIGTERM (as exceptions) may arrive after best/ was set aside, before the new
    one was renamed in."""
    monkeypatch.setattr(files, "_swap", lambda new, target: False)
    target = tmp_path / "best"
    replace_dir(target, lambda tmp: (tmp / "v").write_text("1"))
    real_rename = os.rename

    def interrupted_rename(src, dst):
        if Path(dst) == target and not Path(src).name.endswith(".old"):  # the new folder, not the old put back
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(target, lambda tmp: (tmp / "v").write_text("2"))
    monkeypatch.undo()
    assert (target / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_replace_dir_after_a_kill_between_its_renames_never_loses_the_set_aside_folder(tmp_path, monkeypatch, swap):
    """A kill left best/ set aside and no best/: the next replace puts it back first instead of deleting it
    before the new folder is in place."""
    target, aside = tmp_path / "best", tmp_path / ".best.old"
    aside.mkdir()
    (aside / "v").write_text("1")
    assert exists_or_set_aside(target)
    seen = _watch(monkeypatch, lambda: (target / "v").is_file() or (aside / "v").is_file())
    replace_dir(target, lambda tmp: (tmp / "v").write_text("2"))
    monkeypatch.undo()
    assert seen and all(seen), seen
    assert (target / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_recover_interrupted_puts_back_set_aside_folders_and_removes_only_owned_temporaries(tmp_path):
    (tmp_path / ".a.old").mkdir()  # its replacement never arrived: put back
    (tmp_path / ".a.old" / "v").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / ".b.old").mkdir()  # b/ was replaced: dropped
    (tmp_path / ".b.x1y2.tmp").mkdir()  # a folder being built
    (tmp_path / ".c.k2j3.tmp").write_text("half")  # a file being written
    (tmp_path / ".theirs.k2j3.tmp").write_text("keep")  # not owned
    (tmp_path / ".theirs.old").mkdir()
    recover_interrupted(tmp_path, lambda name: name in {"a", "b", "c"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".theirs.k2j3.tmp", ".theirs.old", "a", "b"]
    assert (tmp_path / "a" / "v").read_text() == "a"
    recover_interrupted(tmp_path / "missing", lambda name: True)  # nothing to do


def test_recover_interrupted_leaves_temporaries_younger_than_asked(tmp_path):
    stale, fresh = tmp_path / ".m.crashed.tmp", tmp_path / ".m.running.tmp"
    for path in (stale, fresh):
        path.mkdir()
    old = time.time() - 120
    os.utime(stale, (old, old))
    recover_interrupted(tmp_path, lambda name: name == "m", older_than=60)
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]


def test_create_dir_once_keeps_the_first_copy(tmp_path):
    target = tmp_path / "cache" / "m"
    assert create_dir_once(target, lambda tmp: (tmp / "a").write_text("one"), stale_after=60) == target
    create_dir_once(target, lambda tmp: (tmp / "a").write_text("two"), stale_after=60)
    assert (target / "a").read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["m"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_get_the_users_permissions(tmp_path, umask, swap):
    """Temporary files are created 0600 and folders 0700; what they become must not keep those modes."""
    before = os.umask(umask)
    try:
        write_text(tmp_path / "README.md", "card")
        write_json(tmp_path / "predictions.json", [1])
        replace_dir(tmp_path / "best", lambda tmp: (tmp / "v").write_text("1"))
        replace_dir(tmp_path / "best", lambda tmp: (tmp / "v").write_text("2"))
        create_dir_once(tmp_path / "cache" / "model", lambda tmp: (tmp / "w").write_text("1"), stale_after=60)
    finally:
        os.umask(before)
    for name in ("README.md", "predictions.json", "best/v", "cache/model/w"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    for name in ("best", "cache/model"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o777 & ~umask, name


# --- output paths ---------------------------------------------------------------------------------------
def test_output_dir_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    check_output_dir(tmp_path / "new" / "deeper", "--output")  # missing parents are fine: they get created
    check_output_dir(tmp_path, "--output")
    with pytest.raises(LorafitError, match="--output '.*f' is a file"):
        check_output_dir(tmp_path / "f", "--output")
    with pytest.raises(LorafitError, match="'.*f' is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "a" / "b", "--output")


def test_output_file_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    check_output_file(tmp_path / "f", "--output", "out.jsonl")  # replaced whole when written
    with pytest.raises(LorafitError, match="is a directory; pass a file name such as out.jsonl"):
        check_output_file(tmp_path, "--output", "out.jsonl")
    with pytest.raises(LorafitError, match="is a file, not a folder"):
        check_output_file(tmp_path / "f" / "out.jsonl", "--output", "out.jsonl")


def test_rust_io_errors_become_os_errors():
    err = as_os_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert (err.errno, err.strerror) == (errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert as_os_error(ValueError("bad value")) is None
    plain = PermissionError(errno.EACCES, "Permission denied", "/x")
    assert as_os_error(plain) is plain


def test_messages_name_the_path_the_user_gave():
    temporary = OSError(errno.EROFS, "Read-only file system", "/data/.p.jsonl.k2j3.tmp")
    assert describe_os_error(temporary, "/data/p.jsonl") == (
        "Read-only file system ('/data/p.jsonl'); pick a location you may write to, or fix its permissions")
    other = OSError(errno.EACCES, "Permission denied", "/data/input.csv")
    assert "'/data/input.csv'" in describe_os_error(other, "/data/p.jsonl")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert describe_os_error(full, "runs/a") == f"{os.strerror(errno.ENOSPC)} ('runs/a'); free some space or write elsewhere, then run again"
    assert "\n" not in describe_os_error(OSError("first line\nsecond line"))
