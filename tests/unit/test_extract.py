"""Copying out of an image (``fs.extract``, ``layerfs cp``): what ``cp -a``
keeps, and nothing written outside the destination whatever the image
holds or the destination already contains."""

import io
import os
import subprocess
import sys
import tarfile

import pytest

import layerfs

ROOT = os.geteuid() == 0


def entry(tar, name, kind=tarfile.REGTYPE, payload=b"", **fields):
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = kind, fields.pop("mtime", 1_600_000_000), fields.pop(
        "mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    for key, value in fields.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    else:
        tar.addfile(info)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w") as tar:
        entry(tar, "app", tarfile.DIRTYPE, mode=0o750, mtime=1_500_000_000, uid=123, gid=45)
        entry(tar, "app/run.sh", payload=b"#!/bin/sh\n", mode=0o4755, uid=123, gid=45)
        entry(tar, "app/same", tarfile.LNKTYPE, linkname="app/run.sh")
        entry(tar, "app/escape", tarfile.SYMTYPE, linkname="../../../../outside/victim")
        entry(tar, "app/abs", tarfile.SYMTYPE, linkname="/outside/victim")
        entry(tar, "app/sub", tarfile.DIRTYPE)
        entry(tar, "app/sub/data", payload=b"x" * 3_000_000)
        entry(tar, "link-to-app", tarfile.SYMTYPE, linkname="app")
    return str(path)


def test_extract_a_tree_keeps_what_cp_a_keeps(image, tmp_path):
    dest = tmp_path / "out"
    with layerfs.open([image]) as fs:
        assert fs.extract("/app", dest) == str(dest)
    st = os.stat(dest)
    assert (oct(st.st_mode & 0o7777), int(st.st_mtime)) == (oct(0o750), 1_500_000_000)
    run = os.stat(dest / "run.sh")
    assert (run.st_mode & 0o7777, run.st_ino) == (0o4755, os.stat(dest / "same").st_ino)
    if ROOT:
        assert (run.st_uid, run.st_gid) == (123, 45)
    assert (dest / "sub" / "data").read_bytes() == b"x" * 3_000_000
    assert os.readlink(dest / "escape") == "../../../../outside/victim"
    assert os.readlink(dest / "abs") == "/outside/victim"


def test_extract_into_an_existing_directory_and_a_symlink_as_itself(image, tmp_path):
    with layerfs.open([image]) as fs:
        fs.extract("/link-to-app", tmp_path)
        fs.extract("/link-to-app/run.sh", tmp_path)    # the parent is followed in the image
    assert os.readlink(tmp_path / "link-to-app") == "app"
    assert (tmp_path / "run.sh").read_bytes() == b"#!/bin/sh\n"


def test_an_existing_name_in_the_destination_is_never_written_through(image, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "app").mkdir()
    os.symlink(victim, dest / "app" / "run.sh")       # planted where a file will go
    with layerfs.open([image]) as fs, pytest.raises(FileExistsError):
        fs.extract("/app", dest / "app" / "..")       # resolves to dest: app exists
    with layerfs.open([image]) as fs, pytest.raises(FileExistsError):
        fs.extract("/app/run.sh", dest / "app")       # dest/app/run.sh exists (a symlink)
    assert victim.read_bytes() == b"keep me" and oct(victim.stat().st_mode & 0o777) != "0o4755"


def test_layerfs_cp_as_typed(image, tmp_path):
    result = subprocess.run([sys.executable, "-m", "layerfs.cli", "cp", "--layer", image,
                             "/app/sub", tmp_path / "copy"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "copy" / "data").stat().st_size == 3_000_000
    again = subprocess.run([sys.executable, "-m", "layerfs.cli", "cp", "--layer", image,
                            "/app/sub", tmp_path / "copy" / "data"], capture_output=True,
                           text=True)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "File exists" in again.stderr and "Traceback" not in again.stderr
