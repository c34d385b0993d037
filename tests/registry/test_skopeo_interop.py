"""What layerfs writes, skopeo reads, and the other way round: images that
skopeo pushes to a real registry or saves as archives open in layerfs with
the same view, and the layouts and commits layerfs writes are images that
skopeo copies without complaint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import layerfs
from layerfs.testing.view import assert_views_equal, snapshot

from registry_helpers import requires

SKOPEO = shutil.which("skopeo")


def skopeo(*args: str) -> subprocess.CompletedProcess:
    requires(SKOPEO, "skopeo", "skopeo")
    result = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def cli(*args, cache):
    return subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, LAYERFS_CACHE_DIR=str(cache)))


def view_of(reference, cache):
    with layerfs.open(reference, cache=cache) as fs:
        return snapshot(fs)


def test_an_image_skopeo_pushes_reads_as_its_layout(registry, example, cache):
    skopeo("copy", "--dest-tls-verify=false", f"oci:{example}",
           f"docker://{registry.host}/interop/example:v1")
    remote = f"docker://{registry.host}/interop/example:v1"
    assert_views_equal(view_of(example, cache), view_of(remote, cache))
    pushed = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", remote).stdout)
    with layerfs.open(remote, cache=cache) as fs:
        assert [layer.digest for layer in fs.image.layers] == \
            [layer["digest"] for layer in pushed["layers"]]


def test_archives_skopeo_writes_read_as_its_layout(example, cache, tmp_path):
    expected = view_of(example, cache)
    docker_archive = tmp_path / "saved.tar"
    oci_archive = tmp_path / "image.tar"
    skopeo("copy", f"oci:{example}", f"docker-archive:{docker_archive}:interop/example:v1")
    skopeo("copy", f"oci:{example}", f"oci-archive:{oci_archive}:v1")
    assert_views_equal(expected, view_of(f"docker-archive:{docker_archive}", cache))
    assert_views_equal(expected, view_of(f"oci-archive:{oci_archive}:v1", cache))


def test_a_layout_layerfs_copies_from_a_registry_is_one_skopeo_reads(
        registry, example, cache, tmp_path):
    skopeo("copy", "--dest-tls-verify=false", f"oci:{example}",
           f"docker://{registry.host}/interop/example:v1")
    layout = tmp_path / "copied"
    result = cli("copy", f"docker://{registry.host}/interop/example:v1", f"oci:{layout}:saved",
                 cache=tmp_path / "cli-cache")
    assert result.returncode == 0, result.stderr
    inspected = json.loads(skopeo("inspect", f"oci:{layout}:saved").stdout)
    assert inspected["Digest"] == result.stdout.strip()
    again = tmp_path / "again"
    skopeo("copy", f"oci:{layout}:saved", f"oci:{again}:v1")
    assert_views_equal(view_of(example, cache), view_of(f"oci:{again}:v1", cache))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_a_commit_skopeo_pushes_to_a_registry_reads_back(
        registry, example, cache, tmp_path, compression):
    upper = tmp_path / "upper"
    with layerfs.open(example, upper=str(upper), cache=cache) as fs:
        fs.write_bytes("/etc/added", b"written by layerfs\n")
        fs.remove("/etc/motd")
        committed = tmp_path / "committed"
        fs.commit(str(committed), tag="c1", compression=compression)
        expected = snapshot(fs)
    skopeo("copy", "--dest-tls-verify=false", f"oci:{committed}:c1",
           f"docker://{registry.host}/interop/committed:c1")
    remote = f"docker://{registry.host}/interop/committed:c1"
    assert_views_equal(expected, view_of(remote, cache))
