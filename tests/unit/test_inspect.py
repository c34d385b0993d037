"""What users look for in an image config: ``inspect`` shows it, and
``fs.image`` gives it to Python (env, entrypoint, cmd, history per layer)."""

import io
import json
import subprocess
import sys
import tarfile

import pytest

import layerfs
from layerfs.imagewrite import write_oci_layout

CONFIG = {
    "architecture": "amd64", "os": "linux",
    "config": {
        "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "EMPTY"],
        "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi there"],
        "WorkingDir": "/srv", "User": "app",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "Labels": {"org.opencontainers.image.title": "demo", "a": "b"},
    },
    "history": [
        {"created": "2024-01-01T00:00:00Z", "created_by": "ENV LANG=C.UTF-8", "empty_layer": True},
    ],
}
LAYER_HISTORY = [
    {"created": "2024-01-02T00:00:00Z", "created_by": "RUN mkdir\n   /etc"},
    {"created": "2024-01-03T00:00:00Z", "created_by": "COPY motd /etc/"},
]


def run(*args):
    result = subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def layer(path, name, payload=None):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        if payload is None:
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        else:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    top = tmp_path_factory.mktemp("inspect")
    layers = [layer(top / "a.tar", "etc"), layer(top / "b.tar", "etc/motd", b"hi\n")]
    write_oci_layout(str(top / "image"), layers, config=CONFIG, history=LAYER_HISTORY,
                     tag="t")
    return top / "image"


def test_inspect_shows_the_settings_labels_aligned_and_history_per_layer(image):
    out = run("inspect", image)
    for line in ["Entrypoint:      /bin/sh -c", "Cmd:             'echo hi there'",
                 "WorkingDir:      /srv", "User:            app",
                 "ExposedPorts:    53/udp 8080/tcp", "  LANG=C.UTF-8",
                 "  a                               b",
                 "  org.opencontainers.image.title  demo",
                 "  created by: RUN mkdir /etc", "  created by: COPY motd /etc/",
                 "  created:    2024-01-03T00:00:00Z"]:
        assert line in out.splitlines(), line
    # The empty_layer entry made no layer: layer 0 was made by the RUN.
    assert out.index("RUN mkdir") < out.index("layer 1:") < out.index("COPY motd")


def test_inspect_json_counts_paths_unless_asked(image):
    report = json.loads(run("inspect", "--json", image))
    assert [l["added"] for l in report["layers"]] == [1, 1]
    assert report["layers"][1]["history"]["created_by"] == "COPY motd /etc/"
    report = json.loads(run("inspect", "--json", "--paths", image))
    assert [l["added"] for l in report["layers"]] == [["/etc"], ["/etc/motd"]]


def test_image_config_helpers(image):
    with layerfs.open(str(image)) as fs:
        assert fs.image.env == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "EMPTY": ""}
        assert fs.image.entrypoint == ["/bin/sh", "-c"]
        assert fs.image.cmd == ["echo hi there"]
        assert fs.image.settings["WorkingDir"] == "/srv"
        assert len(fs.image.history) == 3
        assert [h["created_by"] for h in fs.image.layer_history()] == [
            "RUN mkdir\n   /etc", "COPY motd /etc/"]


def test_image_config_helpers_on_a_bare_layer_stack(tmp_path):
    with layerfs.open([layer(tmp_path / "a.tar", "etc")]) as fs:
        assert (fs.image.env, fs.image.entrypoint, fs.image.cmd) == ({}, [], [])
        assert fs.image.layer_history() == [None]
