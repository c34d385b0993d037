"""The registry blob cache: names come from registries, so they are checked."""

import pytest

from layerfs.errors import UnsupportedImageError
from layerfs.remote import BlobCache

GOOD = "sha256:" + "ab" * 32


def test_only_verifiable_digests_become_file_names(tmp_path):
    cache = BlobCache(str(tmp_path))
    assert cache.blob_path(GOOD) == str(tmp_path / "registry" / "blobs" / "sha256" / ("ab" * 32))
    for bad in ("sha256:../../etc/passwd", "md5:" + "a" * 32, "sha256:" + "AB" * 32,
                "../x:" + "ab" * 32, "sha256:" + "ab" * 31, "", None):
        with pytest.raises(UnsupportedImageError):
            cache.blob_path(bad)


def test_put_and_tags(tmp_path):
    from layerfs.reference import parse_reference
    cache = BlobCache(str(tmp_path))
    cache.put(GOOD, b"data")
    assert cache.has(GOOD) and cache.read(GOOD) == b"data"
    ref = parse_reference("docker://r.io:5000/team/app:v1")
    assert cache.recall_tag(ref) is None
    cache.remember_tag(ref, GOOD, "application/vnd.oci.image.manifest.v1+json")
    assert cache.recall_tag(ref)["digest"] == GOOD
    assert cache.tag_path(ref).startswith(str(tmp_path / "registry" / "tags"))
