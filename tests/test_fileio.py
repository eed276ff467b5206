import json
import os

import pytest

from fusionlib.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    replace_dir,
    sha256_file,
)


def test_atomic_write_leaves_old_file_when_write_fails(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_json_round_trip_and_sha(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "x.json", {"b": 1, "a": [1, 2]})
    assert json.load(open(path)) == {"b": 1, "a": [1, 2]}
    import hashlib

    assert sha256_file(path) == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_text_must_be_str(tmp_path):
    with pytest.raises(TypeError, match="text must be a str"):
        atomic_write_text(tmp_path / "x", b"bytes")


def test_replace_dir_swaps_whole_folder(tmp_path):
    target = tmp_path / "ckpt"
    replace_dir(target, lambda d: open(os.path.join(d, "one"), "w").close())
    replace_dir(target, lambda d: open(os.path.join(d, "two"), "w").close())
    assert os.listdir(target) == ["two"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    def broken(d):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_dir(target, broken)
    assert os.listdir(target) == ["two"] and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_files_get_the_mode_open_would_give(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "m.txt", "x")
        assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
