"""The index cache never serves a blob that changed since it was indexed,
and what layerfs itself does to a blob does not force a re-hash."""

import json
import os

import pytest

import layerfs
from layerfs import layer as layer_module
from layerfs.errors import ImageError
from layerfs.example import build_example


def blob_paths(layout):
    index = json.loads(open(os.path.join(layout, "index.json")).read())
    manifest_hex = index["manifests"][0]["digest"].partition(":")[2]
    manifest = json.loads(open(os.path.join(layout, "blobs", "sha256", manifest_hex)).read())
    return [os.path.join(layout, "blobs", "sha256", d["digest"].partition(":")[2])
            for d in manifest["layers"]]


@pytest.fixture
def indexings(monkeypatch):
    """Counts the layers indexed (hashed and parsed) rather than found in the cache."""
    calls = []
    original = layer_module._Opener.index

    def counting(self, *args, **kwargs):
        calls.append(self.label)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_module._Opener, "index", counting)
    return calls


def test_an_in_place_edit_that_keeps_size_and_mtime_is_caught(tmp_path, indexings):
    image = build_example(str(tmp_path / "image"))
    with layerfs.open(image) as fs:
        assert fs.read_text("/etc/motd")
    base = blob_paths(image)[0]          # an uncompressed tar
    before = os.stat(base)
    with open(base, "r+b") as blob:      # same size, same mtime, other bytes
        blob.seek(before.st_size - 2048)
        blob.write(b"tampered")
    os.utime(base, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ImageError, match="sha256:"):
        layerfs.open(image)


def test_an_untouched_image_is_not_hashed_again(tmp_path, indexings):
    image = build_example(str(tmp_path / "image"))
    layerfs.open(image).close()
    assert len(indexings) == 3
    layerfs.open(image).close()
    assert len(indexings) == 3


def test_hardlinking_into_a_committed_layout_keeps_the_blobs_trusted(tmp_path, indexings):
    image = build_example(str(tmp_path / "image"))
    with layerfs.open(image, upper=str(tmp_path / "up")) as fs:
        fs.write_text("/etc/motd", "new\n")
        fs.commit(tmp_path / "out", tag="next")
    assert os.stat(blob_paths(image)[0]).st_nlink == 2      # the base blob was hardlinked
    indexed = len(indexings)
    layerfs.open(image).close()
    assert len(indexings) == indexed                        # the source: not hashed again
    with layerfs.open(f"oci:{tmp_path / 'out'}:next") as committed:
        assert committed.read_text("/etc/motd") == "new\n"
    assert len(indexings) == indexed + 1                    # only the new layer
