"""Tests for lorafit.output_paths: output locations checked up front, file-system failures in one line."""

from __future__ import annotations

import errno
import os

import pytest

from lorafit.errors import LorafitError
from lorafit.output_paths import as_os_error, check_output_dir, check_output_file, describe_os_error


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
