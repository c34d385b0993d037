import pytest

from registry_helpers import Registry


@pytest.fixture
def registry(tmp_path):
    server = Registry(tmp_path / "registry")
    yield server
    server.close()
