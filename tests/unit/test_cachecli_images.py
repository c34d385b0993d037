"""``layerfs cache ls`` names the local images a cached blob belongs to,
where the cache knows them (its stat memo), and nothing once they change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import layerfs
from layerfs.cache import IndexCache
from layerfs.example import build_example


def cache_ls(root) -> dict:
    done = subprocess.run([sys.executable, "-m", "layerfs.cli", "cache", "--cache-dir",
                           str(root), "ls", "--json"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_layers_of_a_local_layout_and_a_layer_file_name_their_image(tmp_path):
    layout = os.path.realpath(build_example(str(tmp_path / "example")))
    cache = IndexCache(tmp_path / "cache")
    with layerfs.open(layout, cache=cache) as fs:
        digests = [layer.digest for layer in fs.image.layers]
    loose = tmp_path / "loose.tar.gz"
    shutil.copy(os.path.join(layout, "blobs", *digests[0].split(":")), loose)
    layerfs.open([str(loose)], cache=cache).close()
    listed = cache_ls(tmp_path / "cache")
    images = {e["digest"]: e["images"] for e in listed["entries"] if e["kind"] == "index"}
    for digest in digests:
        assert f"oci:{layout}" in images[digest]
    assert str(os.path.realpath(loose)) in images[digests[0]]
    os.utime(loose, (1, 1))                      # changed since: the cache cannot tell
    images = {e["digest"]: e["images"] for e in cache_ls(tmp_path / "cache")["entries"]
              if e["kind"] == "index"}
    assert str(os.path.realpath(loose)) not in images[digests[0]]
    assert f"oci:{layout}" in images[digests[0]]
