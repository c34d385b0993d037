"""eStargz and zstd:chunked images pulled from a real registry on loopback
open through their tables of contents, with the same view as the layout
they were pushed from; read lazily (the default), listing one fetches
only the footer and the TOC, and a cat only the chunks it needs, counted
from the Range headers the client sends."""

from __future__ import annotations

import json

import pytest

import layerfs
from layerfs.commit import commit
from layerfs.example import build_example
from layerfs.layer import IndexCache
from layerfs.testing.view import assert_views_equal, snapshot
from layerfs.toc import TocLayer

from test_registry_read import push_layout


@pytest.mark.parametrize("compression", ["estargz", "zstd:chunked"])
def test_a_toc_image_from_the_registry_reads_from_its_toc(registry, tmp_path, compression):
    base = build_example(str(tmp_path / "base"))
    with layerfs.open(base, upper=tmp_path / "up") as fs:
        fs.write_bytes("/big", bytes(range(256)) * (5 << 14))     # 5 MiB: two chunks
        fs.unlink("/etc/motd")
        result = commit(fs, tmp_path / "out", compression=compression)
    cache = IndexCache(tmp_path / "cache")
    with layerfs.open(result.dest, cache=cache) as local:
        expected = snapshot(local)
    push_layout(registry, result.dest, "demo/toc", "v1")
    with layerfs.open(f"docker://{registry.host}/demo/toc:v1", cache=cache) as remote:
        top = remote.layers[-1]
        assert isinstance(top, TocLayer) and top.toc_format == compression
        assert_views_equal(expected, snapshot(remote))
        assert not remote.exists("/etc/motd")


def commit_big_and_small(tmp_path, compression: str, big: bytes, small: bytes):
    """The example image with /big and /small added, committed with a TOC
    (*compression*) into ``tmp_path/out``; the commit's result."""
    base = build_example(str(tmp_path / "base"))
    with layerfs.open(base, upper=tmp_path / "up") as fs:
        fs.write_bytes("/big", big)
        fs.write_bytes("/small", small)
        return commit(fs, tmp_path / "out", compression=compression)


def _ranges_requested(monkeypatch) -> list:
    """Every blob request the client sends: (digest, first, last) of its
    Range (None, None for a whole blob)."""
    import re

    import requests
    seen = []
    original = requests.Session.request

    def counting(self, method, url, *args, **kwargs):
        if "/blobs/" in url and method == "GET":
            found = re.search(r"bytes=(\d+)-(\d*)", (kwargs.get("headers") or {}).get("Range", ""))
            first, last = (int(found.group(1)), int(found.group(2)) if found.group(2) else None) \
                if found else (None, None)
            seen.append((url.rsplit("/", 1)[1], first, last))
        return original(self, method, url, *args, **kwargs)
    monkeypatch.setattr(requests.Session, "request", counting)
    return seen


@pytest.mark.parametrize("compression", ["estargz", "zstd:chunked"])
def test_a_lazy_toc_image_fetches_the_footer_and_toc_to_list_and_chunks_to_cat(
        registry, tmp_path, monkeypatch, compression):
    import random

    from layerfs.registry import Options
    from layerfs.remote import RemoteBlob
    big = random.Random(7).randbytes(6 << 20)          # incompressible: chunks are real
    small = b"hello from the top layer\n"
    result = commit_big_and_small(tmp_path, compression, big, small)
    push_layout(registry, result.dest, "demo/lazytoc", "v1")
    seen = _ranges_requested(monkeypatch)
    cache = IndexCache(tmp_path / "cache")
    with layerfs.open(f"docker://{registry.host}/demo/lazytoc:v1", cache=cache,
                      registry=Options(lazy=True)) as remote:
        top, source = remote.layers[-1], remote.image.layer_sources[-1]
        assert isinstance(top, TocLayer) and top.toc_format == compression
        assert isinstance(source, RemoteBlob)
        digest = remote.image.manifest["layers"][-1]["digest"]
        size = source.size
        assert size > len(big)
        listed = sorted(remote.listdir("/"))
        assert "big" in listed and "small" in listed
        # listing: the footer (eStargz) and the TOC (zstd:chunked: where the
        # annotation says), far less than the blob
        asked = [(first, last) for name, first, last in seen if name == digest]
        assert asked and all(first is not None and last is not None for first, last in asked)
        listing_bytes = sum(last - first + 1 for first, last in asked)
        assert len(asked) <= 2 and listing_bytes < 64 << 10
        assert source.bytes_fetched <= listing_bytes
        # cat of a small file: its chunk only; of the big one: its chunks only
        assert remote.read_bytes("/small") == small
        after_small = sum(last - first + 1 for name, first, last in seen if name == digest)
        assert 0 < after_small - listing_bytes < 64 << 10
        assert remote.read_bytes("/big") == big
        total = sum(last - first + 1 for name, first, last in seen if name == digest)
        assert total <= size + (64 << 10)
        print(f"{compression}: blob {size} B, listing requested {listing_bytes} B, "
              f"cat /small {after_small - listing_bytes} B, total {total} B")
    # nothing of the layer landed in the registry blob cache
    kept = tmp_path / "cache" / "registry" / "blobs" / "sha256" / digest.partition(":")[2]
    assert not kept.exists()
    # a reopen (a fresh cache object) reads the footer and TOC it kept, and the
    # chunks it kept (index/sha256/<hex>.toc, ranges/sha256/<hex>.ranges): no request
    before = len([name for name, _, _ in seen if name == digest])
    with layerfs.open(f"docker://{registry.host}/demo/lazytoc:v1",
                      cache=IndexCache(tmp_path / "cache"), registry=Options(lazy=True)) as again:
        assert "big" in again.listdir("/")
        assert again.read_bytes("/small") == small and again.read_bytes("/big") == big
    assert len([name for name, _, _ in seen if name == digest]) == before


@pytest.mark.parametrize("compression", ["estargz", "zstd:chunked"])
def test_a_toc_layer_without_annotations_is_downloaded_whole_once_only(
        registry, tmp_path, compression):
    """Item 2 of issue 12's registry side: the first open downloads the
    layer whole to trust its TOC (no annotation says its digest); the TOC
    is then kept by blob digest, so a reopen, even in another process,
    fetches nothing to list, and the chunks read are kept too (a reopen
    cats a file read before with no byte fetched)."""
    import os
    import random
    import subprocess
    import sys

    from servers import CountingProxy
    big = random.Random(9).randbytes(3 << 20)
    small = b"hello without annotations\n"
    result = commit_big_and_small(tmp_path, compression, big, small)
    manifest = registry.push_without_toc_annotations(result.dest, "demo/bare", "v1")
    size = manifest["layers"][-1]["size"]
    proxy = CountingProxy(registry.url)
    try:
        ref = f"docker://{proxy.host}/demo/bare:v1"
        with layerfs.open(ref, cache=IndexCache(tmp_path / "cache")) as remote:
            top = remote.layers[-1]
            assert isinstance(top, TocLayer) and top.toc_format == compression
            assert remote.read_bytes("/small") == small
        first = proxy.blob_bytes
        assert first >= size
        proxy.reset()
        with layerfs.open(ref, cache=IndexCache(tmp_path / "cache")) as remote:
            assert isinstance(remote.layers[-1], TocLayer)
            assert "small" in remote.listdir("/")
            listing = proxy.blob_bytes
            assert remote.read_bytes("/small") == small      # its chunk was kept
            cat = proxy.blob_bytes - listing
            assert remote.read_bytes("/big") == big
            cat_big = proxy.blob_bytes - listing - cat
        assert listing == 0 and cat == 0 and len(big) < cat_big < size
        proxy.reset()
        env = dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "cache"))
        done = subprocess.run([sys.executable, "-m", "layerfs.cli", "cat", ref, "/big"],
                              capture_output=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert done.stdout == big and proxy.blob_bytes == 0
        print(f"{compression}: blob {size} B; first open and cat /small {first} B; "
              f"reopen: listing {listing} B, cat /small {cat} B, cat /big {cat_big} B; "
              f"another process: cat /big 0 B")
    finally:
        proxy.close()


def estargz_with_landmark(files: list) -> tuple[bytes, dict]:
    """An eStargz blob of (name, bytes) regular files in that order (a name
    may be ``.prefetch.landmark``), and the descriptor annotations."""
    import io
    import stat

    from layerfs.tarwrite import LayerTarWriter
    from layerfs.union import Node
    out = io.BytesIO()
    writer = LayerTarWriter(out, compression="estargz")
    for ino, (name, data) in enumerate(files, start=2):
        node = Node(ino, stat.S_IFREG | 0o644, 0, 0, 1_700_000_000 * 10**9, len(data))
        writer.add("/" + name, node, lambda offset, length, data=data:
                   data[offset:offset + length])
    writer.close()
    return out.getvalue(), writer.annotations


def test_the_prioritised_files_before_the_landmark_are_fetched_on_open(
        registry, tmp_path, monkeypatch):
    """eStargz's prefetch landmark: the files before ``.prefetch.landmark``
    come in one request when the layer is opened, verified and kept; reading
    them then asks nothing more, and a file after the landmark is fetched
    when read.  A reopen fetches nothing (they were kept on disk)."""
    import gzip
    import hashlib
    import random

    from layerfs.estargz import LANDMARK_CONTENTS, PREFETCH_LANDMARK
    from layerfs.registry import Options
    rng = random.Random(11)
    first, second, later = rng.randbytes(200_000), b"second\n", rng.randbytes(300_000)
    blob, annotations = estargz_with_landmark(
        [("first", first), ("second", second), (PREFETCH_LANDMARK, LANDMARK_CONTENTS),
         ("later", later)])
    tar = gzip.decompress(blob)
    layer_digest = registry.push_blob("demo/landmark", blob)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": registry.push_blob("demo/landmark", config),
                           "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": layer_digest, "size": len(blob),
                            "annotations": annotations}]}
    registry.push_manifest("demo/landmark", "v1", manifest)
    seen = _ranges_requested(monkeypatch)
    ref = f"docker://{registry.host}/demo/landmark:v1"

    def asked() -> list:
        return [(a, b) for name, a, b in seen if name == layer_digest]
    with layerfs.open(ref, cache=IndexCache(tmp_path / "cache"),
                      registry=Options(lazy=True)) as fs:
        opened = asked()
        assert len(opened) == 3                  # footer, TOC, prioritised files
        first_at, last_at = opened[-1]
        assert last_at - first_at + 1 < len(first) + len(later)
        assert fs.read_bytes("/first") == first and fs.read_bytes("/second") == second
        assert asked() == opened                 # nothing more
        assert fs.read_bytes("/later") == later
        assert len(asked()) == 4
    with layerfs.open(ref, cache=IndexCache(tmp_path / "cache"),
                      registry=Options(lazy=True)) as fs:
        for name, data in (("first", first), ("second", second), ("later", later)):
            assert fs.read_bytes("/" + name) == data
    assert len(asked()) == 4                     # the reopen fetched nothing
