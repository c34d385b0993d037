"""Crash safety of the upper layer: a writer killed at any point.

A writer subprocess applies a deterministic sequence of random operations
(seeded), syncs after each and prints ``ack N`` once operation N is done.
The test SIGKILLs it at a random moment, reopens the upper directory and
checks: it loads, its work/ area is emptied, no whiteout sits beside its own
entry, and the view equals the view after the last acknowledged operation
or after the one after it (replayed in-process, uninterrupted).  Nothing
acknowledged is lost, nothing is torn.  Timestamps are not compared (they
are "now" in both runs); everything else is.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import attrs
import pytest

import layerfs
from layerfs import upperformat, whiteout
from layerfs.testing import layers as L
from layerfs.testing.view import diff_views, snapshot
from layerfs.testing.writers import write_image

IMAGE = [
    L.Layer([L.directory("d", mode=0o750), L.file("d/f", b"lower" * 100),
             L.directory("d/sub"), L.file("d/sub/deep", b"deep"),
             L.file("h1", b"linked"), L.hardlink("d/h2", "h1"),
             L.symlink("evil", "/tmp/outside-of-the-image"), L.directory("e"),
             L.file("d/" + "L" * 253, b"a long name")]),
    L.Layer([L.file("e/new", b"e"), L.whiteout("d/sub/deep"), L.directory("o"),
             L.opaque("o"), L.file("o/x", b"x")]),
]
NAMES = ("a", "b", "f", "sub", "x", "new", "L" * 253)    # the last: a long whiteout


def random_operation(fs, rng: random.Random) -> None:
    """One operation chosen from the current view; errors are outcomes too."""
    paths = sorted(fs.tree.nodes)
    dirs = [p for p in paths if fs.tree.nodes[p].children is not None]
    some = rng.choice(paths)
    fresh = rng.choice(dirs).rstrip("/") + "/" + rng.choice(NAMES)
    kind = rng.randrange(11)
    try:
        if kind == 0:
            handle = fs.open_handle(rng.choice((some, fresh)), os.O_WRONLY | os.O_CREAT)
            try:
                handle.pwrite(bytes([65 + rng.randrange(26)]) * rng.randrange(1, 3000),
                              rng.randrange(0, 600))
                handle.fsync()
            finally:
                handle.close()
        elif kind == 1:
            fs.truncate(some, rng.randrange(0, 300))
        elif kind == 2:
            fs.mkdir(fresh)
        elif kind == 3:
            fs.rmdir(some)
        elif kind == 4:
            fs.unlink(some)
        elif kind in (5, 6):
            fs.rename(some, rng.choice((fresh, rng.choice(paths))))
        elif kind == 7:
            fs.symlink(rng.choice(("a", "/d", "../x")), fresh)
        elif kind == 8:
            fs.link(some, fresh)
        elif kind == 9:
            fs.chmod(some, rng.choice((0o600, 0o755, 0o4711)))
        else:
            fs.setxattr(some, "user.k", bytes([rng.randrange(256)]) * 3)
    except OSError:
        pass


def run_writer(source, upper: str, seed: int, count: int) -> None:
    """The subprocess: *count* operations, an ack line after each."""
    rng = random.Random(seed)
    with layerfs.open(source, upper=upper) as fs:
        for number in range(count):
            random_operation(fs, rng)
            fs.sync()
            print(f"ack {number}", flush=True)


def replay(source, upper: str, seed: int, count: int) -> dict:
    rng = random.Random(seed)
    with layerfs.open(source, upper=upper) as fs:
        for _ in range(count):
            random_operation(fs, rng)
        return timeless(snapshot(fs))


def timeless(view: dict) -> dict:
    return {path: attrs.evolve(node, mtime_ns=0) for path, node in view.items()}


def check_upper_directory(upper: str) -> None:
    assert os.listdir(os.path.join(upper, "work")) == []
    for directory, dirnames, filenames in os.walk(os.path.join(upper, "diff")):
        names = set(dirnames) | set(filenames)
        for name in names:
            kind, target = whiteout.classify(name)
            if upperformat.is_long_whiteout(name):
                with open(os.path.join(directory, name), "rb") as stream:
                    target = upperformat.long_whiteout_target(name, stream.read())
            assert not (kind == whiteout.WHITEOUT and target in names), \
                f"{directory}/{name} beside its own entry"


WRITER = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_crash import run_writer
run_writer({source!r}, {upper!r}, {seed}, {count})
"""


@pytest.mark.parametrize("seed", range(6))
def test_killed_writer_leaves_an_acknowledged_state(tmp_path, seed):
    source = write_image(IMAGE, tmp_path / "image", kind="layers", compression="none")
    count = 60
    rng = random.Random(1000 + seed)
    for round_number in range(3):
        upper = str(tmp_path / f"upper{round_number}")
        code = WRITER.format(root=os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), tests=os.path.dirname(os.path.abspath(__file__)),
            source=source, upper=upper, seed=seed * 10 + round_number, count=count)
        errors = tmp_path / f"writer{round_number}.err"
        with open(errors, "wb") as stderr:
            # Unbuffered, so that no ack line read ahead is lost on the way.
            writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                      stderr=stderr, bufsize=0)
        kill_after = rng.randrange(0, count)
        acked = -1
        while line := writer.stdout.readline():
            acked = int(line.split()[1])
            if acked >= kill_after:
                writer.send_signal(signal.SIGKILL)
                break
        for line in writer.stdout.read().splitlines():
            acked = int(line.split()[1])
        writer.stdout.close()
        assert writer.wait() in (0, -signal.SIGKILL), errors.read_text()
        with layerfs.open(source, upper=upper) as fs:
            after_crash = timeless(snapshot(fs))
        check_upper_directory(upper)
        allowed = [replay(source, str(tmp_path / f"replay{round_number}-{n}"),
                          seed * 10 + round_number, n)
                   for n in (acked + 1, min(acked + 2, count))]
        assert after_crash in allowed, "\n".join(
            diff_views(allowed[0], after_crash) + ["-- or --"]
            + diff_views(allowed[1], after_crash))
