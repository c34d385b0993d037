"""The registry commands as a user types them: pull, inspect, copy, tags,
mount and commit of a docker:// image."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import layerfs
from layerfs.commit import commit
from layerfs.example import build_example
from layerfs.layer import IndexCache

from mount_helpers import force_unmount, is_mounted, requires_fuse
from test_registry_read import push_layout


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120,
                          stdin=subprocess.DEVNULL)


def ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "cache"),
                REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"))


@pytest.fixture
def pushed(registry, tmp_path):
    example = build_example(str(tmp_path / "example"))
    digest = push_layout(registry, example, "demo/example", "v1")
    push_layout(registry, example, "demo/example", "v2")
    return example, digest


def layer_files(tmp_path) -> list[str]:
    root = tmp_path / "cache" / "registry" / "blobs"
    return [name for _, _, names in os.walk(root) for name in names]


def test_inspect_fetches_no_layer_then_pull_then_offline(registry, pushed, env, tmp_path):
    example, digest = pushed
    ref = f"docker://{registry.host}/demo/example:v1"
    report = json.loads(ok(cli("inspect", "--json", ref, env=env)))
    assert report["reference"] == ref
    assert report["resolved_digest"] == report["manifest_digest"] == digest
    assert report["config"]["rootfs"]["type"] == "layers"
    assert len(report["layers"]) == 3
    fetched = layer_files(tmp_path)
    assert len(fetched) == 2                               # the manifest and the config
    for layer in report["layers"]:
        assert layer["digest"].partition(":")[2] not in fetched
    text = ok(cli("inspect", ref, env=env))
    assert f"manifest:  {digest}" in text and "layer 2:" in text
    assert ok(cli("pull", ref, env=env)).strip() == digest
    assert len(layer_files(tmp_path)) == 5
    registry.stop()
    assert ok(cli("cat", "--offline", ref, "/etc/motd", env=env)).startswith("Welcome")
    result = cli("cat", ref, "/etc/motd", env=env)
    assert result.returncode == 1 and "cannot reach registry" in result.stderr
    pinned = f"docker://{registry.host}/demo/example@{digest}"
    assert ok(cli("cat", pinned, "/etc/motd", env=env)).startswith("Welcome")


def test_copy_to_a_layout_keeps_every_digest(registry, pushed, env, tmp_path):
    example, digest = pushed
    dest = tmp_path / "copied"
    ref = f"docker://{registry.host}/demo/example:v1"
    assert ok(cli("copy", ref, f"oci:{dest}:mine", env=env)).strip() == digest
    assert ok(cli("copy", f"docker://{registry.host}/demo/example:v2", f"oci:{dest}",
                  env=env)).strip() == digest
    listing = ok(cli("tags", dest, env=env)).splitlines()
    assert sorted(line.split("\t")[0] for line in listing) == ["mine", "v2"]
    assert ok(cli("cat", f"oci:{dest}:mine", "/etc/motd", env=env)).startswith("Welcome")
    with layerfs.open(f"oci:{dest}:v2") as fs, layerfs.open(example) as original:
        assert fs.image.manifest_digest == original.image.manifest_digest
        assert fs.image.config_digest == original.image.config_digest
    result = cli("copy", ref, str(dest), env=env)
    assert result.returncode == 2 and "oci:DIR[:TAG]" in result.stderr


def test_tags_of_a_repository(registry, pushed, env):
    assert ok(cli("tags", f"docker://{registry.host}/demo/example", env=env)).split() == [
        "v1", "v2"]


def test_commit_of_a_registry_image_writes_a_layout_with_its_base_blobs(
        registry, pushed, tmp_path):
    example, digest = pushed
    cache = IndexCache(tmp_path / "cache")
    ref = f"docker://{registry.host}/demo/example:v1"
    with layerfs.open(ref, upper=tmp_path / "up", cache=cache) as fs:
        assert fs.image.manifest_digest == digest and fs.image.chain_id()
        fs.write_bytes("/etc/motd", b"changed\n")
        result = commit(fs, tmp_path / "out", tag="next")
    registry.stop()
    with layerfs.open(f"oci:{tmp_path / 'out'}:next", cache=False) as fs:
        assert fs.read_bytes("/etc/motd") == b"changed\n"
        assert fs.read_bytes("/bin/hello").endswith(b"echo hello from layerfs\n")
        assert len(fs.image.layers) == 4
    assert result.manifest_digest.startswith("sha256:")


@requires_fuse
@pytest.mark.mount
def test_mount_a_registry_image(registry, pushed, env, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    ref = f"docker://{registry.host}/demo/example:v1"
    try:
        ok(cli("mount", ref, mountpoint, env=env))
        assert is_mounted(str(mountpoint))
        assert (mountpoint / "etc" / "motd").read_text().startswith("Welcome")
    finally:
        force_unmount(str(mountpoint))


def test_pull_shows_progress_on_a_terminal_only(registry, pushed, env, tmp_path):
    import pty
    ref = f"docker://{registry.host}/demo/example:v1"
    quiet = cli("pull", ref, env=dict(env, LAYERFS_CACHE_DIR=str(tmp_path / "quiet")))
    assert quiet.returncode == 0 and quiet.stderr == ""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "layerfs.cli", "pull", ref],
                                   env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=slave)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:            # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            seen += chunk
        stdout = process.communicate(timeout=60)[0]
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert process.returncode == 0
    assert stdout.decode().strip().startswith("sha256:")
    assert b"fetching [" in seen and b"100%" in seen


def test_without_a_cache_nothing_stays_behind(registry, pushed, tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None
    try:
        ref = f"docker://{registry.host}/demo/example:v1"
        with layerfs.open(ref, cache=False, upper=tmp_path / "up") as fs:
            assert os.listdir(tmp_path / "tmp")
            fs.write_bytes("/etc/motd", b"x\n")
            commit(fs, tmp_path / "out", tag="t")
        assert os.listdir(tmp_path / "tmp") == []
    finally:
        tempfile.tempdir = None
    with layerfs.open(f"oci:{tmp_path / 'out'}:t", cache=False) as fs:
        assert fs.read_bytes("/etc/motd") == b"x\n"
