import errno
import gzip
import hashlib
import io
import marshal
import os
import random
import shutil
import subprocess
import tarfile

import pytest
import zstandard

from layerfs import layer as layer_module
from layerfs import tarindex
from layerfs.entry import REGULAR
from layerfs.errors import DigestMismatchError, InvalidLayerError, UnsupportedImageError
from layerfs.cache import default_cache_root
from layerfs.layer import BlobSource, IndexCache, open_layer

RNG = random.Random(42)
FILES = {
    "small": b"hello\n",
    "empty": b"",
    "big": RNG.randbytes(3 << 20),
    "dir/one_block": RNG.randbytes(512),
    "dir/odd": RNG.randbytes(12345),
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LAYERFS_CACHE_DIR", str(root))
    return root


def make_tar(files=FILES):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(kind, data):
    if kind == "gzip":
        return gzip.compress(data, compresslevel=1)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def contents(layer):
    return {e.path: layer.read(e.data, e.size, 0, e.size + 10)
            for e in layer.entries if e.kind == REGULAR}


def write_blob(tmp_path, kind, tar=None):
    tar = make_tar() if tar is None else tar
    blob = compress(kind, tar)
    path = tmp_path / f"layer.{kind}"
    path.write_bytes(blob)
    return path, blob, tar


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_open_and_read(tmp_path, kind, cache_dir):
    path, blob, tar = write_blob(tmp_path, kind)
    with open_layer(path, media_type="m/t") as layer:
        assert layer.label == str(path) and layer.path == str(path)
        assert layer.compression == kind
        assert layer.digest == sha(blob) and layer.diff_id == sha(tar)
        assert layer.size == len(blob) and layer.uncompressed_size == len(tar)
        assert layer.media_type == "m/t"
        assert layer.entry_count == len(FILES) + 1
        assert contents(layer) == {"/" + k: v for k, v in FILES.items()}
    hex_digest = sha(blob)[7:]
    assert (cache_dir / "index" / "sha256" / f"{hex_digest}.idx").is_file()
    copy = cache_dir / "blobs" / "sha256" / f"{hex_digest}.tar"
    assert copy.is_file() == (kind != "none")
    if kind != "none":
        assert copy.read_bytes() == tar


@pytest.mark.parametrize("kind", ["none", "gzip"])
def test_random_reads_equal_the_content(tmp_path, kind):
    path, _, _ = write_blob(tmp_path, kind)
    rng = random.Random(5)
    with open_layer(path) as layer:
        entry = next(e for e in layer.entries if e.path == "/big")
        content = FILES["big"]
        for _ in range(200):
            offset = rng.randrange(0, len(content) + 100)
            length = rng.choice([0, 1, 511, 4096, 65536, 1 << 20])
            assert layer.read(entry.data, entry.size, offset, length) == \
                content[offset:offset + length]


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_second_open_parses_nothing(tmp_path, kind, monkeypatch):
    path, _, _ = write_blob(tmp_path, kind)
    with open_layer(path) as first:
        expected = (first.entries, first.digest, first.diff_id, contents(first))

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(layer_module, "iter_entries", forbidden)
    monkeypatch.setattr(layer_module, "BlobStream", forbidden)
    monkeypatch.setattr(tarindex, "iter_entries", forbidden)
    monkeypatch.setattr(tarindex, "_make_entry", forbidden)
    with open_layer(path) as second:
        monkeypatch.undo()
        assert (second.entries, second.digest, second.diff_id, contents(second)) == expected


def test_changed_file_is_reindexed(tmp_path):
    path, _, _ = write_blob(tmp_path, "gzip")
    with open_layer(path) as layer:
        assert layer.entry_count == len(FILES) + 1
    new_tar = make_tar({"other": b"new"})
    path.write_bytes(gzip.compress(new_tar))
    os.utime(path, ns=(1, 1))
    with open_layer(path) as layer:
        assert layer.diff_id == sha(new_tar)
        assert contents(layer) == {"/other": b"new"}


def test_corrupt_index_is_rebuilt(tmp_path, cache_dir):
    path, blob, _ = write_blob(tmp_path, "zstd")
    open_layer(path).close()
    idx = cache_dir / "index" / "sha256" / f"{sha(blob)[7:]}.idx"
    foreign = marshal.dumps(({"format": "x"}, []))
    for garbage in (b"not marshal at all \xff", b"\xe9", foreign):
        idx.write_bytes(garbage)
        with open_layer(path) as layer:
            assert contents(layer)["/small"] == b"hello\n"
        assert idx.read_bytes() != garbage


def test_missing_copy_is_rebuilt(tmp_path, cache_dir):
    path, blob, tar = write_blob(tmp_path, "gzip")
    open_layer(path).close()
    copy = cache_dir / "blobs" / "sha256" / f"{sha(blob)[7:]}.tar"
    copy.unlink()
    with open_layer(path) as layer:
        assert contents(layer)["/dir/odd"] == FILES["dir/odd"]
    assert copy.read_bytes() == tar


@pytest.mark.parametrize("which", ["digest", "diff_id"])
def test_digest_mismatch(tmp_path, which):
    path, _, _ = write_blob(tmp_path, "gzip")
    wrong = "sha256:" + "0" * 64
    for _ in range(2):          # indexing, then again once the memo exists
        with pytest.raises(DigestMismatchError, match=which) as info:
            open_layer(path, label="base layer", **{which: wrong})
        assert "base layer" in str(info.value) and str(path) in str(info.value)
        open_layer(path).close()


def test_matching_digests_accepted(tmp_path):
    path, blob, tar = write_blob(tmp_path, "zstd")
    for _ in range(2):
        open_layer(path, digest=sha(blob), diff_id=sha(tar)).close()


def test_unsupported_digest_algorithm(tmp_path):
    path, _, _ = write_blob(tmp_path, "none")
    with pytest.raises(UnsupportedImageError):
        open_layer(path, digest="md5:abc")


@pytest.mark.parametrize("kind", ["none", "gzip"])
@pytest.mark.parametrize("cache", [None, False])
def test_blob_source_slices(tmp_path, kind, cache):
    tar = make_tar()
    blob = compress(kind, tar)
    outer = tmp_path / "outer.bin"
    outer.write_bytes(b"P" * 1000 + blob + b"S" * 777)
    source = BlobSource(str(outer), 1000, len(blob))
    with open_layer(source, cache=cache) as layer:
        assert layer.digest == sha(blob) and layer.size == len(blob)
        assert layer.label == str(outer)
        assert contents(layer) == {"/" + k: v for k, v in FILES.items()}
    with open_layer(source, cache=cache) as layer:        # again, from the cache
        assert contents(layer)["/big"] == FILES["big"]


def test_blob_source_to_end_of_file(tmp_path):
    tar = make_tar()
    outer = tmp_path / "outer.bin"
    outer.write_bytes(b"P" * 512 + tar)
    with open_layer(BlobSource(str(outer), 512)) as layer:
        assert layer.diff_id == sha(tar)


def test_blob_source_beyond_the_file(tmp_path):
    outer = tmp_path / "outer.bin"
    outer.write_bytes(b"x" * 100)
    with pytest.raises(InvalidLayerError, match="past the end"):
        open_layer(BlobSource(str(outer), 50, 51))
    with pytest.raises(InvalidLayerError, match="outside"):
        open_layer(BlobSource(str(outer), 101))


def test_cache_false_writes_nothing(tmp_path, cache_dir):
    path, _, _ = write_blob(tmp_path, "gzip")
    with open_layer(path, cache=False) as layer:
        assert contents(layer)["/big"] == FILES["big"]
    assert not cache_dir.exists()


def test_explicit_cache_root(tmp_path, cache_dir):
    path, _, _ = write_blob(tmp_path, "zstd")
    other = IndexCache(tmp_path / "elsewhere")
    open_layer(path, cache=other).close()
    assert (tmp_path / "elsewhere" / "index" / "sha256").is_dir()
    assert not cache_dir.exists()


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERFS_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_root() == str(tmp_path / "a")
    monkeypatch.delenv("LAYERFS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == str(tmp_path / "xdg" / "layerfs")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == str(tmp_path / "home" / ".cache" / "layerfs")


def _leftovers(cache_dir):
    """Files left in the cache, apart from its lock and pin files."""
    return [p for p in cache_dir.rglob("*") if p.is_file()
            and p.name != "lock" and p.parent.name != "pins"]


def test_corrupt_blob_leaves_no_partial_files(tmp_path, cache_dir):
    blob = bytearray(gzip.compress(make_tar()))
    blob[-6] ^= 0xFF
    path = tmp_path / "bad.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(InvalidLayerError, match="corrupt gzip"):
        open_layer(path)
    assert _leftovers(cache_dir) == []


def test_truncated_tar_inside_gzip(tmp_path, cache_dir):
    path = tmp_path / "trunc.gz"
    path.write_bytes(gzip.compress(make_tar()[:5000]))
    with pytest.raises(InvalidLayerError, match="truncated"):
        open_layer(path)
    assert _leftovers(cache_dir) == []


def test_disk_full_leaves_no_partial_files(tmp_path, cache_dir, monkeypatch):
    path, _, _ = write_blob(tmp_path, "zstd")
    real_temp_file = layer_module._temp_file

    class Full:
        def __init__(self, file):
            self.file = file
            self.written = 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    def full_temp_file(final_path):
        file, temp_path = real_temp_file(final_path)
        return Full(file), temp_path

    monkeypatch.setattr(layer_module, "_temp_file", full_temp_file)
    with pytest.raises(OSError) as info:
        open_layer(path)
    assert info.value.errno == errno.ENOSPC
    assert _leftovers(cache_dir) == []


def test_decompression_bomb(tmp_path, cache_dir):
    path = tmp_path / "bomb.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(
        make_tar({"zeros": bytes(8 << 20)})))
    with pytest.raises(InvalidLayerError, match="exceeds the limit"):
        open_layer(path, max_size=1 << 20)
    assert _leftovers(cache_dir) == []


def test_progress(tmp_path):
    path, blob, _ = write_blob(tmp_path, "none")
    calls = []
    open_layer(path, progress=lambda done, total: calls.append((done, total))).close()
    assert calls and calls[-1] == (len(blob), len(blob))


def test_closed_layer(tmp_path):
    path, _, _ = write_blob(tmp_path, "none")
    layer = open_layer(path)
    entry = layer.entries[1]
    layer.close()
    with pytest.raises(OSError) as info:
        layer.read(entry.data, entry.size, 0, 10)
    assert info.value.errno == errno.EBADF
    layer.close()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_layer(tmp_path / "nope")


def test_sparse_file_reads_holes_as_zeros(tmp_path):
    if shutil.which("tar") is None and os.environ.get("CI") != "true":
        pytest.skip("GNU tar is not installed")      # under CI a missing tool fails
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(RNG.randbytes(70_000))
        f.seek((4 << 20) - 10)
        f.write(b"0123456789")
    tar_path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=pax", "--sparse-version=1.0", "-cf",
                    str(tar_path), "-C", str(src), "sparse"], check=True)
    gz = tmp_path / "sparse.tar.gz"
    gz.write_bytes(gzip.compress(tar_path.read_bytes()))
    content = sparse.read_bytes()
    rng = random.Random(3)
    for path in (tar_path, gz):
        with open_layer(path) as layer:
            [entry] = layer.entries
            assert entry.size == len(content)
            assert layer.read(entry.data, entry.size, 0, entry.size) == content
            for _ in range(100):
                offset = rng.randrange(0, len(content))
                length = rng.randrange(0, 200_000)
                assert layer.read(entry.data, entry.size, offset, length) == \
                    content[offset:offset + length]


def test_memo_survives_non_utf8_paths(tmp_path):
    tar = make_tar()
    path = tmp_path / os.fsdecode(b"lay\xffer.tar")
    path.write_bytes(tar)
    open_layer(path).close()
    with open_layer(path) as layer:
        assert layer.diff_id == sha(tar)


@pytest.mark.parametrize("damage", ["remove", "corrupt_entries"])
@pytest.mark.parametrize("kind", ["none", "gzip"])
def test_entries_are_listed_again_when_the_index_goes_away(tmp_path, cache_dir, kind, damage):
    path, blob, _ = write_blob(tmp_path, kind)
    with open_layer(path) as first:
        expected = first.entries
    with open_layer(path) as second:      # reads only the index's header
        idx = cache_dir / "index" / "sha256" / f"{sha(blob)[7:]}.idx"
        if damage == "remove":
            idx.unlink()
        else:
            header, _ = marshal.loads(idx.read_bytes())
            idx.write_bytes(marshal.dumps((header, b"\xe9 rotten")))
        assert second.entries == expected
        assert contents(second)["/small"] == b"hello\n"
