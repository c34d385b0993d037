"""The node ids of volume entries (layerfs/fusevolume.py) and the choice
between a kernel bind and a served volume (layerfs/volume.py)."""

from __future__ import annotations

import errno
import os

import pytest

from layerfs import containercli, volume
from layerfs.errors import StoreError
from layerfs.fusevolume import FIRST_VOLUME_ID, VolumeInodes, is_volume_id


def stat_of(dev: int, ino: int) -> os.stat_result:
    return os.stat_result((0o100644, ino, dev, 1, 0, 0, 0, 0, 0, 0))


def test_ids_are_above_view_inodes_and_stable_per_host_inode():
    inodes = VolumeInodes()
    first = inodes.looked_up("/data", "/data/a", stat_of(1, 10))
    assert is_volume_id(first) and first >= FIRST_VOLUME_ID and not is_volume_id(2 ** 40)
    assert inodes.looked_up("/data", "/data/b", stat_of(1, 10)) == first      # a hard link
    assert inodes.path(first) == "/data/b"
    other = inodes.looked_up("/data", "/data/c", stat_of(2, 10))
    assert other != first
    # One host directory at two PATHs: ids of its own in each.
    elsewhere = inodes.looked_up("/ro", "/ro/a", stat_of(1, 10))
    assert elsewhere != first and inodes.path(first) == "/data/b"


def test_an_id_is_forgotten_when_the_kernel_forgets_every_lookup():
    inodes = VolumeInodes()
    ino = inodes.looked_up("/data", "/data/a", stat_of(1, 10))
    inodes.looked_up("/data", "/data/a", stat_of(1, 10))
    inodes.forget(ino, 1)
    assert inodes.path(ino) == "/data/a"
    inodes.forget(ino, 1)
    assert len(inodes) == 0
    with pytest.raises(OSError) as info:
        inodes.path(ino)
    assert info.value.errno == errno.ESTALE
    inodes.forget(ino, 1)                   # a late FORGET: nothing to do
    assert inodes.looked_up("/data", "/data/a", stat_of(1, 10)) != ino


def test_a_rename_moves_the_paths_below():
    inodes = VolumeInodes()
    directory = inodes.looked_up("/data", "/data/d", stat_of(1, 1))
    inside = inodes.looked_up("/data", "/data/d/f", stat_of(1, 2))
    beside = inodes.looked_up("/data", "/data/dd", stat_of(1, 3))
    inodes.moved("/data/d", "/data/e")
    assert (inodes.path(directory), inodes.path(inside), inodes.path(beside)) == \
        ("/data/e", "/data/e/f", "/data/dd")


def test_can_bind_reads_cap_sys_admin(monkeypatch, tmp_path):
    status = tmp_path / "status"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(status if path == "/proc/self/status" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    status.write_text(f"Name:\tx\nCapEff:\t{1 << 21:016x}\n")
    assert volume.can_bind()
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not volume.can_bind()


def test_who_cannot_bind_gets_served_volumes_on_writable_mounts_only(monkeypatch):
    volumes = [volume.Volume("/host", "/data")]
    monkeypatch.setattr(volume, "can_bind", lambda: True)
    assert containercli.served_volumes(volumes, writable=True) == []
    monkeypatch.setattr(volume, "can_bind", lambda: False)
    assert containercli.served_volumes(volumes, writable=True) == volumes
    assert containercli.served_volumes([], writable=False) == []
    with pytest.raises(StoreError) as info:
        containercli.served_volumes(volumes, writable=False)
    assert info.value.errno == errno.EPERM
