"""``export`` and ``commit`` as a user runs them: where the tar goes, how it
is compressed, the order that lets ``tar -x`` restore directory times, and
reproducible commits."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

import layerfs
from layerfs.commit import commit
from layerfs.example import build_example

OLD = 1_000_000_000      # 2001: any time an extraction cannot produce by accident


def run(*args, check=True, **kwargs):
    result = subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                            capture_output=True, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def layer_with_siblings(path):
    """``d``, ``d-x`` and ``d/f``: a byte sort puts ``d-x`` between ``d`` and
    ``d/f`` (``-`` sorts before ``/``)."""
    with tarfile.open(path, "w") as tar:
        for number, name in enumerate(["d", "d-x", "d/sub", "d-x/g"]):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, OLD + number
            tar.addfile(info)
        for name in ["d/f", "d/sub/h", "d-x/g/i", "d.y"]:
            info = tarfile.TarInfo(name)
            info.mtime, info.size = OLD, 2
            tar.addfile(info, io.BytesIO(b"x\n"))
    return path


def directory_mtimes(top):
    return {os.path.relpath(root, top): int(os.stat(root).st_mtime)
            for root, _, _ in os.walk(top)}


@pytest.mark.skipif(shutil.which("tar") is None and not os.environ.get("CI"),
                    reason="GNU tar is not installed")
def test_tar_x_of_an_export_restores_every_directory_mtime(tmp_path):
    layer = layer_with_siblings(tmp_path / "layer.tar")
    run("export", "--layer", layer, tmp_path / "flat.tar")
    names = tarfile.open(tmp_path / "flat.tar").getnames()
    assert names.index("d/sub/h") < names.index("d-x")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", tmp_path / "flat.tar", "-C", out], check=True)
    expected = {"d": OLD, "d-x": OLD + 1, "d/sub": OLD + 2, "d-x/g": OLD + 3}
    mtimes = directory_mtimes(out)
    assert {name: mtimes[name] for name in expected} == expected


def test_commit_writes_the_changeset_in_path_component_order(tmp_path):
    image = build_example(str(tmp_path / "image"))
    with layerfs.open(image, upper=str(tmp_path / "up")) as fs:
        fs.mkdir("/n")
        fs.mkdir("/n-x")
        fs.write_bytes("/n/f", b"1")
        fs.write_bytes("/n-x/g", b"1")
        result = commit(fs, str(tmp_path / "out"), tag="t")
    with tarfile.open(result.layer_path) as tar:
        names = [name for name in tar.getnames() if name.startswith("n")]
    assert names == ["n", "n/f", "n-x", "n-x/g"]


def test_export_to_standard_output(tmp_path):
    image = build_example(str(tmp_path / "image"))
    with open(tmp_path / "out.tar", "wb") as out:
        result = subprocess.run([sys.executable, "-m", "layerfs.cli", "export", image, "-"],
                                stdout=out, stderr=subprocess.PIPE)
    assert result.returncode == 0 and result.stderr == b""
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert tar.extractfile("etc/motd").read().startswith(b"Welcome")


@pytest.mark.parametrize("name, option, kind", [
    ("flat.tar", None, "none"), ("flat.tar.gz", None, "gzip"), ("flat.tgz", None, "gzip"),
    ("flat.tar.zst", None, "zstd"), ("flat.tar.gz", "none", "none"), ("flat.tar", "zstd", "zstd"),
])
def test_export_compression_follows_the_option_else_the_extension(tmp_path, name, option, kind):
    image = build_example(str(tmp_path / "image"))
    run("export", *(["--compression", option] if option else []), image, tmp_path / name)
    with layerfs.open(str(tmp_path / name)) as exported:
        assert exported.layers[0].compression == kind
        assert exported.read_bytes("/etc/motd").startswith(b"Welcome")


def test_export_refuses_to_overwrite_an_input_layer(tmp_path):
    layer = layer_with_siblings(tmp_path / "layer.tar")
    before = layer.read_bytes()
    result = run("export", "--layer", layer, layer, check=False)
    assert result.returncode == 1 and b"Traceback" not in result.stderr
    assert b"layer" in result.stderr and str(layer).encode() in result.stderr
    assert layer.read_bytes() == before


def committed_config(dest):
    index = json.loads((dest / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((dest / "blobs" / "sha256" / manifest_digest[7:]).read_text())
    config = json.loads((dest / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text())
    return manifest_digest, manifest, config


def test_commit_is_gzip_dated_and_reproducible_with_source_date_epoch(tmp_path):
    image = build_example(str(tmp_path / "image"))
    upper = tmp_path / "up"
    with layerfs.open(image, upper=str(upper)) as fs:
        fs.write_bytes("/etc/motd", b"changed\n")
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    digests = []
    for dest in ("a", "b"):
        run("commit", image, upper, tmp_path / dest, env=env)
        digest, manifest, config = committed_config(tmp_path / dest)
        digests.append(digest)
        assert manifest["layers"][-1]["mediaType"].endswith("tar+gzip")
        assert config["created"] == "2023-11-14T22:13:20Z"
        assert config["history"][-1] == {"created": "2023-11-14T22:13:20Z",
                                         "created_by": "layerfs commit"}
    assert digests[0] == digests[1]


def test_commit_without_source_date_epoch_is_dated_now(tmp_path):
    image = build_example(str(tmp_path / "image"))
    upper = tmp_path / "up"
    with layerfs.open(image, upper=str(upper)) as fs:
        fs.write_bytes("/etc/motd", b"changed\n")
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    run("commit", image, upper, tmp_path / "out", env=env)
    _, _, config = committed_config(tmp_path / "out")
    assert config["created"] > "2026-01-01" and config["created"] == config["history"][-1]["created"]


def test_a_bad_source_date_epoch_is_one_line(tmp_path):
    image = build_example(str(tmp_path / "image"))
    upper = tmp_path / "up"
    with layerfs.open(image, upper=str(upper)) as fs:
        fs.write_bytes("/etc/motd", b"changed\n")
    result = run("commit", image, upper, tmp_path / "out", check=False,
                 env=dict(os.environ, SOURCE_DATE_EPOCH="yesterday"))
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [
        "layerfs: SOURCE_DATE_EPOCH='yesterday' is not a number of seconds since 1970"]
