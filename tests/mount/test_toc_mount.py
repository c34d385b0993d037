"""A mounted image whose top layer is read from its table of contents
(eStargz, zstd:chunked): the kernel reads through TocLayer.read (no file
extent to hand libfuse), chunk by verified chunk."""

from __future__ import annotations

import hashlib
import os

import pytest

import layerfs
from layerfs import mount as layerfs_mount
from layerfs.commit import commit
from layerfs.example import build_example
from mount_helpers import requires_fuse

pytestmark = [pytest.mark.mount, requires_fuse]


@pytest.mark.parametrize("compression", ["estargz", "zstd:chunked"])
def test_a_toc_layer_reads_through_the_mount(tmp_path, mountpoint, compression):
    big = bytes(range(251)) * ((9 << 20) // 251)            # three 4 MiB chunks
    base = build_example(str(tmp_path / "base"))
    with layerfs.open(base, upper=tmp_path / "up") as fs:
        fs.write_bytes("/big", big)
        fs.symlink("big", "/link")
        fs.unlink("/etc/motd")
        result = commit(fs, tmp_path / "out", compression=compression)
    layerfs_mount.mount(result.dest, mountpoint, cache_dir=str(tmp_path / "cache"))
    with open(os.path.join(mountpoint, "link"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(big).digest()
        f.seek((4 << 20) - 3)
        assert f.read(6) == big[(4 << 20) - 3:(4 << 20) + 3]
    assert not os.path.exists(os.path.join(mountpoint, "etc", "motd"))
    assert "README" in os.listdir(mountpoint)
