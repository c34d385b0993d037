"""eStargz and zstd:chunked images pulled from a real registry on loopback
open through their tables of contents, with the same view as the layout
they were pushed from.  (Until the remote blob source is on main, a
docker:// layer is downloaded before it is opened: what the TOC path saves
over the network is shown with a counting blob source in
tests/unit/test_toc.py.)"""

from __future__ import annotations

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
