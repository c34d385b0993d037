"""zstd:chunked's tar-split (what containers/storage writes beside the
manifest): the layer's tar rebuilt byte for byte from it and the files'
chunks, so that its diff_id can be checked.  layerfs does not write a
tar-split; these tests add one, as containers/storage lays it out, to a
zstd:chunked blob layerfs wrote."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import stat
import tarfile

import pytest

from layerfs import zstdchunked
from layerfs.blobsource import BytesBlob
from layerfs.errors import DigestMismatchError, UnsupportedImageError
from layerfs.tarwrite import LayerTarWriter
from layerfs.toc import sha256_digest
from layerfs.tocopen import open_toc_layer
from layerfs.union import Node

FILES = [("etc/", None), ("etc/motd", b"hello\n"), ("big", random.Random(5).randbytes(300_001)),
         ("empty", b""), ("n" * 120 + "/" + "long" * 40, b"a long name\n")]


def zstd_chunked_blob() -> tuple[bytes, dict, bytes]:
    """A zstd:chunked blob of FILES (chunks of 64 KiB), its annotations, its tar."""
    out = io.BytesIO()
    writer = LayerTarWriter(out, compression="zstd:chunked", chunk_size=64 << 10)
    for ino, (name, data) in enumerate(FILES, start=2):
        if data is None:
            node = Node(ino, stat.S_IFDIR | 0o755, 0, 0, 1_700_000_000 * 10**9)
            writer.add("/" + name.rstrip("/"), node)
        else:
            node = Node(ino, stat.S_IFREG | 0o644, 0, 0, 1_700_000_000 * 10**9, len(data))
            writer.add("/" + name, node, lambda offset, length, data=data:
                       data[offset:offset + length])
    writer.close()
    blob = out.getvalue()
    return blob, writer.annotations, zstdchunked.decompress_frames(blob, 1 << 30)


def tar_split_of(tar: bytes) -> bytes:
    """The tar-split JSON lines of *tar*: the bytes around each member's
    contents inline (type 2), each member by name and size (type 1)."""
    lines, position, number = [], 0, 0

    def record(**fields):
        nonlocal number
        lines.append(json.dumps({**fields, "position": number}))
        number += 1
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for info in archive:
            size = info.size if info.isreg() else 0
            record(type=2, payload=base64.b64encode(tar[position:info.offset_data]).decode())
            record(type=1, name=info.name, size=size, payload=None)
            position = info.offset_data + size
    record(type=2, payload=base64.b64encode(tar[position:]).decode())
    return ("\n".join(lines) + "\n").encode()


def with_tar_split(blob: bytes, annotations: dict, tar: bytes) -> tuple[bytes, dict]:
    """*blob* with a tar-split frame before its footer (the footer rewritten
    to point at it), and the annotations for it."""
    offset, length, uncompressed, _ = zstdchunked.parse_footer(blob[-72:])
    split = tar_split_of(tar)
    compressed = zstdchunked.compress_frame(split, 3)
    body = blob[:-72]
    where = (len(body) + 8, len(compressed), len(split))
    out = body + zstdchunked.skippable_frame(compressed) + zstdchunked.footer(
        offset, length, uncompressed, where)
    return out, {**annotations,
                 zstdchunked.TARSPLIT_CHECKSUM_ANNOTATION: sha256_digest(compressed),
                 zstdchunked.TARSPLIT_POSITION_ANNOTATION: "%d:%d:%d" % where}


@pytest.fixture(scope="module")
def layer_parts():
    blob, annotations, tar = zstd_chunked_blob()
    return (*with_tar_split(blob, annotations, tar), tar, blob, annotations)


def source(data: bytes) -> BytesBlob:
    return BytesBlob(data, digest="sha256:" + hashlib.sha256(data).hexdigest(), label="t")


def test_the_tar_is_rebuilt_byte_for_byte_and_its_diff_id_checked(layer_parts):
    blob, annotations, tar, _, _ = layer_parts
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    blob_source = source(blob)
    layer = open_toc_layer(blob_source, digest=blob_source.digest, diff_id=diff_id,
                           annotations=annotations, cache=False)
    assert b"".join(layer.tar_stream()) == tar
    assert layer.verify_diff_id() == diff_id


def test_without_annotations_the_footer_finds_the_tar_split(layer_parts):
    blob, _, tar, _, _ = layer_parts
    blob_source = source(blob)
    layer = open_toc_layer(blob_source, digest=blob_source.digest, cache=False)
    assert layer.toc_format == "zstd:chunked"
    assert b"".join(layer.tar_stream()) == tar


def test_a_wrong_diff_id_or_tar_split_is_refused(layer_parts):
    blob, annotations, tar, _, _ = layer_parts
    blob_source = source(blob)
    layer = open_toc_layer(blob_source, digest=blob_source.digest,
                           diff_id="sha256:" + "0" * 64, annotations=annotations, cache=False)
    with pytest.raises(DigestMismatchError, match="diff_id"):
        layer.verify_diff_id()
    bad = dict(annotations)
    bad[zstdchunked.TARSPLIT_CHECKSUM_ANNOTATION] = "sha256:" + "1" * 64
    layer = open_toc_layer(source(blob), digest=blob_source.digest, annotations=bad,
                           cache=False)
    with pytest.raises(DigestMismatchError, match="tar-split"):
        layer.verify_diff_id()


def test_a_layer_without_tar_split_says_so(layer_parts):
    _, _, _, plain, annotations = layer_parts
    blob_source = source(plain)
    layer = open_toc_layer(blob_source, digest=blob_source.digest, annotations=annotations,
                           cache=False)
    with pytest.raises(UnsupportedImageError, match="no tar-split"):
        layer.verify_diff_id()
