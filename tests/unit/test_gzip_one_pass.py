"""Gzip checkpoints built by the indexing pass itself (issue 12, item 1):
rapidgzip as the pass's decoder, reading the blob once through
``compression._ForwardFile``; its checks, the layer forms it leads to, and
what is trusted when (layerfs/compression.py, layer.py, seekpoints.py)."""

import gzip
import io
import os
import random

import pytest

from layerfs import compression
from layerfs.blobsource import BytesBlob, CountingBlob, FileRange
from layerfs.cache import IndexCache
from layerfs.compression import BlobStream
from layerfs.errors import DigestMismatchError, InvalidLayerError
from layerfs.layer import open_layer
from layerfs.seekpoints import GzipCheckpointReader, write_gzip_index
from layer_data import make_tar

SPACING = 64 << 10
LAYER_SPACING = 256 << 10      # 32 KiB a checkpoint: less than the blob of text_files()
PAYLOAD = random.Random(1).randbytes(300_000) + b"x" * 2_000_000


def stream(blob: bytes, **kwargs) -> BlobStream:
    return BlobStream(BytesBlob(blob, label="blob"), gzip_checkpoints=SPACING, **kwargs)


def read_all(stream: BlobStream) -> bytes:
    try:
        parts = []
        while data := stream.read(100_000):
            parts.append(data)
        stream.drain()
        return b"".join(parts)
    finally:
        stream.close()


def text_files(seed=3, count=60) -> dict:
    """Files of words (about 3:1 in gzip) and a few random ones."""
    rng = random.Random(seed)
    words = [rng.randbytes(3).hex().encode() for _ in range(300)]
    return {f"d/f{i}": (rng.randbytes(50_000) if i % 5 == 0 else
                        b" ".join(rng.choices(words, k=12_000))[:60_000 + i])
            for i in range(count)}


# -- the decoder: what zlib checked, rapidgzip checks ---------------------------

@pytest.mark.parametrize("members", [1, 3])
def test_the_stream_and_its_hashes_are_zlibs(members):
    cuts = [len(PAYLOAD) * i // members for i in range(members + 1)]
    blob = b"".join(gzip.compress(PAYLOAD[a:b]) for a, b in zip(cuts, cuts[1:]))
    with_index, plain = stream(blob), BlobStream(BytesBlob(blob, label="blob"))
    assert read_all(with_index) == PAYLOAD == read_all(plain)
    assert (with_index.digest, with_index.diff_id, with_index.uncompressed_size) == \
        (plain.digest, plain.diff_id, plain.uncompressed_size)
    assert with_index.has_gzip_index and not plain.has_gzip_index


def corrupt(offset_from: str, flip: int = 1) -> bytes:
    blob = bytearray(gzip.compress(PAYLOAD))
    at = {"crc": -8, "length": -2, "data": len(blob) // 2}[offset_from]
    blob[at] ^= flip
    return bytes(blob)


@pytest.mark.parametrize("blob, message", [
    (corrupt("crc"), "corrupt gzip"),
    (corrupt("length"), "corrupt gzip"),
    (corrupt("data", 0x55), "corrupt gzip"),
    (gzip.compress(PAYLOAD) + b"junk after", "corrupt gzip"),
    (gzip.compress(PAYLOAD) + b"\0\0junk", "corrupt gzip"),
    (gzip.compress(PAYLOAD)[:20], "truncated"),
    (gzip.compress(PAYLOAD)[:5000], "truncated"),
    (gzip.compress(PAYLOAD)[:-9], "truncated"),
    (gzip.compress(PAYLOAD)[:-3], "corrupt gzip"),
])
def test_a_bad_stream_is_one_line_naming_the_blob(blob, message):
    with pytest.raises(InvalidLayerError, match=message) as caught:
        read_all(stream(blob))
    assert "blob" in str(caught.value) and "\n" not in str(caught.value)


def test_zlib_agrees_those_streams_are_bad():
    for blob in (corrupt("crc"), gzip.compress(PAYLOAD)[:-9]):
        with pytest.raises(InvalidLayerError):
            read_all(BlobStream(BytesBlob(blob, label="blob")))


def test_the_bomb_limit_holds():
    with pytest.raises(InvalidLayerError, match="exceeds the limit"):
        read_all(stream(gzip.compress(bytes(3 << 20)), max_size=1 << 20))


def test_every_blob_byte_is_read_once_and_hashed():
    blob = gzip.compress(PAYLOAD)
    counting = CountingBlob(BytesBlob(blob, label="blob"))
    s = BlobStream(counting, gzip_checkpoints=SPACING, chunk_sums=True)
    read_all(s)
    assert counting.bytes_read == len(blob) + 4       # and the 4-byte sniff
    assert s.digest == compression.hashlib.sha256(blob).hexdigest()


# -- the forward file -------------------------------------------------------------

def forward_file(data: bytes, keep: int):
    raw = compression._RawInput(BytesBlob(data, label="blob"), None)
    return raw, compression._ForwardFile(raw, keep, "blob")


def test_the_forward_file_serves_reads_back_within_what_it_keeps():
    data = bytes(range(256)) * 1000
    raw, file = forward_file(data, keep=1000)
    buffer = bytearray(600)
    assert file.seek(0, io.SEEK_END) == len(data) and raw.done == 0
    file.seek(0)
    assert file.readinto(buffer) == 600 and buffer == data[:600]
    file.seek(100)
    assert file.readinto(buffer) == 500 and buffer[:500] == data[100:600]  # kept, short
    file.seek(5000)                               # forward: read through, hashed
    assert file.readinto(buffer) == 600 and buffer == data[5000:5600]
    assert raw.done == 5600
    file.seek(0)                                  # a seek anywhere is fine (close does it)
    with pytest.raises(InvalidLayerError, match="beyond the 1000 bytes"):
        file.readinto(buffer)                     # a read behind what is kept is not


# -- layers ----------------------------------------------------------------------

@pytest.fixture
def spacing(monkeypatch):
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(LAYER_SPACING))


@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_layer_beyond_the_budget_is_read_once_and_reads_exactly_at_checkpoints(
        tmp_path, spacing, where):
    files = text_files()
    tar = make_tar(files)
    blob_bytes = gzip.compress(tar, 6)
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(blob_bytes)
    blob = CountingBlob(FileRange(path) if where == "local"
                        else BytesBlob(blob_bytes, label="remote"))
    cache = IndexCache(tmp_path / "c", size=len(tar) * 3 // 4)
    with open_layer(blob, cache=cache) as layer:
        assert layer.storage == "checkpoints"
        # the pass and a few bytes of sniffs; the reader reads the head of
        # a local file again (of a remote one: the pass kept it)
        head = (1 << 20) if where == "local" else 0
        assert len(blob_bytes) <= blob.bytes_read <= len(blob_bytes) + head + 64
        for boundary in range(0, len(tar), LAYER_SPACING):
            for offset in (max(0, boundary - 3), boundary, boundary + 1):
                assert layer.read_data(offset, 9) == tar[offset:offset + 9]
        for entry in layer.entries:
            assert layer.read(entry.data, entry.size, 0, entry.size) == \
                files[entry.path[1:]]
    assert cache.usage() <= cache.budget
    assert not list((tmp_path / "c").rglob(".tmp-*"))


def test_nothing_is_kept_from_a_blob_whose_digest_does_not_match(tmp_path, spacing):
    tar = make_tar(text_files())
    blob = BytesBlob(gzip.compress(tar), label="remote")
    cache = IndexCache(tmp_path / "c", size=blob.size // 2)
    with pytest.raises(DigestMismatchError):
        open_layer(blob, cache=cache, digest="sha256:" + "0" * 64)
    kept = [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert not [name for name in kept if name.endswith((".gzidx", ".idx")) or
                name.startswith(".tmp-")]


def test_a_padded_blob_keeps_zlib_and_its_padding(tmp_path, spacing):
    """rapidgzip refuses zero padding; the pass does not give it any."""
    files = text_files()
    tar = make_tar(files)
    blob = gzip.compress(tar) + bytes(1000)
    cache = IndexCache(tmp_path / "c", size=len(tar) * 3 // 4)
    with open_layer(BytesBlob(blob, label="remote"), cache=cache) as layer:
        assert layer.storage == "checkpoints"
        assert {e.path[1:]: layer.read(e.data, e.size, 0, e.size)
                for e in layer.entries} == files


def test_checkpoints_written_by_the_pass_are_trusted_only_whole(tmp_path):
    data = PAYLOAD
    blob = BytesBlob(gzip.compress(data), label="blob")
    s = BlobStream(blob, gzip_checkpoints=SPACING)
    read_all_but_open(s)
    path = tmp_path / "x.gzidx"
    with open(path, "wb") as file:
        write_gzip_index(s.export_gzip_index, blob.size, len(data), file)
    s.close()
    whole = path.read_bytes()
    for cut in (len(whole) - 1, len(whole) // 2):
        path.write_bytes(whole[:cut])
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(InvalidLayerError, match="unusable gzip checkpoints"):
                GzipCheckpointReader(fd, blob, len(data), "blob")
        finally:
            os.close(fd)
    path.write_bytes(whole)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = GzipCheckpointReader(fd, blob, len(data), "blob")
    finally:
        os.close(fd)
    try:
        for offset in (0, SPACING - 1, 5 * SPACING, len(data) - 4):
            assert reader.read_at(offset, 4096) == data[offset:offset + 4096]
    finally:
        reader.close()


def read_all_but_open(s: BlobStream) -> None:
    while s.read(1 << 20):
        pass
    s.drain()



TEXT_TAR = make_tar(text_files())     # 3.5 MB, 1.5 MB in gzip


@pytest.mark.parametrize("blob_bytes, budget, expected", [
    (gzip.compress(bytes(4 << 20)), 1 << 20, None),         # a bomb: spans
    (gzip.compress(TEXT_TAR), 64 << 10, None),              # not even checkpoints fit
    (gzip.compress(TEXT_TAR) + bytes(100), 1 << 20, None),  # padding: no length
    (gzip.compress(TEXT_TAR), 1 << 20, LAYER_SPACING),
    (gzip.compress(TEXT_TAR), 8 << 20, None),               # the copy may fit
])
def test_which_blobs_the_pass_builds_checkpoints_for(tmp_path, spacing, blob_bytes,
                                                     budget, expected):
    from layerfs.layer import _DataSink
    cache = IndexCache(tmp_path / "c", size=budget)
    sink = _DataSink(cache, "blob", False, "gzip", BytesBlob(blob_bytes, label="blob"))
    try:
        assert sink.pass_checkpoints() == expected
    finally:
        sink.abort()
