"""The sidecar's snapshot and journal against a plain dict: any sequence of
changes, compactions and crashes (a torn last line) reads back as the
changes made."""

from __future__ import annotations

import os

from hypothesis import given, strategies as st

from layerfs import sidecar
from layerfs.hostdir import HostDir
from layerfs.paths import is_within
from layerfs.sidecar import Sidecar

PATHS = st.sampled_from(["/a", "/a/b", "/a/b/c", "/a/x", "/d", "/d/a", "/é"])
RECORDS = st.fixed_dictionaries({"mode": st.integers(0, 0o7777)},
                                optional={"uid": st.integers(0, 70000)})
CHANGES = st.one_of(
    st.tuples(st.just("set"), PATHS, RECORDS),
    st.tuples(st.just("forget"), PATHS, st.booleans()),
    st.tuples(st.just("move"), PATHS, PATHS, st.booleans()),
    st.tuples(st.just("reopen")),
)


def model_apply(model: dict, change: tuple) -> None:
    if change[0] == "set":
        model[change[1]] = change[2]
    elif change[0] == "forget":
        _, path, subtree = change
        for p in [p for p in model if p == path or (subtree and is_within(p, path))]:
            del model[p]
    elif change[0] == "move":
        _, source, destination, subtree = change
        moved = {p: r for p, r in model.items()
                 if p == source or (subtree and is_within(p, source))}
        for p in moved:
            del model[p]
        for p, record in moved.items():
            model[destination + p[len(source):]] = record


def valid(change: tuple) -> bool:
    """Moves the store's callers never make: into their own subtree."""
    return not (change[0] == "move" and change[3] and is_within(change[2], change[1]))


@given(changes=st.lists(CHANGES, max_size=40), compaction=st.integers(1, 6),
       torn=st.binary(max_size=30).filter(lambda b: b"\n" not in b))
def test_the_journal_reads_back_as_the_changes_made(tmp_path_factory, changes, compaction,
                                                    torn):
    directory = str(tmp_path_factory.mktemp("sidecar"))
    os.mkdir(os.path.join(directory, "work"))
    host = HostDir(directory)
    old = sidecar.MIN_COMPACTION
    sidecar.MIN_COMPACTION = compaction
    try:
        store = Sidecar(host, writable=True)
        model: dict = {}
        for change in filter(valid, changes):
            if change[0] == "reopen":
                store.close()
                store = Sidecar(host, writable=True)
                assert store.records == model
                continue
            if change[0] == "set":
                store.set(change[1], change[2])
            elif change[0] == "forget":
                store.forget(change[1], subtree=change[2])
            else:
                store.move(change[1], change[2], subtree=change[3])
            model_apply(model, change)
            assert store.records == model
        store.close()
        with open(os.path.join(directory, sidecar.JOURNAL_FILE), "ab") as stream:
            stream.write(torn)                # a power loss in the middle of an append
        reader = Sidecar(host, writable=False)
        assert reader.records == model
        writer = Sidecar(host, writable=True)  # cuts the torn tail, appends after it
        writer.set("/after", {"mode": 1})
        writer.close()
        assert Sidecar(host, writable=False).records == {**model, "/after": {"mode": 1}}
    finally:
        sidecar.MIN_COMPACTION = old
        host.close()
