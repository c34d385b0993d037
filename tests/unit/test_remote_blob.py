"""RemoteBlob's ranged reads (layerfs/remote.py) against a fake registry
client: a small read away from the response a pass streams is fetched aside,
so that the pass goes on with its response instead of asking again."""

import random

import requests

from layerfs.remote import RemoteBlob

DATA = random.Random(2).randbytes(3 << 20)


class FakeResponse:
    def __init__(self, body: bytes, status: int):
        self.status_code = status
        self._body = body

    def iter_content(self, size):
        for start in range(0, len(self._body), size):
            yield self._body[start:start + size]

    @property
    def content(self) -> bytes:
        return self._body

    def close(self) -> None:
        pass


class FakeClient:
    """Answers ``Range`` requests on DATA (or ignores them: *ranges*)."""
    requests = requests

    def __init__(self, ranges: bool = True):
        self.ref = type("Ref", (), {"repository": "repo"})()
        self.ranges = ranges
        self.asked: list = []

    def request(self, method, path, *, headers=None, stream=False):
        first, _, last = headers["Range"].removeprefix("bytes=").partition("-")
        self.asked.append((int(first), int(last)))
        if not self.ranges:
            return FakeResponse(DATA, 200)
        return FakeResponse(DATA[int(first):int(last) + 1], 206)


def test_a_small_read_near_the_end_does_not_drop_the_streamed_response():
    client = FakeClient()
    blob = RemoteBlob(client, "sha256:" + "a" * 64, len(DATA), "blob")
    assert blob.read_at(0, 4) == DATA[:4]
    assert blob.read_at(len(DATA) - 4, 4) == DATA[-4:]         # the gzip trailer
    assert blob.read_at(0, 4) == DATA[:4]
    assert blob.read_at(4, 1 << 20) == DATA[4:4 + (1 << 20)]   # the pass goes on
    assert client.asked == [(0, len(DATA) - 1), (len(DATA) - 4, len(DATA) - 1)]


def test_a_registry_ignoring_range_is_read_as_before():
    client = FakeClient(ranges=False)
    blob = RemoteBlob(client, "sha256:" + "a" * 64, len(DATA), "blob")
    assert blob.read_at(0, 4) == DATA[:4]
    assert blob.read_at(len(DATA) - 4, 4) == DATA[-4:]
    assert blob.read_at(100, 50) == DATA[100:150]


def test_reads_with_nothing_left_to_stream_open_a_response_as_before():
    client = FakeClient()
    blob = RemoteBlob(client, "sha256:" + "a" * 64, len(DATA), "blob")
    blob.read_ahead = 0                     # a TOC layer: exact ranges only
    assert blob.read_at(len(DATA) - 72, 72) == DATA[-72:]
    assert blob.read_at(10, 5) == DATA[10:15]
    assert client.asked == [(len(DATA) - 72, len(DATA) - 1), (10, 14)]
