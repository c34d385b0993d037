"""HTTPS: a registry with a certificate from a CA of the test's own, trusted
through a certs.d-style directory."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import pytest

import layerfs
from layerfs.errors import RegistryError
from layerfs.layer import IndexCache
from layerfs.registry import Options
from layerfs.registryconf import certificates

from registry_helpers import Registry, make_tls_files


def layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("tls")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"yes"))
    return out.getvalue()


@pytest.fixture
def tls_registry(tmp_path):
    files = make_tls_files(tmp_path / "pki")
    server = Registry(tmp_path / "registry", tls=files)
    server.files = files
    server.push_image("secure", "v1", [layer()])
    yield server
    server.close()


def test_https_with_a_ca_from_a_cert_dir(tls_registry, tmp_path):
    registry = tls_registry
    ref = f"docker://{registry.host}/secure:v1"
    with pytest.raises(RegistryError, match="certificate verify failed.*certs.d"):
        layerfs.open(ref, cache=IndexCache(tmp_path / "c1"))
    cert_dir = tmp_path / "certs.d" / registry.host
    cert_dir.mkdir(parents=True)
    shutil.copy(registry.files["ca"], cert_dir / "ca.crt")
    with layerfs.open(ref, cache=IndexCache(tmp_path / "c2"),
                      registry=Options(cert_dir=str(cert_dir))) as fs:
        assert fs.read_bytes("/tls") == b"yes"
    with layerfs.open(ref, cache=IndexCache(tmp_path / "c3"),
                      registry=Options(tls_verify=False)) as fs:
        assert fs.read_bytes("/tls") == b"yes"


def test_https_from_the_command_line(tls_registry, tmp_path):
    import subprocess
    import sys
    registry = tls_registry
    env = dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "cache"),
               REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"))
    ref = f"docker://{registry.host}/secure:v1"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "layerfs.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)
    refused = run("cat", ref, "/tls")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "certificate verify failed" in refused.stderr
    cert_dir = tmp_path / "ca"
    cert_dir.mkdir()
    shutil.copy(registry.files["ca"], cert_dir / "ca.crt")
    trusted = run("cat", "--cert-dir", str(cert_dir), ref, "/tls")
    assert trusted.returncode == 0 and trusted.stdout == "yes", trusted.stderr
    insecure = run("cat", "--tls-verify=false", "--cache-dir", str(tmp_path / "c2"), ref, "/tls")
    assert insecure.stdout == "yes" and insecure.stderr == ""


def test_certs_d_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    directory = tmp_path / ".config" / "containers" / "certs.d" / "r.io:5000"
    directory.mkdir(parents=True)
    files = make_tls_files(tmp_path / "pki")
    shutil.copy(files["ca"], directory / "ca.crt")
    shutil.copy(files["cert"], directory / "client.cert")
    shutil.copy(files["key"], directory / "client.key")
    bundle, client = certificates("r.io:5000")
    with open(bundle, "rb") as handle, open(files["ca"], "rb") as ca:
        content = handle.read()
        assert ca.read() in content and content.count(b"BEGIN CERTIFICATE") > 2
    assert client == (str(directory / "client.cert"), str(directory / "client.key"))
    assert certificates("other.io") == (None, None) or not os.path.isdir(
        "/etc/containers/certs.d/other.io")
