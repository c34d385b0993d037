"""The bounded cache: budget, spans, pins, eviction, prune, crash safety,
several processes (layerfs/cache.py, seekpoints.py, cachecli.py)."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

import layerfs
from layerfs import cachecli, cli, seekpoints
from layerfs.blobsource import BytesBlob, CountingBlob, FileRange, VerifiedBlob
from layerfs.cache import IndexCache, parse_duration, parse_size
from layerfs.entry import REGULAR
from layerfs.errors import DigestMismatchError, InvalidLayerError
from layerfs import layer as layer_module
from layerfs.layer import open_layer
from layerfs.seekpoints import SpanReader, SpanWriter, estimate_gzip_index
from layer_data import compress, make_tar

SPAN = 64 << 10
LAZY = {"gzip": "checkpoints", "zstd": "spans"}    # a layer beyond the budget, mostly


@pytest.fixture(autouse=True)
def small_spans(monkeypatch):
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(SPAN))


def corpus(seed=1, count=40):
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        size = rng.choice([0, 1, 511, 512, 513, SPAN - 1, SPAN, SPAN + 1, 3 * SPAN + 7])
        files[f"d{i % 3}/f{i}"] = (rng.randbytes(size // 2)
                                   + bytes(size - size // 2))    # half random, half zeros
    return files


def write(tmp_path, kind, files, name="layer"):
    path = tmp_path / f"{name}.{kind}"
    path.write_bytes(compress(kind, make_tar(files)))
    return path


def read_all(layer):
    return {e.path[1:]: layer.read(e.data, e.size, 0, e.size)
            for e in layer.entries if e.kind == REGULAR}


# -- sizes and durations ----------------------------------------------------

def test_parse_size():
    assert parse_size("500M") == 500 << 20
    assert parse_size("20G") == 20 << 30
    assert parse_size("1.5K") == 1536
    assert parse_size("4096") == 4096
    assert parse_size("2GiB") == 2 << 30
    for bad in ("", "x", "-1", "0", "5Q"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_parse_duration():
    assert parse_duration("90s") == 90
    assert parse_duration("7d") == 7 * 86400
    with pytest.raises(ValueError):
        parse_duration("7")


def test_budget_is_recorded_in_the_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERFS_CACHE_SIZE", raising=False)
    IndexCache(tmp_path / "c", size="5M")
    assert IndexCache(tmp_path / "c").budget == 5 << 20
    assert json.loads((tmp_path / "c" / "cache.json").read_text()) == {"size": 5 << 20}
    assert IndexCache(tmp_path / "other").budget >= 1 << 30     # the default


# -- spans ------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, SPAN - 1, SPAN, SPAN + 1, 5 * SPAN + 3])
def test_spans_round_trip_at_every_boundary(tmp_path, size):
    data = random.Random(size).randbytes(size)
    path = tmp_path / "s"
    with open(path, "w+b") as file:
        writer = SpanWriter(file, span=SPAN)
        for i in range(0, size, 10000):
            writer.write(data[i:i + 10000])
        writer.finish()
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = SpanReader(fd, size, "s")
        for boundary in range(0, size + 1, SPAN):
            for offset in {max(0, boundary - 3), boundary, min(size, boundary + 3)}:
                for length in (1, 5, SPAN + 2):
                    assert reader.read_at(offset, length) == data[offset:offset + length]
        assert reader.read_at(0, size + 10) == data
    finally:
        os.close(fd)


@pytest.mark.parametrize("padding", [0, 1000])
def test_gzip_checkpoints_at_every_boundary(tmp_path, padding, monkeypatch):
    """Several members and zero padding after the last, as layers have."""
    spacing = 2 * SPAN
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(spacing))
    files = corpus(11, 60)
    tar = make_tar(files)
    cut = len(tar) // 3
    path = tmp_path / "multi.gz"
    path.write_bytes(gzip.compress(tar[:cut]) + gzip.compress(tar[cut:]) + bytes(padding))
    cache = IndexCache(tmp_path / "c", size=len(tar) * 3 // 4)   # 64 KiB apart: 32 KiB each
    counting = CountingBlob(FileRange(path))
    with open_layer(counting, cache=cache) as layer:
        assert layer.storage == "checkpoints"
        assert read_all(layer) == files
        for boundary in range(0, len(tar), spacing):
            for offset in (max(0, boundary - 2), boundary):
                assert layer._pread(min(7, len(tar) - offset), offset) == \
                    tar[offset:offset + 7]
        before = counting.bytes_read
        entry = max(layer.entries, key=lambda e: e.size)
        layer.read(entry.data, entry.size, 0, 4096)
        assert counting.bytes_read - before < len(path.read_bytes()) // 2
    with open_layer(path, cache=cache) as again:
        assert again.storage == "checkpoints" and read_all(again) == files


def remote_gzip(tmp_path, seed=5):
    """A gzip layer (its copy 4 MB, the blob about 2 MB) served from
    memory, as a registry blob is (no local file: not read in place)."""
    rng = random.Random(seed)
    words = [rng.randbytes(3).hex().encode() for _ in range(300)]
    files = {f"f{i}": (rng.randbytes(100_000) if i % 4 == 0 else
                       b" ".join(rng.choices(words, k=20_000))[:100_000]) for i in range(40)}
    tar = make_tar(files)
    return files, tar, CountingBlob(BytesBlob(gzip.compress(tar), label="remote"))


def watch_usage(cache):
    peak = []
    real_reserve = cache.reserve

    def watching(n, keep="", ahead=0):
        peak.append(cache.usage())
        return real_reserve(n, keep, ahead)

    cache.reserve = watching
    return peak


@pytest.mark.parametrize("step", [None, 256 << 10])
def test_checkpoints_of_a_remote_gzip_blob_come_from_the_bytes_the_pass_read(
        tmp_path, monkeypatch, step):
    """The copy does not fit, the blob does: it is kept in a temp file
    while the pass reads it, and rapidgzip indexes that: one fetch.  (With
    room asked in steps smaller than the budget too.)"""
    if step:
        monkeypatch.setattr(layer_module, "RESERVE_STEP", step)
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(1 << 20))
    files, tar, blob = remote_gzip(tmp_path)
    budget = len(tar) * 3 // 4
    assert blob.size + estimate_gzip_index(len(tar), 1 << 20) < budget
    cache = IndexCache(tmp_path / "c", size=budget)
    peak = watch_usage(cache)
    with open_layer(blob, cache=cache) as layer:
        assert layer.storage == "checkpoints"
        # The pass, and the first 1 MiB chunk again when the reader is
        # made (read and verified by chunks); before: twice the blob.
        assert blob.size <= blob.bytes_read <= blob.size + (1 << 20) + 64
        assert read_all(layer) == files
    assert max(peak) <= budget and cache.usage() <= budget
    assert not list((tmp_path / "c").rglob(".tmp-*"))
    with open_layer(blob, cache=cache) as again:
        assert again.storage == "checkpoints" and read_all(again) == files


def test_a_remote_gzip_blob_beyond_the_budget_is_fetched_once(tmp_path, monkeypatch):
    """Neither the copy nor the blob fit, and the blob's last bytes (its
    length) say so: the indexing pass builds the checkpoints itself
    (rapidgzip as its decoder), so the blob is fetched once and no temp
    copy of it is written."""
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(1 << 20))
    files, tar, blob = remote_gzip(tmp_path)
    budget = blob.size // 2
    cache = IndexCache(tmp_path / "c", size=budget)
    peak = watch_usage(cache)
    with open_layer(blob, cache=cache) as layer:
        assert layer.storage == "checkpoints"
        # The pass and a few bytes (the reader's head: kept from the pass).
        assert blob.size <= blob.bytes_read <= blob.size + 64
        assert read_all(layer) == files
    assert max(peak) <= budget and cache.usage() <= budget
    assert not list((tmp_path / "c").rglob(".tmp-*"))


def test_a_padded_remote_gzip_blob_beyond_the_budget_is_fetched_again(
        tmp_path, monkeypatch):
    """Zero padding after the last member hides the length: the pass
    decodes with zlib, the temp file goes as soon as the budget has no room
    for it, and the checkpoints pass fetches the blob again."""
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(1 << 20))
    files, tar, blob = remote_gzip(tmp_path)
    blob = CountingBlob(BytesBlob(blob.inner.read_at(0, blob.size) + bytes(512),
                                  label="remote"))
    budget = blob.size // 2
    cache = IndexCache(tmp_path / "c", size=budget)
    peak = watch_usage(cache)
    with open_layer(blob, cache=cache) as layer:
        assert layer.storage == "checkpoints"
        # twice, but for the head the pass kept for the reader
        assert blob.bytes_read >= 2 * blob.size - (1 << 20)
        assert read_all(layer) == files
    assert max(peak) <= budget and cache.usage() <= budget
    assert not list((tmp_path / "c").rglob(".tmp-*"))


def test_the_copy_comes_before_the_temp_copy_of_a_remote_blob(tmp_path):
    """A budget that holds the copy but not the copy and the blob: the
    layer still gets its whole copy."""
    files, tar, blob = remote_gzip(tmp_path)
    cache = IndexCache(tmp_path / "c", size=len(tar) + (64 << 10))
    with open_layer(blob, cache=cache) as layer:
        assert layer.storage == "copy" and read_all(layer) == files
    assert cache.usage() <= cache.budget
    assert not list((tmp_path / "c").rglob(".tmp-*"))


FORMS = [("none", None, "blob"), ("gzip", 100, "copy"), ("zstd", 100, "copy"),
         ("gzip", 0.5, "checkpoints"), ("zstd", 0.7, "spans"),
         ("gzip", 0.02, "stream"), ("zstd", 0.02, "stream"),
         ("zstd-frames", 0.1, "frames")]


@pytest.mark.parametrize("kind,share,form", FORMS)
def test_byte_exact_reads_at_every_span_boundary_in_every_form(tmp_path, kind, share,
                                                               form, monkeypatch):
    spacing = 2 * SPAN if form == "checkpoints" else SPAN
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(spacing))
    rng = random.Random(9)
    words = [rng.randbytes(3).hex().encode() for _ in range(50)]
    files = {f"f{i}": (rng.randbytes(40_000) if form == "checkpoints" else
                       b" ".join(rng.choices(words, k=8000))[:40_000]) for i in range(40)}
    tar = make_tar(files)
    path = write(tmp_path, kind, files)
    size = None if share is None else int(len(tar) * share)
    with open_layer(path, cache=IndexCache(tmp_path / "c", size=size)) as layer:
        assert layer.storage == form
        for boundary in range(0, len(tar) + 1, spacing):
            for offset in {max(0, boundary - 5), boundary, min(len(tar) - 1, boundary + 5)}:
                length = min(11, len(tar) - offset)
                assert layer._pread(length, offset) == tar[offset:offset + length], offset
        assert read_all(layer) == files


@pytest.mark.parametrize("damage", ["truncated", "table length beyond the file"])
def test_a_damaged_spans_file_is_not_trusted(tmp_path, damage):
    path = tmp_path / "s"
    with open(path, "w+b") as file:
        writer = SpanWriter(file, span=SPAN)
        writer.write(b"x" * (3 * SPAN))
        writer.finish()
    with open(path, "r+b") as file:
        if damage == "truncated":
            file.truncate(os.path.getsize(path) - 3)
        else:          # the trailer's length field (its first 8 bytes)
            file.seek(-16, os.SEEK_END)
            file.write((1 << 40).to_bytes(8, "little"))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(InvalidLayerError):
            SpanReader(fd, 3 * SPAN, "s")
    finally:
        os.close(fd)


# -- budget: whole copy while it fits, spans beyond -----------------------------

@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_layer_beyond_the_budget_is_read_through_spans(tmp_path, kind):
    files = corpus()
    path = write(tmp_path, kind, files)
    tar_size = len(make_tar(files))
    cache = IndexCache(tmp_path / "c", size=tar_size * 7 // 10)   # spans: about half
    with open_layer(path, cache=cache) as layer:
        assert layer.storage in LAZY.values()
        assert read_all(layer) == files
        assert layer.extent(layer.entries[0].data, 10, 0, 10) is None
    assert cache.usage() <= cache.budget
    with open_layer(path, cache=cache) as again:        # from the cache
        assert again.storage == layer.storage
        assert read_all(again) == files
    big = IndexCache(tmp_path / "c2", size=10 * tar_size)
    with open_layer(path, cache=big) as whole:
        assert whole.storage == "copy"
        assert read_all(whole) == files


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_layer_that_declares_a_size_beyond_the_budget_writes_no_partial_copy(tmp_path,
                                                                               kind):
    """Its gzip trailer or zstd frame header says the copy cannot fit: a
    partial copy would only crowd out layers indexed beside it (which then
    fall back to reading from the blob), so none is started."""
    files = corpus(5)
    path = write(tmp_path, kind, files)
    cache = IndexCache(tmp_path / "c", size=len(make_tar(files)) // 2)
    copy_bytes = []
    real_reserve = cache.reserve

    def watching(n, keep="", ahead=0):
        blobs = tmp_path / "c" / "blobs"
        copy_bytes.append(sum(f.stat().st_size for f in blobs.rglob("*") if f.is_file())
                          if blobs.exists() else 0)
        return real_reserve(n, keep, ahead)

    cache.reserve = watching
    with open_layer(path, cache=cache) as layer:
        assert layer.storage in LAZY.values()
        assert read_all(layer) == files
    assert copy_bytes and max(copy_bytes) == 0


class CountingFile(FileRange):
    bytes_read = 0

    def read_at(self, offset, length):
        data = super().read_at(offset, length)
        self.bytes_read += len(data)
        return data


def test_a_multi_frame_zstd_layer_is_read_through_its_frames(tmp_path):
    files = corpus(12, 40)
    tar = make_tar(files)
    path = write(tmp_path, "zstd-frames", files)
    cache = IndexCache(tmp_path / "c", size=len(tar) // 10)
    counting = CountingFile(path)          # a local file: read with no chunk checks
    with open_layer(counting, cache=cache) as layer:
        assert layer.storage == "frames"
        before = counting.bytes_read
        entry = [e for e in layer.entries if e.path == "/d0/f0"][0]
        assert layer.read(entry.data, entry.size, 0, entry.size) == files["d0/f0"]
        assert counting.bytes_read - before <= 2 * 100_000 + 1000    # a frame or two
        assert read_all(layer) == files
    assert [e.kind for e in cache.scan() if e.evictable] == ["frames"]
    with open_layer(path, cache=cache) as again:
        assert again.storage == "frames" and read_all(again) == files


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_bomb_under_a_small_budget_never_writes_more_than_the_budget(tmp_path, kind):
    tar = make_tar({"zeros": bytes(64 << 20), "tail": b"end"})
    path = tmp_path / f"bomb.{kind}"
    path.write_bytes(compress(kind, tar))
    budget = 1 << 20
    cache = IndexCache(tmp_path / "c", size=budget)
    peak = watch_usage(cache)
    with open_layer(path, cache=cache) as layer:
        assert layer.storage == "spans"     # smaller than checkpoints for a bomb
        tail = [e for e in layer.entries if e.path == "/tail"][0]
        assert layer.read(tail.data, tail.size, 0, 10) == b"end"
        zeros = [e for e in layer.entries if e.path == "/zeros"][0]
        assert layer.read(zeros.data, zeros.size, (32 << 20) - 5, 10) == bytes(10)
    assert max(peak) <= budget
    assert cache.usage() <= budget


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_max_layer_size_refuses_naming_the_layer(tmp_path, kind):
    path = tmp_path / f"bomb.{kind}"
    path.write_bytes(compress(kind, make_tar({"zeros": bytes(8 << 20)})))
    with pytest.raises(InvalidLayerError, match="exceeds the limit") as info:
        open_layer(path, label="the-bomb", max_size=1 << 20)
    assert "the-bomb" in str(info.value)


def test_max_layer_size_option_gives_one_line_error(tmp_path, capsys):
    path = tmp_path / "bomb.zst"
    path.write_bytes(compress("zstd", make_tar({"zeros": bytes(8 << 20)})))
    code = cli.main(["ls", "--layer", str(path), "--max-layer-size", "1M", "/"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "exceeds the limit" in err and "bomb.zst" in err
    os.environ.pop("LAYERFS_MAX_LAYER_SIZE", None)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_budget_too_small_even_for_spans_reads_from_the_blob(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(4 << 20))   # checkpoints too big too
    monkeypatch.setattr(seekpoints, "KEEP", SPAN)   # less than the layer kept behind
    monkeypatch.setattr(seekpoints, "_recent", seekpoints._RecentSpans(0))   # and in memory
    files = corpus()
    path = write(tmp_path, kind, files)
    cache = IndexCache(tmp_path / "c", size=len(make_tar(files)) // 40)
    with open_layer(path, cache=cache) as layer:
        assert layer.storage == "stream"
        assert read_all(layer) == files              # forward: one decoder
        assert layer._data.restarts == 1
        assert read_all(layer) == files              # again: starts over once
        assert layer._data.restarts == 2
    assert cache.usage() <= cache.budget
    assert not list((tmp_path / "c").rglob(".tmp-*"))
    with open_layer(path, cache=cache) as again:     # from the index, not indexed again
        assert again.storage == "stream" and again._entries is None
        assert read_all(again) == files


class ChangingBlob(BytesBlob):
    """A blob source whose bytes can change after indexing (a registry
    whose storage rots, a man in the middle)."""

    def flip(self, offset):
        data = bytearray(self._data)
        data[offset] ^= 0xFF
        self._data = bytes(data)


def test_ranged_rereads_of_a_non_local_blob_are_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(1 << 20))
    monkeypatch.setattr(VerifiedBlob, "KEEP", 1)     # nothing stays in memory long
    rng = random.Random(3)
    files = {f"f{i}": rng.randbytes(200_000) for i in range(40)}
    blob = ChangingBlob(compress("gzip", make_tar(files)), label="remote-ish")
    cache = IndexCache(tmp_path / "c", size=2 << 20)
    with open_layer(blob, cache=cache) as layer:
        assert layer.storage == "checkpoints"
        # (what was read and verified before may stay in memory: flip first)
        blob.flip(blob.size // 2)
        with pytest.raises(DigestMismatchError, match="checksum"):
            read_all(layer)


# -- eviction and pins ------------------------------------------------------------

def test_least_recently_used_unpinned_copy_is_evicted(tmp_path):
    files_a, files_b = corpus(1, 20), corpus(2, 20)
    a, b = write(tmp_path, "zstd", files_a, "a"), write(tmp_path, "zstd", files_b, "b")
    size = max(len(make_tar(files_a)), len(make_tar(files_b)))
    cache = IndexCache(tmp_path / "c", size=int(size * 1.6))
    with open_layer(a, cache=cache) as layer_a:
        assert layer_a.storage == "copy"
        digest_a = layer_a.digest
    with open_layer(b, cache=cache) as layer_b:
        assert layer_b.storage == "copy"       # a was evicted to make room
        assert read_all(layer_b) == files_b
    copies = [e.digest for e in cache.scan() if e.kind == "copy"]
    assert digest_a not in copies


def test_eviction_never_takes_what_an_open_layer_reads(tmp_path):
    files_a, files_b = corpus(1, 20), corpus(2, 20)
    a, b = write(tmp_path, "gzip", files_a, "a"), write(tmp_path, "gzip", files_b, "b")
    size = max(len(make_tar(files_a)), len(make_tar(files_b)))
    cache = IndexCache(tmp_path / "c", size=int(size * 1.6))
    with open_layer(a, cache=cache) as layer_a:
        assert layer_a.storage == "copy"
        with open_layer(b, cache=cache) as layer_b:
            assert layer_b.storage != "copy"    # a is pinned: b must make do
            assert read_all(layer_b) == files_b
            assert read_all(layer_a) == files_a
        assert cache.usage() <= cache.budget
        assert any(e.kind == "copy" and e.pinned for e in cache.scan())


def test_prune_keeps_pinned_entries_unless_forced(tmp_path, capsys):
    files = corpus(3, 10)
    path = write(tmp_path, "zstd", files)
    root = tmp_path / "c"
    cache = IndexCache(root)
    with open_layer(path, cache=cache) as layer:
        assert cli.main(["cache", "--cache-dir", str(root), "prune", "--all"]) == 0
        assert "pinned" in capsys.readouterr().out
        assert [e.kind for e in cache.scan() if e.kind == "copy"] == ["copy"]
        assert cli.main(["cache", "--cache-dir", str(root), "prune", "--all", "--force"]) == 0
        assert list(cache.scan()) == []
        assert read_all(layer) == files          # the open descriptor still reads
    with open_layer(path, cache=cache) as again:    # rebuilt
        assert read_all(again) == files


def test_prune_while_a_filesystem_reads(tmp_path):
    """A running reader (a mount does the same through layerfs.open) keeps
    its data through a prune, forced or not; stale pins go with --all."""
    files = corpus(4, 20)
    path = write(tmp_path, "gzip", files)
    root = tmp_path / "c"
    other = write(tmp_path, "zstd", corpus(5, 5), "other")
    with open_layer(other, cache=IndexCache(root)):
        pass                                   # leaves an unheld pin file
    with layerfs.open(str(path), cache=str(root)) as fs:
        names = sorted(files)
        for number, name in enumerate(names):
            if number == 3:
                assert cli.main(["cache", "--cache-dir", str(root), "prune"]) == 0
            if number == 6:
                assert cli.main(["cache", "--cache-dir", str(root), "prune", "--all"]) == 0
                assert len(list((root / "pins").iterdir())) == 1    # only the held one
            if number == 9:
                assert cli.main(["cache", "--cache-dir", str(root), "prune", "--all",
                                 "--force"]) == 0
            assert fs.read_bytes("/" + name) == files[name]


def test_a_budget_given_is_used_even_where_it_cannot_be_recorded(tmp_path, monkeypatch):
    from layerfs import cache as cache_module

    def read_only(path, payload):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(cache_module, "write_atomic", read_only)
    cache = IndexCache(tmp_path / "ro", size="3M")
    assert cache.budget == 3 << 20
    assert not (tmp_path / "ro" / "cache.json").exists()


def test_prune_keep_and_older_than(tmp_path):
    cache = IndexCache(tmp_path / "c")
    for seed in range(3):
        with open_layer(write(tmp_path, "gzip", corpus(seed, 10), f"l{seed}"), cache=cache):
            pass
    entries = list(cache.scan())
    copies = sorted((e for e in entries if e.kind == "copy"), key=lambda e: e.last_use)
    keep = sum(e.size for e in entries) - copies[0].size
    chosen = cachecli.select(entries, all_=False, older_than=None, keep=keep)
    assert chosen == [copies[0]]
    assert cachecli.select(entries, all_=False, older_than=3600, keep=None,
                           now=max(e.last_use for e in entries) + 10) == []
    assert len(cachecli.select(entries, all_=False, older_than=1, keep=None,
                               now=max(e.last_use for e in entries) + 10)) == len(entries)


def test_cache_ls_json_and_path(tmp_path, capsys):
    root = tmp_path / "c"
    with open_layer(write(tmp_path, "gzip", corpus(1, 5)), cache=IndexCache(root)):
        pass
    assert cli.main(["cache", "--cache-dir", str(root), "ls", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {e["kind"] for e in listing["entries"]} == {"copy", "index"}
    assert listing["used"] == sum(e["size"] for e in listing["entries"])
    assert cli.main(["cache", "--cache-dir", str(root), "path"]) == 0
    assert capsys.readouterr().out.strip() == str(root)
    assert cli.main(["cache", "--cache-dir", str(root), "prune", "--keep", "lots"]) == 2


# -- crash safety and several processes --------------------------------------------

def test_a_killed_writer_leaves_nothing_trusted(tmp_path):
    root = tmp_path / "c"
    path = tmp_path / "big.gz"
    path.write_bytes(compress("gzip", make_tar({"r": random.Random(5).randbytes(24 << 20)})))
    script = textwrap.dedent(f"""
        import sys
        from layerfs import layer
        from layerfs.cache import IndexCache
        real = layer._DataSink.write
        count = [0]
        def write(self, chunk):
            real(self, chunk)
            count[0] += 1
            if count[0] == 3:
                print("writing", flush=True)
                sys.stdin.readline()
        layer._DataSink.write = write
        layer.open_layer({str(path)!r}, cache=IndexCache({str(root)!r}))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        temps = [p for p in root.rglob(".tmp-*")]
        assert temps                       # a copy in progress, under a temp name
        cache = IndexCache(root)
        assert [e.kind for e in cache.scan()] == ["temp"]   # counted, not trusted
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    cache = IndexCache(root)
    for temp in temps:                     # as if older than the grace period
        os.utime(temp, (1, 1))
    assert list(cache.scan()) == []
    assert not list(root.rglob(".tmp-*"))
    with open_layer(path, cache=cache) as layer:
        assert layer.entry_count == 1


def test_two_processes_share_the_cache(tmp_path):
    root = tmp_path / "c"
    files = corpus(7, 30)
    paths = [write(tmp_path, kind, files, f"l-{kind}") for kind in ("gzip", "zstd")]
    script = textwrap.dedent(f"""
        import hashlib, sys
        from layerfs.layer import open_layer
        from layerfs.cache import IndexCache
        out = []
        for _ in range(3):
            for path in {[str(p) for p in paths]!r}:
                with open_layer(path, cache=IndexCache({str(root)!r})) as layer:
                    for e in layer.entries:
                        out.append(hashlib.sha256(layer.read(e.data, e.size, 0, e.size)).hexdigest())
        print(hashlib.sha256("".join(out).encode()).hexdigest())
    """)
    env = dict(os.environ, LAYERFS_CACHE_SIZE=str(len(make_tar(files)) * 5 // 2))
    children = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 text=True, env=env) for _ in range(2)]
    outputs = [child.communicate(timeout=120)[0].strip() for child in children]
    assert all(child.returncode == 0 for child in children)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 64
    cache = IndexCache(root)
    assert cache.usage() <= cache.budget
    assert not list(root.rglob(".tmp-*"))


def test_file_range_checks_its_range(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with FileRange(path, 2, 5) as blob:
        assert blob.read_at(0, 100) == b"23456"
        assert blob.read_at(5, 1) == b""
        assert blob.extent(1, 100)[1:] == (3, 4)
    with pytest.raises(InvalidLayerError):
        FileRange(path, 8, 5)


def test_room_ahead_is_evicted_for_only_where_the_budget_can_hold_it(tmp_path):
    cache = IndexCache(tmp_path, size=64 * 4096)

    def copy(name, blocks, last_use):
        path = cache.blob_path(name * 64)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as stream:
            stream.write(b"x" * blocks * 4096)
        os.utime(path, (last_use, last_use))
        return path

    old, new = copy("a", 20, 1), copy("b", 20, 2)      # evictable, unpinned
    assert cache.reserve(8 * 4096, ahead=8 * 4096) == 16 * 4096    # fits as it is
    assert cache.reserve(8 * 4096, ahead=24 * 4096) == 32 * 4096   # evicts the older
    assert not os.path.exists(old) and os.path.exists(new)
    assert cache.reserve(8 * 4096, ahead=100 * 4096) == 8 * 4096   # never fits: asks 8
    assert os.path.exists(new)                         # and evicts nothing for it
    assert cache.reserve(65 * 4096) == 0
