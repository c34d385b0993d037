import gzip
import hashlib
import os
import random
import zlib

import pytest
import zstandard

from layerfs import compression
from layerfs.compression import BlobStream, detect_compression, max_layer_size
from layerfs.errors import InvalidLayerError

PAYLOAD = random.Random(1).randbytes(300_000) + b"x" * 200_000


def _stream(tmp_path, blob, *, offset=0, prefix=b"", suffix=b"", **kwargs):
    path = tmp_path / "blob"
    path.write_bytes(prefix + blob + suffix)
    fd = os.open(path, os.O_RDONLY)
    return fd, BlobStream(fd, size=len(blob), offset=len(prefix), label="blob", **kwargs)


def _read_all(stream, step=4096):
    parts = []
    while True:
        data = stream.read(step)
        if not data:
            break
        parts.append(data)
    stream.drain()
    return b"".join(parts)


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_detect_compression_by_magic_only():
    assert detect_compression(b"\x1f\x8b\x08\x00") == "gzip"
    assert detect_compression(b"\x28\xb5\x2f\xfd") == "zstd"
    assert detect_compression(b"ustar") == "none"
    assert detect_compression(b"") == "none"
    assert detect_compression(b"\x1f") == "none"


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_round_trip_hashes_and_sink(tmp_path, kind):
    blob = {"none": PAYLOAD, "gzip": gzip.compress(PAYLOAD),
            "zstd": zstandard.ZstdCompressor().compress(PAYLOAD)}[kind]
    copy = []
    fd, stream = _stream(tmp_path, blob, prefix=b"HEAD" * 100, suffix=b"TAIL",
                         sink=copy.append)
    try:
        assert stream.compression == kind
        assert _read_all(stream) == PAYLOAD
        assert b"".join(copy) == PAYLOAD
        assert stream.digest == _sha(blob)
        assert stream.diff_id == _sha(PAYLOAD)
        assert stream.uncompressed_size == len(PAYLOAD)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_read_skip_tell_across_chunk_boundaries(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(compression, "CHUNK", 1000)
    blob = {"none": PAYLOAD, "gzip": gzip.compress(PAYLOAD),
            "zstd": zstandard.ZstdCompressor().compress(PAYLOAD)}[kind]
    fd, stream = _stream(tmp_path, blob)
    rng = random.Random(7)
    pos = 0
    try:
        while pos < len(PAYLOAD):
            n = rng.choice([1, 511, 512, 999, 1000, 1001, 4096, 20_000])
            if rng.random() < 0.5:
                assert stream.read(n) == PAYLOAD[pos:pos + n]
            else:
                assert stream.skip(n) == min(n, len(PAYLOAD) - pos)
            pos = min(pos + n, len(PAYLOAD))
            assert stream.tell() == pos
        assert stream.read(10) == b""
        assert stream.skip(10) == 0
        stream.drain()
        assert stream.diff_id == _sha(PAYLOAD)
    finally:
        os.close(fd)


def test_multi_member_gzip_and_zero_padding(tmp_path):
    blob = gzip.compress(PAYLOAD[:1000]) + gzip.compress(PAYLOAD[1000:]) + b"\0" * 5000
    fd, stream = _stream(tmp_path, blob)
    try:
        assert _read_all(stream) == PAYLOAD
        assert stream.digest == _sha(blob)
    finally:
        os.close(fd)


def _expect_invalid(tmp_path, blob, match, **kwargs):
    fd, stream = _stream(tmp_path, blob, **kwargs)
    try:
        with pytest.raises(InvalidLayerError, match=match) as info:
            _read_all(stream, step=1 << 20)
        assert "blob" in str(info.value)
    finally:
        os.close(fd)


def test_gzip_trailing_garbage_is_an_error(tmp_path):
    _expect_invalid(tmp_path, gzip.compress(PAYLOAD) + b"\0\0junk", "garbage")


def test_gzip_crc_error(tmp_path):
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[-6] ^= 0xFF                      # inside the CRC-32 of the trailer
    _expect_invalid(tmp_path, bytes(blob), "corrupt gzip")


def test_gzip_length_error(tmp_path):
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[-1] ^= 0x01                      # ISIZE
    _expect_invalid(tmp_path, bytes(blob), "corrupt gzip")


def test_gzip_corrupt_data(tmp_path):
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[len(blob) // 2] ^= 0x55
    _expect_invalid(tmp_path, bytes(blob), "corrupt gzip")


@pytest.mark.parametrize("cut", [3, 20, 1000, -9, -1])
def test_gzip_truncated(tmp_path, cut):
    _expect_invalid(tmp_path, gzip.compress(PAYLOAD)[:cut], "truncated")


@pytest.mark.parametrize("cut", [5, 13, 1000, -40, -4, -1])
def test_zstd_truncated(tmp_path, cut):
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD)
    _expect_invalid(tmp_path, blob[:cut], "zstd")


def test_zstd_multiple_and_skippable_frames(tmp_path):
    comp = zstandard.ZstdCompressor()
    skippable = (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    blob = comp.compress(PAYLOAD[:7]) + skippable + comp.compress(PAYLOAD[7:])
    fd, stream = _stream(tmp_path, blob)
    try:
        assert _read_all(stream) == PAYLOAD
    finally:
        os.close(fd)


def test_zstd_streamed_frame_without_content_size(tmp_path):
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    blob = cobj.compress(PAYLOAD) + cobj.flush()
    fd, stream = _stream(tmp_path, blob)
    try:
        assert _read_all(stream) == PAYLOAD
    finally:
        os.close(fd)


def test_zstd_checksum_error(tmp_path):
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD))
    blob[-2] ^= 0xFF
    _expect_invalid(tmp_path, bytes(blob), "corrupt zstd")


def test_zstd_trailing_garbage(tmp_path):
    blob = zstandard.ZstdCompressor().compress(PAYLOAD) + b"garbage!"
    _expect_invalid(tmp_path, blob, "zstd")


def test_zstd_bomb_is_refused(tmp_path):
    blob = zstandard.ZstdCompressor(level=19).compress(b"\0" * (20 << 20))
    assert len(blob) < 4096
    _expect_invalid(tmp_path, blob, "exceeds the limit", max_size=1 << 20)


def test_gzip_bomb_limit_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFS_MAX_LAYER_SIZE", str(100_000))
    _expect_invalid(tmp_path, gzip.compress(b"\0" * 200_000), "exceeds the limit")


def test_plain_tar_has_no_size_limit(tmp_path):
    fd, stream = _stream(tmp_path, PAYLOAD, max_size=10)
    try:
        assert _read_all(stream) == PAYLOAD
    finally:
        os.close(fd)


def test_max_layer_size(monkeypatch):
    monkeypatch.delenv("LAYERFS_MAX_LAYER_SIZE", raising=False)
    assert max_layer_size() == 64 << 30
    assert max_layer_size(5) == 5
    monkeypatch.setenv("LAYERFS_MAX_LAYER_SIZE", "1234")
    assert max_layer_size() == 1234
    assert max_layer_size(5) == 5
    monkeypatch.setenv("LAYERFS_MAX_LAYER_SIZE", "lots")
    with pytest.raises(ValueError, match="LAYERFS_MAX_LAYER_SIZE"):
        max_layer_size()


def test_blob_shorter_than_declared(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD[:1000])
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = BlobStream(fd, size=2000, label="blob")
        with pytest.raises(InvalidLayerError, match="shorter"):
            _read_all(stream)
    finally:
        os.close(fd)


def test_progress_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(compression, "PROGRESS_STEP", 100_000)
    monkeypatch.setattr(compression, "CHUNK", 50_000)
    calls = []
    fd, stream = _stream(tmp_path, PAYLOAD, progress=lambda d, t: calls.append((d, t)))
    try:
        _read_all(stream)
    finally:
        os.close(fd)
    assert len(calls) >= 4
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert len(set(calls)) == len(calls)
    assert all(t == len(PAYLOAD) for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_zlib_wbits_31_checks_what_we_rely_on():
    # The gzip checks are zlib's: make sure this zlib raises on a bad CRC.
    blob = bytearray(gzip.compress(b"hello"))
    blob[-8] ^= 1
    with pytest.raises(zlib.error):
        zlib.decompressobj(31).decompress(bytes(blob))
