"""Opening an image indexes the layers the index cache lacks in parallel
(issue 12 item 4): the same view, the same error, nothing left open."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

import layerfs
from layerfs import image as image_mod
from layerfs.errors import ImageError
from layerfs.image import blob_name, open_image
from layerfs.layer import IndexCache
from layerfs.testing import layers as L
from layerfs.testing.writers import write_image

STACK = [
    L.Layer([L.directory("etc"), L.file("etc/a", b"a" * 5000), L.file("etc/b", b"b0"),
             L.file("bin/sh", os.urandom(70000))]),
    L.Layer([L.file("etc/b", b"b1"), L.whiteout("etc/a"), L.file("opt/x", b"x")]),
    L.Layer([L.opaque("opt"), L.file("opt/y", b"y"), L.symlink("etc/link", "b")]),
    L.Layer([L.file("etc/c", os.urandom(40000)), L.hardlink("etc/h", "etc/c")]),
]


def view(fs) -> dict:
    out = {}
    for top, dirs, files in fs.walk("/"):
        for name in dirs + files:
            path = os.path.join(top, name)
            st = fs.lstat(path)
            out[path] = (st.st_mode, st.st_size, fs.read_bytes(path)
                         if name in files and not fs.is_symlink(path) else None)
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def serial(monkeypatch):
    """Make open_layers take the serial path whatever needs indexing."""
    def use_serial():
        monkeypatch.setattr(image_mod, "_open_all_parallel",
                            lambda openers, cold, later=(): image_mod._open_all(openers))
    return use_serial


@pytest.fixture
def spy(monkeypatch):
    """Record the calls of _open_all_parallel and the threads openers run in."""
    calls, threads = [], set()
    real = image_mod._open_all_parallel

    def spying(openers, cold, later=frozenset()):
        calls.append(sorted(cold))

        def wrap(opener):
            def run():
                threads.add(threading.current_thread().name)
                return opener()
            return run
        return real([wrap(o) for o in openers], cold, later)
    monkeypatch.setattr(image_mod, "_open_all_parallel", spying)
    return calls, threads


@pytest.mark.parametrize("kind", ["oci-layout", "docker-archive", "oci-archive"])
def test_cold_open_gives_the_serial_view(tmp_path, serial, spy, kind):
    source = write_image(STACK, tmp_path / "img", kind=kind)
    calls, threads = spy
    with layerfs.open(source, cache=False) as fs:
        parallel = view(fs)
    assert calls == [[0, 1, 2, 3]]
    assert any(name.startswith("layerfs-index") for name in threads)
    serial()
    with layerfs.open(source, cache=False) as fs:
        assert view(fs) == parallel
    assert "/etc/a" not in parallel and parallel["/etc/b"][2] == b"b1"
    assert "/opt/x" not in parallel and parallel["/opt/y"][2] == b"y"


def test_cold_open_with_a_cache_fills_it(tmp_path, spy):
    source = write_image(STACK, tmp_path / "img")
    cache = IndexCache(tmp_path / "cache")
    with open_image(source, cache=cache) as image:
        digests = [layer.digest for layer in image.layers]
        entries = [[e.path for e in layer.entries] for layer in image.layers]
    calls, _ = spy
    assert calls == [[0, 1, 2, 3]]
    for digest in digests:
        assert cache.load_header(digest.partition(":")[2]) is not None
    with open_image(source, cache=cache) as image:     # warm: serial, no pool
        assert [[e.path for e in layer.entries] for layer in image.layers] == entries
    assert calls == [[0, 1, 2, 3]]


def test_layers_indexed_at_once_report_one_progress(tmp_path, spy, monkeypatch):
    """One bar for the whole image: the bytes done of every layer reported
    so far against their total, never going back."""
    monkeypatch.setattr("layerfs.compression.PROGRESS_STEP", 1000)
    source = write_image(STACK, tmp_path / "img", compression="gzip")
    calls = []
    with open_image(source, cache=IndexCache(tmp_path / "cache"),
                    progress=lambda done, total: calls.append((done, total))):
        pass
    assert spy[0] == [[0, 1, 2, 3]]
    dones = [done for done, _ in calls]
    assert dones == sorted(dones)
    with open_image(source) as image:
        layer_bytes = sum(layer.size for layer in image.layers)
    assert calls[-1] == (layer_bytes, layer_bytes)


def test_warm_open_makes_no_thread_pool(tmp_path, monkeypatch):
    source = write_image(STACK, tmp_path / "img")
    with layerfs.open(source) as fs:
        before = view(fs)

    def no_pool(*args, **kwargs):
        raise AssertionError("a thread pool on a warm open")
    monkeypatch.setattr(image_mod.concurrent.futures, "ThreadPoolExecutor", no_pool)
    with layerfs.open(source) as fs:
        assert view(fs) == before


def test_one_cold_layer_is_indexed_here(tmp_path, spy):
    source = write_image(STACK[:2], tmp_path / "img")
    with layerfs.open(source, cache=False) as fs:
        assert fs.read_bytes("/etc/b") == b"b1"
    assert spy[0] == [[0, 1]]
    source = write_image(STACK[:1], tmp_path / "one")
    with layerfs.open(source, cache=False) as fs:
        assert fs.read_bytes("/etc/b") == b"b0"
    assert spy[0] == [[0, 1]]


def corrupt(layout, number: int) -> None:
    """Flip a byte in the compressed data of layer *number* of *layout*."""
    path = os.path.join(layout, "..", "layer-files", f"layer{number}.tar")
    with open(path, "rb") as f:
        data = f.read()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = os.path.join(layout, blob_name(digest))
    with open(blob, "r+b") as f:
        f.seek(len(data) // 2)
        byte = f.read(1)
        f.seek(len(data) // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("bad", [[1], [1, 3], [2, 0]])
@pytest.mark.parametrize("cache", [False, "dir"])
def test_a_corrupt_layer_gives_the_serial_error_and_closes_the_others(
        tmp_path, serial, spy, bad, cache):
    source = write_image(STACK, tmp_path / "img")
    for number in bad:
        corrupt(source, number)
    cache_arg = False if cache is False else str(tmp_path / "cache")
    fds = fd_count()
    with pytest.raises(ImageError) as parallel:
        layerfs.open(source, cache=cache_arg)
    assert fd_count() == fds
    assert spy[0] == [[0, 1, 2, 3]]
    assert f"layer {min(bad)} (" in str(parallel.value), str(parallel.value)
    serial()
    with pytest.raises(ImageError) as one_by_one:
        layerfs.open(source, cache=cache_arg)
    assert fd_count() == fds
    assert type(parallel.value) is type(one_by_one.value)
    assert str(parallel.value) == str(one_by_one.value)
    assert len(str(parallel.value).splitlines()) == 1


def test_a_corrupt_layer_among_cached_ones(tmp_path, spy):
    """Cached layers open here while the cold ones index in the pool; a
    failure of a cold one still closes the cached ones."""
    source = write_image(STACK, tmp_path / "img")
    cache = str(tmp_path / "cache")
    layerfs.open(source, cache=cache).close()
    # layers 1 and 3 leave the cache; 3 is corrupt
    idx = IndexCache(cache)
    with open_image(source, cache=False) as image:
        digests = [layer.digest.partition(":")[2] for layer in image.layers]
    for number in (1, 3):
        os.remove(idx.index_path(digests[number]))
    corrupt(source, 3)
    fds = fd_count()
    with pytest.raises(ImageError, match=r"layer 3 \("):
        layerfs.open(source, cache=cache)
    assert fd_count() == fds
    assert spy[0][-1] == [1, 3]


def test_the_same_blob_twice_is_indexed_once(tmp_path, spy, monkeypatch):
    """A blob that comes back higher in the stack is opened after the first
    is indexed: from the cache, not indexed a second time at once."""
    from layerfs.imagewrite import write_oci_layout
    blobs = write_image(STACK[:3], tmp_path / "files", kind="layers")
    source = tmp_path / "img"
    write_oci_layout(source, [blobs[0], blobs[1], blobs[2], blobs[1]], tag="v1")
    from layerfs import layer as layer_mod
    indexed = []
    real = layer_mod._Opener.index

    def counting(self, *args, **kw):
        indexed.append(self.label)
        return real(self, *args, **kw)
    monkeypatch.setattr(layer_mod._Opener, "index", counting)
    with layerfs.open(source, cache=str(tmp_path / "cache")) as fs:
        assert fs.read_bytes("/etc/b") == b"b1" and fs.read_bytes("/opt/x") == b"x"
    assert spy[0] == [[0, 1, 2]]
    assert len(indexed) == 3 and not any(label.startswith("3 ") for label in indexed)
