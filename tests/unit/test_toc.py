"""Layers with a table of contents (eStargz, zstd:chunked): written by
commit, read back from the TOC alone, equal to every other way of reading
them; tampering refused.  See docs/toc-layers.md."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib

import attrs
import pytest
import zstandard

import layerfs
from layerfs.commit import commit
from layerfs.errors import DigestMismatchError, InvalidLayerError
from layerfs.example import build_example
from layerfs.layer import open_layer
from layerfs.testing.view import diff_views, snapshot
from layerfs.toc import TocLayer
from layerfs.tocopen import open_toc_layer

FORMATS = ["estargz", "zstd:chunked"]
CHUNK = 4 << 20
LONG = "n" * 200 + "/" + "l" * 255


class BytesBlob:
    """The blob-source interface (size, digest, label, read_at) over bytes,
    counting what is read."""

    def __init__(self, data: bytes, digest=None, label="test-blob"):
        self.data = data
        self.size = len(data)
        self.digest = digest
        self.label = label
        self.fetched = 0
        self.reads = []

    def read_at(self, offset, length):
        piece = self.data[offset:offset + length]
        self.fetched += len(piece)
        self.reads.append((offset, len(piece)))
        return piece


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_example(str(tmp_path_factory.mktemp("base") / "image"))


def changes(fs):
    fs.write_bytes("/etc/motd", b"changed in the upper layer\n")
    fs.unlink("/etc/os-release")                       # a whiteout
    fs.makedirs("/srv/data")
    fs.write_bytes("/srv/data/blob", bytes(range(256)) * 40)
    fs.setxattr("/srv/data/blob", "user.note", b"kept\x00\xff")
    fs.link("/usr/bin/hello", "/srv/hello-link")       # hardlinks
    fs.symlink("../etc/motd", "/srv/motd")
    fs.rename("/var/cache", "/var/moved")              # an opaque directory
    fs.mkdir("/var/cache")
    fs.write_bytes("/big", bytes(range(251)) * ((2 * CHUNK + 12345) // 251))  # 3 chunks
    fs.write_bytes("/exactly-one-chunk", b"\x01" * CHUNK)
    fs.write_bytes("/empty", b"")
    fs.makedirs(os.path.dirname("/" + LONG))
    fs.write_bytes("/" + LONG, b"long name\n")
    fs.chmod("/README", 0o4755)


@pytest.fixture(scope="module")
def committed(base, tmp_path_factory):
    """{compression: (CommitResult, expected snapshot)} for one set of changes."""
    tmp = tmp_path_factory.mktemp("commits")
    out = {}
    for compression in FORMATS + ["gzip"]:
        with layerfs.open(base, upper=tmp / f"up-{compression}") as fs:
            changes(fs)
            os.environ["SOURCE_DATE_EPOCH"] = "4000000000"   # after now: nothing clamped
            try:
                expected = snapshot(fs)
                result = commit(fs, tmp / f"out-{compression}".replace(":", "-"),
                                tag="t", compression=compression)
            finally:
                del os.environ["SOURCE_DATE_EPOCH"]
        out[compression] = (result, expected)
    return out


def top_descriptor(result):
    def blob(digest):
        with open(os.path.join(result.dest, "blobs", "sha256", digest.partition(":")[2]),
                  "rb") as f:
            return f.read()
    return json.loads(blob(result.manifest_digest))["layers"][-1]


def without_toc_file(view):
    view = dict(view)
    view.pop("/stargz.index.json", None)
    return view


@pytest.mark.parametrize("compression", FORMATS)
def test_round_trip_reads_the_committed_view_from_the_toc(committed, compression):
    result, expected = committed[compression]
    with layerfs.open(result.dest, tag="t") as fs:
        assert isinstance(fs.layers[-1], TocLayer)
        assert fs.layers[-1].toc_format == compression
        assert diff_views(expected, without_toc_file(snapshot(fs))) == []


def test_views_are_equal_across_gzip_estargz_and_zstd_chunked(committed):
    views = {}
    for compression, (result, _) in committed.items():
        with layerfs.open(result.dest, tag="t") as fs:
            # the three uppers were changed at different moments: mtimes differ
            views[compression] = {path: attrs.evolve(node, mtime_ns=0) for path, node
                                  in without_toc_file(snapshot(fs)).items()}
    assert diff_views(views["gzip"], views["estargz"]) == []
    assert diff_views(views["gzip"], views["zstd:chunked"]) == []


@pytest.mark.parametrize("compression", FORMATS)
def test_toc_entries_and_bytes_equal_the_plain_reader(committed, compression, tmp_path):
    """The same blob read as an ordinary gzip/zstd tar (layerfs's own reader)
    gives the same entries and the same file bytes as its TOC."""
    result, _ = committed[compression]
    desc = top_descriptor(result)
    plain = open_layer(result.layer_path, digest=desc["digest"], cache=False)
    toc = open_toc_layer(result.layer_path, digest=desc["digest"],
                         annotations=desc["annotations"], label="top")
    with plain, toc:
        def key(entry):
            return entry._replace(data=None)
        assert sorted(map(key, plain.entries)) == sorted(map(key, toc.entries))
        by_path = {e.path: e for e in toc.entries}
        for entry in plain.entries:
            if entry.data is None:
                continue
            mine = by_path[entry.path]
            assert toc.read(mine.data, mine.size, 0, mine.size) == \
                plain.read(entry.data, entry.size, 0, entry.size), entry.path
            if entry.size > CHUNK:    # a read across a chunk boundary
                assert toc.read(mine.data, mine.size, CHUNK - 5, 10) == \
                    plain.read(entry.data, entry.size, CHUNK - 5, 10)


@pytest.mark.parametrize("compression", FORMATS)
def test_output_is_an_ordinary_compressed_tar(committed, compression):
    result, _ = committed[compression]
    if compression == "estargz":
        with tarfile.open(result.layer_path, "r:gz") as tar:
            names = tar.getnames()
        assert names[-1] == "stargz.index.json"
    else:
        with open(result.layer_path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(
                f, read_across_frames=True).read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
    assert "big" in names and LONG in names and "var/moved/.wh..wh..opq" in names
    if shutil.which("tar"):
        flag = "-z" if compression == "estargz" else "--zstd"
        listing = subprocess.run(["tar", flag, "-tf", result.layer_path], check=True,
                                 capture_output=True, text=True).stdout.split("\n")
        assert LONG in listing


@pytest.mark.parametrize("compression", FORMATS)
def test_descriptor_annotations(committed, compression):
    result, _ = committed[compression]
    desc = top_descriptor(result)
    with open(result.layer_path, "rb") as f:
        blob = f.read()
    if compression == "estargz":
        assert desc["mediaType"].endswith("tar+gzip")
        toc_offset = int(blob[-51:][16:32], 16)
        member = zlib.decompressobj(31).decompress(blob[toc_offset:-51])
        with tarfile.open(fileobj=io.BytesIO(member)) as tar:
            toc = tar.extractfile("stargz.index.json").read()
        assert desc["annotations"]["containerd.io/snapshot/stargz/toc.digest"] == \
            "sha256:" + hashlib.sha256(toc).hexdigest()
    else:
        assert desc["mediaType"].endswith("tar+zstd")
        offset, length, size, kind = map(int, desc["annotations"][
            "io.github.containers.zstd-chunked.manifest-position"].split(":"))
        manifest = blob[offset:offset + length]
        assert kind == 1 and blob[offset - 8:offset - 4] == b"\x50\x2a\x4d\x18"
        assert desc["annotations"]["io.github.containers.zstd-chunked.manifest-checksum"] \
            == "sha256:" + hashlib.sha256(manifest).hexdigest()
        assert len(zstandard.ZstdDecompressor().decompress(manifest, max_output_size=size)) \
            == size
        assert blob[-8:] == b"GNUlInUx"


@pytest.mark.parametrize("compression", FORMATS)
def test_commit_is_reproducible_under_source_date_epoch(base, tmp_path, monkeypatch,
                                                        compression):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    layers = []
    for name in ("a", "b"):
        with layerfs.open(base, upper=tmp_path / f"up-{name}") as fs:
            fs.write_bytes("/one", b"1" * 100_000)
            fs.unlink("/etc/os-release")
            layers.append(commit(fs, tmp_path / name, tag="t",
                                 compression=compression).layer_path)
    with open(layers[0], "rb") as a, open(layers[1], "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("compression", FORMATS)
def test_listing_fetches_only_the_footer_and_the_toc(committed, compression):
    result, _ = committed[compression]
    desc = top_descriptor(result)
    with open(result.layer_path, "rb") as f:
        blob = BytesBlob(f.read(), digest=desc["digest"])
    layer = open_toc_layer(blob, digest=desc["digest"], annotations=desc["annotations"],
                           label="top")
    paths = {e.path for e in layer.entries}
    assert "/big" in paths and "/" + LONG in paths
    if compression == "estargz":
        toc_offset = int(blob.data[-51:][16:32], 16)
        assert blob.reads == [(blob.size - 51, 51), (toc_offset, blob.size - 51 - toc_offset)]
    else:
        offset, length = map(int, desc["annotations"][
            "io.github.containers.zstd-chunked.manifest-position"].split(":")[:2])
        assert blob.reads == [(offset, length)]
    # reading a small file fetches its chunk only
    before = blob.fetched
    motd = next(e for e in layer.entries if e.path == "/etc/motd")
    assert layer.read(motd.data, motd.size, 0, motd.size) == b"changed in the upper layer\n"
    # eStargz: up to the next chunk's offset, so the headers between come too
    assert blob.fetched - before < 1024
    assert len(blob.reads) == (3 if compression == "estargz" else 2)


@pytest.mark.parametrize("compression", FORMATS)
def test_a_tampered_chunk_names_the_layer_digest_and_the_entry(committed, compression):
    result, _ = committed[compression]
    desc = top_descriptor(result)
    with open(result.layer_path, "rb") as f:
        data = bytearray(f.read())
    probe = BytesBlob(bytes(data))
    layer = open_toc_layer(probe, digest=desc["digest"], annotations=desc["annotations"],
                           label="3")
    big = next(e for e in layer.entries if e.path == "/big")
    start, end = layer._chunk_lists[big.data][1][2:4]      # the second chunk's range
    # Recompress other bytes into the same place: a valid stream, wrong content.
    if compression == "estargz":
        fake = zlib.compressobj(1, 8, 31)
        member = fake.compress(b"\x00" * CHUNK) + fake.flush()
    else:
        member = zstandard.ZstdCompressor().compress(b"\x00" * CHUNK)
    assert len(member) < end - start
    data[start:start + len(member)] = member
    tampered = open_toc_layer(BytesBlob(bytes(data)), digest=desc["digest"],
                              annotations=desc["annotations"], label="3")
    assert tampered.read(big.data, big.size, 0, 100) == layer.read(big.data, big.size, 0, 100)
    with pytest.raises(DigestMismatchError) as caught:
        tampered.read(big.data, big.size, CHUNK, 100)
    message = str(caught.value)
    assert "\n" not in message
    assert desc["digest"] in message and "'/big'" in message and "chunk" in message
    # garbage instead of a stream: an invalid layer, also named
    data[start:end] = b"\x01" * (end - start)
    broken = open_toc_layer(BytesBlob(bytes(data)), digest=desc["digest"],
                            annotations=desc["annotations"], label="3")
    with pytest.raises(InvalidLayerError) as caught:
        broken.read(big.data, big.size, CHUNK, 100)
    assert desc["digest"] in str(caught.value) and "'/big'" in str(caught.value)


@pytest.mark.parametrize("compression", FORMATS)
def test_a_tampered_toc_is_refused(committed, compression):
    result, _ = committed[compression]
    desc = top_descriptor(result)
    with open(result.layer_path, "rb") as f:
        blob = f.read()
    wrong = dict(desc["annotations"])
    key = ("containerd.io/snapshot/stargz/toc.digest" if compression == "estargz"
           else "io.github.containers.zstd-chunked.manifest-checksum")
    wrong[key] = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatchError, match="table of contents"):
        open_toc_layer(BytesBlob(blob), digest=desc["digest"], annotations=wrong, label="3")
    # without the annotation, a footer alone is trusted only with the whole blob's digest
    with pytest.raises(DigestMismatchError):
        open_toc_layer(BytesBlob(blob[:-200] + bytes(200 - 72) + blob[-72:]),
                       digest=desc["digest"], annotations=None, label="3")
    sniffed = open_toc_layer(BytesBlob(blob), digest=desc["digest"], label="3")
    assert sniffed is not None and sniffed.toc_format == compression


def test_a_plain_layer_has_no_toc(committed):
    result, _ = committed["gzip"]
    desc = top_descriptor(result)
    assert open_toc_layer(result.layer_path, digest=desc["digest"], label="3") is None


def test_committing_on_top_of_a_toc_image_keeps_its_annotations(committed, tmp_path):
    result, expected = committed["zstd:chunked"]
    with layerfs.open(result.dest, tag="t", upper=tmp_path / "up") as fs:
        fs.write_bytes("/more", b"more")
        second = commit(fs, tmp_path / "out", tag="u", compression="estargz")
    with open(os.path.join(second.dest, "blobs", "sha256",
                           second.manifest_digest.partition(":")[2]), "rb") as f:
        layers = json.load(f)["layers"]
    assert "io.github.containers.zstd-chunked.manifest-position" in layers[-2]["annotations"]
    assert "containerd.io/snapshot/stargz/toc.digest" in layers[-1]["annotations"]
    with layerfs.open(second.dest, tag="u") as fs:
        assert [type(layer).__name__ for layer in fs.layers[-2:]] == ["TocLayer", "TocLayer"]
        assert fs.read_bytes("/more") == b"more"
        assert fs.read_bytes("/etc/motd") == b"changed in the upper layer\n"


@pytest.mark.parametrize("compression", FORMATS)
def test_cli_commit_and_a_one_line_error_for_a_tampered_chunk(base, tmp_path, compression):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                              capture_output=True, text=True)
    with layerfs.open(base, upper=tmp_path / "up") as fs:
        fs.write_bytes("/data", b"payload " * 1000)
        fs.unlink("/etc/os-release")
    out = tmp_path / "out"
    done = run("commit", "--compression", compression, "--tag", "v2", base, tmp_path / "up",
               out)
    assert done.returncode == 0, done.stderr
    image = f"oci:{out}:v2"
    assert run("cat", image, "/data").stdout == "payload " * 1000
    assert "os-release" not in run("ls", image, "/etc").stdout
    with open(os.path.join(out, "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(out, "blobs", "sha256", manifest_digest[7:])) as f:
        top = json.load(f)["layers"][-1]
    path = os.path.join(out, "blobs", "sha256", top["digest"][7:])
    layer = open_toc_layer(path, digest=top["digest"], annotations=top["annotations"],
                           label="x")
    data = next(e for e in layer.entries if e.path == "/data")
    start, end = layer._chunk_lists[data.data][0][2:4]
    layer.close()
    with open(path, "r+b") as f:      # the layer's own file: its digest no longer matches
        f.seek(start)
        f.write(b"\x00" * (end - start))
    failed = run("cat", image, "/data")
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), failed.stderr
    assert top["digest"] in lines[0] and "/data" in lines[0]


@pytest.mark.parametrize("compression", FORMATS)
def test_an_image_lists_from_footer_and_toc_and_cats_from_chunks(committed, compression,
                                                                  monkeypatch):
    """The whole path, layout to facade: what the top layer's blob source is
    asked for while listing, then while reading one file."""
    import layerfs.tocopen as toc_module
    reads = []

    class CountingFileRange(toc_module.FileRange):
        def read_at(self, offset, length):
            data = super().read_at(offset, length)
            reads.append((self.label, offset, len(data)))
            return data
    monkeypatch.setattr(toc_module, "FileRange", CountingFileRange)
    result, _ = committed[compression]
    desc = top_descriptor(result)
    size = desc["size"]
    with layerfs.open(result.dest, tag="t") as fs:
        assert "big" in fs.listdir("/")
        top = [r for r in reads if r[0] == fs.layers[-1].label]
        listed = sum(n for _, _, n in top)
        if compression == "estargz":
            assert len(top) == 2 and top[0] == (top[0][0], size - 51, 51)
        else:
            assert len(top) == 1
        assert listed < 2000                       # footer + TOC, never the blob
        reads.clear()
        assert fs.read_bytes("/srv/data/blob") == bytes(range(256)) * 40
        assert len(reads) == 1 and reads[0][2] < 1024
        reads.clear()
        with fs.open("/big", "rb") as f:
            f.seek(CHUNK + 10)
            assert f.read(5) == bytes((CHUNK + 10 + i) % 251 for i in range(5))
        assert len(reads) == 1                     # the second chunk only


def test_times_round_trip_and_offsets_are_honoured():
    from layerfs.toc import format_time, parse_time
    for ns in (0, 1_700_000_000_123_456_789, 1_700_000_000_000_000_000, -1_000_000_000):
        assert parse_time(format_time(ns)) == ns
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000 * 10**9
    assert parse_time("2023-11-14T22:13:20.5Z") == 1_700_000_000_500_000_000
    with pytest.raises(ValueError):
        parse_time("yesterday")


def foreign_estargz() -> tuple[bytes, dict]:
    """An eStargz blob shaped as other writers make them: two small files
    in one gzip member (``innerOffset``), ``./`` names, directories with a
    trailing slash, a time zone offset."""
    from layerfs import estargz

    def member(data):
        c = zlib.compressobj(6, 8, 31)
        return c.compress(data) + c.flush()

    def header(name, size, kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mode = size, kind, 0o755 if kind == tarfile.DIRTYPE else 0o644
        return info.tobuf(tarfile.PAX_FORMAT)
    a, b = b"alpha\n", b"bravo!\n"
    pad = lambda n: bytes(-n % 512)      # noqa: E731
    out = bytearray(member(header("./etc/", 0, tarfile.DIRTYPE)))
    shared = header("./etc/a", len(a)) + a + pad(len(a))
    inner_b = len(shared) + 512
    shared += header("./etc/b", len(b)) + b + pad(len(b))
    offset = len(out)
    out += member(shared)
    digest = lambda data: "sha256:" + hashlib.sha256(data).hexdigest()   # noqa: E731
    toc = {"version": 1, "entries": [
        {"name": "etc/", "type": "dir", "mode": 0o40755, "modtime": "2023-11-14T23:13:20+01:00"},
        {"name": "etc/a", "type": "reg", "size": len(a), "mode": 0o644, "offset": offset,
         "innerOffset": 512, "digest": digest(a), "chunkDigest": digest(a)},
        {"name": "etc/b", "type": "reg", "size": len(b), "mode": 0o644, "offset": offset,
         "innerOffset": inner_b, "digest": digest(b), "chunkDigest": digest(b)},
    ]}
    toc_bytes = json.dumps(toc).encode()
    toc_offset = len(out)
    body = header(estargz.TOC_NAME, len(toc_bytes)) + toc_bytes + pad(len(toc_bytes)) + bytes(1024)
    out += member(body) + estargz.footer(toc_offset)
    return bytes(out), {estargz.TOC_DIGEST_ANNOTATION: digest(toc_bytes)}


def test_a_foreign_estargz_with_shared_members_reads_the_same_as_its_tar():
    data, annotations = foreign_estargz()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert tar.getnames() == ["./etc", "./etc/a", "./etc/b", "stargz.index.json"]
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layer = open_toc_layer(BytesBlob(data), digest=digest, annotations=annotations, label="f")
    by_path = {e.path: e for e in layer.entries}
    assert by_path["/etc"].mtime_ns == 1_700_000_000 * 10**9 and by_path["/etc"].mode == 0o755
    for path, content in (("/etc/a", b"alpha\n"), ("/etc/b", b"bravo!\n")):
        entry = by_path[path]
        assert layer.read(entry.data, entry.size, 0, 100) == content


def test_a_foreign_zstd_chunked_with_a_hole_chunk():
    """containers/storage marks runs of zeros as ``chunkType: zeros`` (no bytes)."""
    from layerfs import zstdchunked
    payload = b"x" * 1000
    frame = zstandard.ZstdCompressor().compress(payload)
    prefix = zstandard.ZstdCompressor().compress(b"\0" * 512)   # stands for the headers
    start = len(prefix)
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    manifest = json.dumps({"version": 1, "entries": [
        {"type": "reg", "name": "./sparse", "mode": 0o644, "size": 3000, "uid": 1, "gid": 2,
         "modtime": "2023-11-14T22:13:20Z", "offset": start, "endOffset": start + len(frame),
         "chunkSize": 1000, "chunkDigest": digest, "xattrs": {"user.k": "dg=="}},
        {"type": "chunk", "name": "./sparse", "chunkOffset": 1000, "chunkSize": 2000,
         "chunkType": "zeros"},
    ]}).encode()
    compressed = zstandard.ZstdCompressor().compress(manifest)
    blob = prefix + frame + zstdchunked.skippable_frame(compressed)
    offset = len(prefix) + len(frame) + 8
    blob += zstdchunked.footer(offset, len(compressed), len(manifest))
    annotations = {
        zstdchunked.CHECKSUM_ANNOTATION: "sha256:" + hashlib.sha256(compressed).hexdigest(),
        zstdchunked.POSITION_ANNOTATION: f"{offset}:{len(compressed)}:{len(manifest)}:1"}
    source = BytesBlob(blob)
    layer = open_toc_layer(source, digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                           annotations=annotations, label="z")
    (entry,) = layer.entries
    assert (entry.path, entry.uid, entry.gid, entry.xattrs) == ("/sparse", 1, 2, {"user.k": b"v"})
    assert layer.read(entry.data, entry.size, 990, 20) == b"x" * 10 + bytes(10)
    assert layer.read(entry.data, entry.size, 1500, 100) == bytes(100)
    # without the annotations, the footer finds the same manifest
    again = open_toc_layer(BytesBlob(blob), digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                           label="z")
    assert again.entries == layer.entries
