"""layerfs.rangestore: verified chunks of a blob kept on disk within the
cache budget, shared by every reader of the cache, checked on every load."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random

import pytest

from layerfs.blobsource import BytesBlob, CountingBlob, VerifiedBlob
from layerfs.cache import IndexCache
from layerfs.errors import DigestMismatchError

CHUNK = 64 << 10


def make_blob(seed: int, size: int = 10 * CHUNK + 123) -> tuple[bytes, str, bytes]:
    data = random.Random(seed).randbytes(size)
    sums = b"".join(hashlib.sha256(data[i:i + CHUNK]).digest()
                    for i in range(0, size, CHUNK))
    return data, "sha256:" + hashlib.sha256(data).hexdigest(), sums


def reader(cache, data, digest, sums) -> tuple[VerifiedBlob, CountingBlob]:
    counting = CountingBlob(BytesBlob(data, digest=digest, label="test"))
    blob = VerifiedBlob(counting, sums, CHUNK)
    blob.keep_in(cache)
    return blob, counting


def ranges_entries(cache) -> list:
    return [e for e in cache.scan() if e.kind == "ranges"]


def test_a_second_reader_reads_kept_chunks_from_disk(tmp_path):
    data, digest, sums = make_blob(1)
    cache = IndexCache(tmp_path, size=1 << 30)
    first, counting = reader(cache, data, digest, sums)
    assert first.read_at(CHUNK - 10, 3 * CHUNK) == data[CHUNK - 10:4 * CHUNK - 10]
    assert first.read_at(len(data) - 50, 100) == data[-50:]       # the short last chunk
    assert counting.bytes_read == 4 * CHUNK + len(data) % CHUNK
    second, counting = reader(IndexCache(tmp_path), data, digest, sums)
    assert second.read_at(CHUNK - 10, 3 * CHUNK) == data[CHUNK - 10:4 * CHUNK - 10]
    assert second.read_at(len(data) - 50, 100) == data[-50:]
    assert counting.bytes_read == 0 and second.store.loaded == 5
    assert second.read_at(5 * CHUNK, 10) == data[5 * CHUNK:5 * CHUNK + 10]   # a hole
    assert counting.bytes_read == CHUNK
    [entry] = ranges_entries(cache)
    assert entry.evictable and entry.size >= 5 * CHUNK + 123


def test_a_damaged_chunk_on_disk_is_fetched_again_and_rewritten(tmp_path):
    data, digest, sums = make_blob(2)
    cache = IndexCache(tmp_path, size=1 << 30)
    reader(cache, data, digest, sums)[0].read_at(0, 2 * CHUNK)
    with open(cache.ranges_path(digest[7:]), "r+b") as handle:
        handle.seek(CHUNK + 7)
        handle.write(b"\xff\xfe")            # a torn or tampered write
    again, counting = reader(cache, data, digest, sums)
    assert again.read_at(0, 2 * CHUNK) == data[:2 * CHUNK]
    assert counting.bytes_read == CHUNK
    third, counting = reader(cache, data, digest, sums)
    assert third.read_at(0, 2 * CHUNK) == data[:2 * CHUNK] and counting.bytes_read == 0


def test_a_source_that_changed_is_refused_and_nothing_is_kept(tmp_path):
    data, digest, sums = make_blob(3)
    cache = IndexCache(tmp_path, size=1 << 30)
    changed = bytearray(data)
    changed[10] ^= 1
    blob, _ = reader(cache, bytes(changed), digest, sums)
    with pytest.raises(DigestMismatchError):
        blob.read_at(0, 100)
    assert not os.path.exists(cache.ranges_path(digest[7:]))


def test_chunks_beyond_the_budget_are_not_kept(tmp_path):
    data, digest, sums = make_blob(4)
    budget = 3 * CHUNK + 4096
    cache = IndexCache(tmp_path, size=budget)
    blob, _ = reader(cache, data, digest, sums)
    assert blob.read_at(0, len(data)) == data
    assert cache.usage() <= budget
    assert 0 < blob.store.saved < len(sums) // 32


def test_room_is_made_by_evicting_the_least_recently_used_unpinned_ranges(tmp_path):
    cache = IndexCache(tmp_path, size=12 * CHUNK)
    blobs = [make_blob(seed, 5 * CHUNK) for seed in (5, 6, 7)]
    a, b, c = (reader(cache, *blob)[0] for blob in blobs)
    pin = cache.pin(blobs[0][1][7:])          # a is open elsewhere
    a.read_at(0, 5 * CHUNK)
    b.read_at(0, 5 * CHUNK)
    os.utime(cache.ranges_path(blobs[1][1][7:]), (1, 1))     # b used long ago
    c.read_at(0, 5 * CHUNK)                   # no room for all three: b goes
    kept = {e.digest for e in ranges_entries(cache)}
    assert kept == {blobs[0][1], blobs[2][1]}
    assert cache.usage() <= 12 * CHUNK
    pin.release()


def _fill(root: str, seed: int, order: int) -> None:
    data, digest, sums = make_blob(seed, 40 * CHUNK)
    blob, _ = reader(IndexCache(root), data, digest, sums)
    indexes = list(range(40))
    random.Random(order).shuffle(indexes)
    for index in indexes:
        assert blob.read_at(index * CHUNK, CHUNK) == data[index * CHUNK:(index + 1) * CHUNK]


def test_several_processes_fill_the_same_blob_at_once(tmp_path):
    IndexCache(tmp_path, size=1 << 30)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_fill, args=(str(tmp_path), 8, order))
               for order in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    data, digest, sums = make_blob(8, 40 * CHUNK)
    blob, counting = reader(IndexCache(tmp_path), data, digest, sums)
    assert blob.read_at(0, len(data)) == data
    assert counting.bytes_read == 0


def test_small_ranges_are_counted_by_the_blocks_they_take(tmp_path):
    """A TOC layer's chunks may be a few bytes each, far apart: each takes a
    whole disk block, and that is what the budget counts."""
    from layerfs.rangestore import RangeStore
    budget = 64 << 10
    cache = IndexCache(tmp_path, size=budget)
    store = RangeStore(cache, "ab" * 32, 100 << 20, CHUNK)
    kept = sum(store.save_range(position, b"x" * 50)
               for position in range(4000, 100 << 20, 1 << 20))    # straddles blocks
    assert 0 < kept < 100
    assert cache.usage() <= budget
    assert store.load_range(4000, 50) == b"x" * 50
    assert store.load_range(4000 + (99 << 20), 50) is None


def test_cache_prune_removes_kept_ranges_but_not_those_of_an_open_layer(tmp_path):
    import subprocess
    import sys
    cache = IndexCache(tmp_path, size=1 << 30)
    kept = [make_blob(seed) for seed in (9, 10)]
    for blob in kept:
        reader(cache, *blob)[0].read_at(0, 3 * CHUNK)
    pin = cache.pin(kept[0][1][7:])             # the first is open elsewhere
    done = subprocess.run([sys.executable, "-m", "layerfs.cli", "cache", "--cache-dir",
                           str(tmp_path), "prune"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "1 pinned entries kept" in done.stdout
    assert {e.digest for e in ranges_entries(cache)} == {kept[0][1]}
    pin.release()
    again, counting = reader(cache, *kept[1])    # pruned: fetched again, and kept again
    assert again.read_at(0, CHUNK) == kept[1][0][:CHUNK] and counting.bytes_read == CHUNK


def test_room_for_chunks_is_asked_of_the_cache_ahead_not_per_chunk(tmp_path):
    cache = IndexCache(tmp_path, size=1 << 30)
    asked = []
    reserve = cache.reserve
    cache.reserve = lambda n, keep="", ahead=0: asked.append(n) or reserve(n, keep, ahead)
    data, digest, sums = make_blob(9, 64 * CHUNK)
    blob, _ = reader(cache, data, digest, sums)
    assert blob.read_at(0, len(data)) == data
    assert asked == [CHUNK]             # one scan of the cache for 64 chunks, not 64
