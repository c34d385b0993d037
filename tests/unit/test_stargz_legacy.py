"""The original stargz (CRFS), whose footer is 47 bytes (its extra field
the bare ``%016xSTARGZ``, no ``SG`` subfield): found by its footer, read
from its TOC; a stargz TOC without per-chunk digests leaves the layer read
as the plain tar.gz it also is.  The blobs are built from an eStargz commit
with the footer (and the TOC) rewritten as CRFS wrote them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile

import pytest

import layerfs
from layerfs import estargz
from layerfs.blobsource import BytesBlob
from layerfs.commit import commit
from layerfs.entry import REGULAR
from layerfs.example import build_example
from layerfs.layer import open_layer
from layerfs.toc import TocLayer
from layerfs.tocopen import open_toc_layer

BIG = random.Random(3).randbytes(5 << 20)        # two chunks of 4 MiB
SMALL = b"from the original stargz\n"


@pytest.fixture(scope="module")
def estargz_blob(tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("stargz")
    base = build_example(str(tmp / "base"))
    with layerfs.open(base, upper=tmp / "up") as fs:
        fs.write_bytes("/big", BIG)
        fs.write_bytes("/small", SMALL)
        result = commit(fs, tmp / "out", compression="estargz")
    with open(os.path.join(result.dest, "index.json")) as handle:
        manifest_digest = json.load(handle)["manifests"][0]["digest"]

    def blob(digest):
        with open(os.path.join(result.dest, "blobs", *digest.split(":")), "rb") as handle:
            return handle.read()
    layer = json.loads(blob(manifest_digest))["layers"][-1]
    return blob(layer["digest"])


def as_legacy(blob: bytes, drop_chunk_digests: bool = False) -> bytes:
    """*blob* (eStargz) with CRFS's 47-byte footer; with *drop_chunk_digests*,
    its TOC rewritten without ``chunkDigest`` (CRFS kept a digest per file)."""
    toc_offset = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:])
    assert toc_offset is not None
    toc_member = blob[toc_offset:-estargz.FOOTER_SIZE]
    if drop_chunk_digests:
        member = estargz.decompress_member(toc_member, 1 << 30)
        with tarfile.open(fileobj=io.BytesIO(member)) as tar:
            info = tar.next()
            toc = json.loads(tar.extractfile(info).read())
        for entry in toc["entries"]:
            entry.pop("chunkDigest", None)
        data = json.dumps(toc).encode()
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        toc_member = estargz.compress_member(out.getvalue(), 6)
    return blob[:toc_offset] + toc_member + estargz.legacy_footer(toc_offset)


def blob_source(data: bytes) -> BytesBlob:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return BytesBlob(data, digest=digest, label="legacy")


def file_bytes(layer, path: str) -> bytes:
    entry = next(e for e in layer.entries if e.path == path and e.kind == REGULAR)
    return layer.read(entry.data, entry.size, 0, entry.size)


def test_the_legacy_footer_round_trips():
    for offset in (0, 1, 1023, 0xFFFF_FFFF_FFFF):
        footer = estargz.legacy_footer(offset)
        assert len(footer) == estargz.LEGACY_FOOTER_SIZE == 47
        assert estargz.parse_legacy_footer(footer) == offset
        assert estargz.parse_footer(footer[-51:]) is None
        assert estargz.find_footer(bytes(10) + footer) == (offset, 47)
        assert estargz.find_footer(estargz.footer(offset)) == (offset, 51)
    assert estargz.parse_legacy_footer(estargz.footer(5)[-47:]) is None
    import gzip
    assert gzip.decompress(estargz.legacy_footer(77)) == b""      # a valid empty member


def test_an_original_stargz_layer_is_found_by_its_footer_and_read_from_its_toc(
        estargz_blob):
    legacy = as_legacy(estargz_blob)
    source = blob_source(legacy)
    layer = open_toc_layer(source, digest=source.digest, sniff=True, cache=False)
    assert isinstance(layer, TocLayer) and layer.toc_format == "stargz"
    assert file_bytes(layer, "/big") == BIG and file_bytes(layer, "/small") == SMALL
    with open_layer(blob_source(legacy), cache=False) as plain:    # the same tree
        assert ({(e.path, e.kind, e.size) for e in plain.entries}
                == {(e.path, e.kind, e.size) for e in layer.entries})
    layer.close()


def test_a_stargz_toc_without_chunk_digests_leaves_a_plain_read(estargz_blob):
    legacy = as_legacy(estargz_blob, drop_chunk_digests=True)
    source = blob_source(legacy)
    assert open_toc_layer(source, digest=source.digest, sniff=True, cache=False) is None
    with open_layer(blob_source(legacy), cache=False) as plain:
        assert file_bytes(plain, "/big") == BIG
