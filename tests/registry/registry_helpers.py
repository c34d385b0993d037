"""A real registry on loopback for the tests: Debian's ``docker-registry``
(the CNCF distribution server) started from a config in the test's temp
dir, on a free port, and stopped by its handle; images pushed with
``requests`` through the distribution API."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import requests

REGISTRY = shutil.which("docker-registry")
HTPASSWD = shutil.which("htpasswd")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def requires(tool, name, package):
    """Skip without *tool*, except under CI=true, where its absence is a
    failure: .ci/run installs *package*."""
    if tool is None and os.environ.get("CI") != "true":
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    assert tool is not None, f"{name} is missing: .ci/run must install {package}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """One ``docker-registry serve`` process.  ``url`` is its base URL,
    ``host`` what a ``docker://`` reference names, ``storage`` its root
    directory (``docker/registry/v2/blobs/sha256/XX/HEX/data``)."""

    def __init__(self, workdir, *, auth: dict | None = None, middleware: dict | None = None,
                 storage: str | None = None, tls: dict | None = None):
        requires(REGISTRY, "docker-registry", "docker-registry")
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.storage = storage or os.path.join(self.workdir, "storage")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.verify = tls["ca"] if tls else True
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": self.storage},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if auth:
            config["auth"] = auth
        if middleware:
            config["middleware"] = middleware
        if tls:
            config["http"]["tls"] = {"certificate": tls["cert"], "key": tls["key"]}
        self.config = os.path.join(self.workdir, "config.yml")
        with open(self.config, "w") as handle:
            json.dump(config, handle)        # YAML is a superset of JSON
        self.log = open(os.path.join(self.workdir, "registry.log"), "wb")
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen([REGISTRY, "serve", self.config], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{self.url}/v2/", timeout=2, verify=self.verify)
                return
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    with open(self.log.name, "rb") as log:
                        raise RuntimeError(f"registry did not start: {log.read()[-2000:]}")
                time.sleep(0.05)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self):
        self.stop()
        self.log.close()

    def blob_file(self, digest: str) -> str:
        hex_ = digest.partition(":")[2]
        return os.path.join(self.storage, "docker", "registry", "v2", "blobs", "sha256",
                            hex_[:2], hex_, "data")

    # ---- pushing

    def push_blob(self, repo: str, data: bytes, auth=None) -> str:
        digest = sha256(data)
        start = requests.post(f"{self.url}/v2/{repo}/blobs/uploads/", auth=auth, timeout=30,
                              verify=self.verify)
        assert start.status_code == 202, start.text
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        separator = "&" if "?" in location else "?"
        done = requests.put(f"{location}{separator}digest={digest}", data=data, auth=auth,
                            headers={"Content-Type": "application/octet-stream"}, timeout=30,
                            verify=self.verify)
        assert done.status_code == 201, done.text
        return digest

    def push_manifest(self, repo: str, reference: str, document: dict, auth=None) -> str:
        data = json.dumps(document).encode()
        answer = requests.put(f"{self.url}/v2/{repo}/manifests/{reference}", data=data,
                              auth=auth, headers={"Content-Type": document["mediaType"]},
                              timeout=30, verify=self.verify)
        assert answer.status_code == 201, answer.text
        return sha256(data)

    def push_without_toc_annotations(self, layout: str, repo: str, tag: str) -> dict:
        """Push the image of the OCI layout *layout* with its layers'
        annotations removed (as a tool that drops them would): a TOC layer
        is then found only by its footer.  Returns the manifest pushed."""
        with open(os.path.join(layout, "index.json")) as handle:
            entry = json.load(handle)["manifests"][0]

        def blob(digest):
            with open(os.path.join(layout, "blobs", *digest.split(":")), "rb") as handle:
                return handle.read()
        manifest = json.loads(blob(entry["digest"]))
        for desc in [manifest["config"], *manifest["layers"]]:
            self.push_blob(repo, blob(desc["digest"]))
            desc.pop("annotations", None)
        self.push_manifest(repo, tag, manifest)
        return manifest

    def push_image(self, repo: str, tag: str | None, layers: list[bytes], *,
                   layer_types: list[str] | None = None, platform=("linux", "amd64", None),
                   diff_ids: list[str] | None = None, auth=None) -> dict:
        """Push an image of the given layer blobs; returns its manifest
        digest, manifest and config.  *diff_ids* default to the layers'
        own digests (right for uncompressed layers)."""
        os_, arch, variant = platform
        config = {"architecture": arch, "os": os_,
                  "config": {"Env": ["PATH=/usr/bin"]},
                  "rootfs": {"type": "layers",
                             "diff_ids": diff_ids or [sha256(layer) for layer in layers]}}
        if variant:
            config["variant"] = variant
        config_bytes = json.dumps(config).encode()
        types = layer_types or ["application/vnd.oci.image.layer.v1.tar"] * len(layers)
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.push_blob(repo, config_bytes, auth),
                       "size": len(config_bytes)},
            "layers": [{"mediaType": kind, "digest": self.push_blob(repo, layer, auth),
                        "size": len(layer)} for kind, layer in zip(types, layers)],
        }
        digest = self.push_manifest(repo, tag or sha256(json.dumps(manifest).encode()),
                                    manifest, auth)
        return {"digest": digest, "manifest": manifest, "config": config,
                "size": len(json.dumps(manifest).encode())}

    def push_index(self, repo: str, tag: str, images: list[tuple[tuple, dict]], auth=None) -> str:
        entries = []
        for (os_, arch, variant), pushed in images:
            platform = {"os": os_, "architecture": arch}
            if variant:
                platform["variant"] = variant
            entries.append({"mediaType": OCI_MANIFEST, "digest": pushed["digest"],
                            "size": pushed["size"], "platform": platform})
        return self.push_manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                              "manifests": entries}, auth)


def htpasswd_line(user: str, password: str) -> str:
    requires(HTPASSWD, "htpasswd", "apache2-utils")
    return subprocess.run([HTPASSWD, "-Bbn", user, password], capture_output=True, text=True,
                          check=True).stdout.strip()


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def make_tls_files(directory) -> dict:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by
    it, as PEM files in *directory*: ``ca``, ``cert``, ``key``."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    os.makedirs(str(directory), exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerfs test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: os.path.join(str(directory), f"{name}.pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as handle:
        handle.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return paths
