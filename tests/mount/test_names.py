"""Long names through a writable mount: 1 to 255 bytes work for every
operation, longer ones are ENAMETOOLONG (lookups included) and change
nothing."""

from __future__ import annotations

import errno
import os

import pytest

import layerfs
from mount_helpers import requires_fuse, requires_upper

pytestmark = [pytest.mark.mount, requires_fuse, requires_upper]


@pytest.fixture
def rw(sample_layers, tmp_path, thread_mount):
    upper = str(tmp_path / "upper")
    return thread_mount(layerfs.open(sample_layers, upper=upper)).mountpoint, upper


def test_names_of_252_to_255_bytes_through_the_mount(rw):
    mnt, upper = rw
    for size in (252, 253, 255):
        name = "n" * size
        with open(f"{mnt}/etc/{name}", "wb") as stream:
            stream.write(b"%d" % size)
        os.rename(f"{mnt}/etc/passwd", f"{mnt}/etc/{'p' * size}")       # a lower file
        os.rename(f"{mnt}/etc/{'p' * size}", f"{mnt}/etc/passwd")        # and back
        os.link(f"{mnt}/etc/{name}", f"{mnt}/{name}")
        os.unlink(f"{mnt}/etc/{name}")
        assert open(f"{mnt}/{name}", "rb").read() == b"%d" % size
    assert not [n for n in os.listdir(f"{mnt}/etc") if n.startswith(("n", "p", ".wh."))
                and n != "passwd"]
    assert sorted(n for n in os.listdir(mnt) if n.startswith("n")) == [
        "n" * size for size in (252, 253, 255)]
    assert open(f"{mnt}/etc/passwd", "rb").read().startswith(b"root:")


def test_names_over_255_bytes_are_enametoolong_and_change_nothing(rw):
    mnt, upper = rw
    long = f"{mnt}/etc/" + "x" * 256
    before = sorted(os.walk(os.path.join(upper, "diff")))
    calls = [lambda: os.stat(long), lambda: os.lstat(long + "/y"), lambda: open(long, "wb"),
             lambda: os.mkdir(long), lambda: os.symlink("t", long),
             lambda: os.rename(f"{mnt}/etc/passwd", long),
             lambda: os.link(f"{mnt}/etc/passwd", long), lambda: os.mkfifo(long)]
    for call in calls:
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.ENAMETOOLONG
    assert sorted(os.walk(os.path.join(upper, "diff"))) == before
    assert os.path.exists(f"{mnt}/etc/passwd")
