"""Fixtures for the FUSE mount tests (helpers are in mount_helpers.py).

Every mount made here is unmounted in teardown, so no test leaves one behind.
"""

from __future__ import annotations

import pytest

import layerfs
from layerfs import mount as layerfs_mount
from mount_helpers import ThreadMount, extract_view, force_unmount, write_sample_layers


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Index caches go to the test's directory, for this process and children."""
    monkeypatch.setenv("LAYERFS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path, monkeypatch):
    """Servers' lock files go to the test's directory, for this process and
    children (the mount daemons, the CLI)."""
    monkeypatch.setenv(layerfs_mount.RUNTIME_DIR_VARIABLE, str(tmp_path / "run"))


@pytest.fixture
def sample_layers(tmp_path):
    directory = tmp_path / "layers"
    directory.mkdir()
    return write_sample_layers(str(directory))


@pytest.fixture
def sample_fs(sample_layers):
    with layerfs.open(sample_layers) as fs:
        yield fs


@pytest.fixture
def mountpoint(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield str(path)
    force_unmount(str(path))


@pytest.fixture
def mounted(sample_layers, mountpoint, tmp_path):
    """The sample image mounted read-only by a background daemon."""
    layerfs_mount.mount(sample_layers, mountpoint, cache_dir=str(tmp_path / "cache"))
    yield mountpoint


@pytest.fixture
def rw_mounted(sample_layers, mountpoint, tmp_path):
    """The sample image mounted read-write (upper in tmp_path/upper) by a
    background daemon, as ``layerfs mount --upper`` does."""
    layerfs_mount.mount(sample_layers, mountpoint, upper=str(tmp_path / "upper"),
                        cache_dir=str(tmp_path / "cache"))
    yield mountpoint


@pytest.fixture
def local_copy(sample_fs, tmp_path):
    """A plain local directory holding the sample image, extracted."""
    from layerfs.testing.view import snapshot
    return extract_view(snapshot(sample_fs), str(tmp_path / "local"))


@pytest.fixture
def thread_mount(mountpoint):
    """A function serving an open filesystem in a thread of this process on
    the mount point; unmounted at teardown."""
    mounts = []

    def start(fs, options=()):
        mount = ThreadMount(fs, mountpoint, options)
        mounts.append(mount)
        return mount

    yield start
    for mount in mounts:
        if mount.thread.is_alive():
            mount.stop()
