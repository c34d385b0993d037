"""Reading a lazy layer forward (layerfs/seekpoints.py, `_ForwardReader`):
decoders that keep running between reads, the recent blocks they share,
byte-exact reads across block, frame and checkpoint boundaries, several
threads at once, and reads that go backwards."""

import random
import threading

import pytest

from layerfs import seekpoints
from layerfs.cache import IndexCache
from layerfs.layer import open_layer
from layer_data import compress, make_tar

SPAN = 64 << 10
BLOCK = seekpoints.BLOCK
# (compression, budget as a share of the tar, the form it gives)
LAZY = [("gzip", 0.02, "stream"), ("zstd", 0.02, "stream"),
        ("zstd-frames", 0.1, "frames"), ("gzip", 0.5, "checkpoints")]


@pytest.fixture(autouse=True)
def small_spans(monkeypatch):
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(SPAN))


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    """Each test its own memory of recent blocks and idle cursors."""
    monkeypatch.setattr(seekpoints, "_recent", seekpoints._RecentSpans(seekpoints.MEMORY))
    monkeypatch.setattr(seekpoints, "_idle", type(seekpoints._idle)())


def files(seed=3, count=24):
    """Files of words (so that a tenth of the tar holds no spans) and one
    random file in four (so that the checkpoints fit half of it)."""
    rng = random.Random(seed)
    words = [rng.randbytes(3).hex().encode() for _ in range(50)]
    return {f"d/f{i:02d}": (rng.randbytes(90_000) if i % 4 == 0 else
                            b" ".join(rng.choices(words, k=20_000))[:90_000 + i])
            for i in range(count)}


def lazy_layer(tmp_path, kind, share, form, monkeypatch):
    if form == "checkpoints":
        monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(2 * SPAN))
    tar = make_tar(files())
    path = tmp_path / f"layer.{kind}"
    path.write_bytes(compress(kind, tar))
    layer = open_layer(path, cache=IndexCache(tmp_path / "c", size=int(len(tar) * share)))
    assert layer.storage == form
    return layer, tar


@pytest.mark.parametrize("kind,share,form", LAZY)
def test_a_forward_pass_in_odd_pieces_is_exact_and_decompresses_each_byte_once(
        tmp_path, kind, share, form, monkeypatch):
    layer, tar = lazy_layer(tmp_path, kind, share, form, monkeypatch)
    reader = layer._data
    lengths = [1, 7, BLOCK - 3, 5, BLOCK, 2 * BLOCK + 1, 100_000, 512, 4096]
    offset, i = 0, 0
    with layer:
        while offset < len(tar):
            length = lengths[i % len(lengths)]
            assert reader.read_at(offset, length) == tar[offset:offset + length], offset
            offset += length
            i += 1
        if form != "checkpoints":       # one rapidgzip reader, no cursors
            assert reader.started <= 1 and reader.produced == len(tar)


@pytest.mark.parametrize("kind,share,form", LAZY)
def test_reads_that_skip_ahead_continue_the_decoder(tmp_path, kind, share, form,
                                                     monkeypatch):
    """A scanner reading one file in three: still one decoder, and every
    boundary of blocks (and frames, and checkpoints) read across."""
    layer, tar = lazy_layer(tmp_path, kind, share, form, monkeypatch)
    with layer:
        reader = layer._data
        entries = [e for e in layer.entries if e.size][::3]
        for entry in entries:
            assert layer.read(entry.data, entry.size, 0, entry.size) == \
                tar[entry.data:entry.data + entry.size]
        for boundary in range(BLOCK, len(tar), BLOCK):
            for offset in (boundary - 2, boundary + 1):
                assert reader.read_at(offset, 5) == tar[offset:offset + 5]
        if form == "stream":
            assert reader.started == 1


@pytest.mark.parametrize("kind,share,form", LAZY)
def test_a_backward_read_after_forward_ones(tmp_path, kind, share, form, monkeypatch):
    layer, tar = lazy_layer(tmp_path, kind, share, form, monkeypatch)
    with layer:
        reader = layer._data
        assert reader.read_at(0, len(tar)) == tar
        started = getattr(reader, "started", 0)
        # Still in memory: no decoder started.
        assert reader.read_at(10, 1000) == tar[10:1010]
        assert getattr(reader, "started", 0) == started
        # Forgotten: a decoder from the seek point before it (the blob's start
        # for the stream form), exact all the same.
        monkeypatch.setattr(seekpoints, "_recent", seekpoints._RecentSpans(0))
        for offset in (len(tar) // 2, 3, len(tar) - 700, BLOCK - 1):
            assert reader.read_at(offset, 600) == tar[offset:offset + 600], offset
        assert getattr(reader, "started", 1) > started


@pytest.mark.parametrize("kind,share,form", LAZY + [("zstd", 0.7, "spans")])
def test_several_threads_reading_at_once(tmp_path, kind, share, form, monkeypatch):
    """Four threads taking files in turn in 128 KiB reads, as FUSE threads
    do, and two more reading the tar far apart: every byte exact, no more
    decoders than the reader keeps."""
    layer, tar = lazy_layer(tmp_path, kind, share, form, monkeypatch)
    entries = [e for e in layer.entries if e.size]
    queue = iter(entries)
    lock = threading.Lock()
    errors = []

    def take_files():
        try:
            while True:
                with lock:
                    entry = next(queue, None)
                if entry is None:
                    return
                got = b"".join(layer.read(entry.data, entry.size, offset, 128 << 10)
                               for offset in range(0, entry.size, 128 << 10))
                assert got == tar[entry.data:entry.data + entry.size], entry.path
        except BaseException as error:      # seen by the main thread
            errors.append(error)

    def sweep(start):
        try:
            for offset in range(start, len(tar), 50_000):
                assert layer.read_data(offset, 3000) == tar[offset:offset + 3000]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=take_files) for _ in range(4)]
    threads += [threading.Thread(target=sweep, args=(start,))
                for start in (0, len(tar) // 2)]
    with layer:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        reader = layer._data
        if form in ("stream", "frames"):
            assert len(reader._cursors) <= reader.max_cursors and not reader._busy
    if form in ("stream", "frames"):
        assert reader._cursors == [] and not seekpoints._idle     # closed with the layer


def test_idle_decoders_are_bounded_in_the_process(tmp_path, monkeypatch):
    monkeypatch.setattr(seekpoints, "IDLE_CURSORS", 3)
    tar = make_tar(files())
    layers = []
    for i in range(5):
        path = tmp_path / f"l{i}.zst"
        path.write_bytes(compress("zstd", tar))
        layers.append(open_layer(path, cache=IndexCache(tmp_path / f"c{i}",
                                                        size=len(tar) // 50)))
    try:
        for layer in layers:
            assert layer.storage == "stream"
            assert layer.read_data(1000, 10) == tar[1000:1010]
            assert len(seekpoints._idle) <= 3
        # The first layer's decoder went: reading it starts one again, exactly.
        assert layers[0]._data._cursors == []
        assert layers[0].read_data(len(tar) - 10, 10) == tar[-10:]
    finally:
        for layer in layers:
            layer.close()
    assert not seekpoints._idle


def test_a_short_blob_reads_short_not_wrong(tmp_path, monkeypatch):
    """A stream-form blob cut after indexing: the read comes back short
    (the layer reports it), never with other bytes."""
    layer, tar = lazy_layer(tmp_path, "zstd", 0.02, "stream", monkeypatch)
    with layer:
        path = tmp_path / "layer.zstd"
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        got = layer._data.read_at(0, len(tar))
        assert len(got) < len(tar) and tar.startswith(got)
