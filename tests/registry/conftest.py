import pytest

from layerfs.example import build_example
from layerfs.layer import IndexCache

from registry_helpers import Registry


@pytest.fixture
def example(tmp_path):
    """The example image (an OCI layout) to push or compare with."""
    return build_example(str(tmp_path / "example"))


@pytest.fixture
def cache(tmp_path):
    return IndexCache(tmp_path / "cache")


@pytest.fixture
def registry(tmp_path):
    server = Registry(tmp_path / "registry")
    yield server
    server.close()
