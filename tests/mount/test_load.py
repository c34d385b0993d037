"""Load: several processes reading and writing through one mount at once,
each checking every byte it reads; then the mount is still healthy and,
after unmount and remount, every byte is still there.

Bounded in iterations and in time (a few seconds), so CI stays quick.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
import traceback
from typing import Iterator

import pytest

from layerfs import mount as layerfs_mount
from mount_helpers import BIG, is_mounted, requires_fuse, requires_upper

pytestmark = [pytest.mark.mount, requires_fuse]

WORKERS = 4
ITERATIONS = 300
SECONDS = 3.0
HEADER = struct.Struct(">IIH32s")        # worker, sequence, length, sha256 of payload


def run_workers(work, count: int, results_dir: str) -> list:
    """Fork *count* processes running ``work(number, results_dir)``; a
    failure's traceback is written to a file.  Returns those tracebacks."""
    pids = []
    for number in range(count):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                work(number, results_dir)
            except BaseException:
                with open(f"{results_dir}/error-{number}", "w", encoding="utf-8") as report:
                    report.write(traceback.format_exc())
                status = 1
            finally:
                os._exit(status)
        pids.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    errors = []
    for number, status in enumerate(statuses):
        if status != 0:
            path = f"{results_dir}/error-{number}"
            errors.append(open(path, encoding="utf-8").read() if os.path.exists(path)
                          else f"worker {number}: status {status}")
    return errors


def rounds() -> Iterator[int]:
    """The iterations of a worker: ITERATIONS at most, and none after SECONDS."""
    deadline = time.monotonic() + SECONDS
    for iteration in range(ITERATIONS):
        if time.monotonic() > deadline:
            return
        yield iteration


def record(worker: int, sequence: int, rng: random.Random) -> bytes:
    payload = rng.randbytes(rng.randrange(1, 2000))
    return HEADER.pack(worker, sequence, len(payload), hashlib.sha256(payload).digest()) + payload


def parse_records(data: bytes, complete: bool) -> list:
    """``[(worker, sequence)]`` of a log of records, each checked; a record cut
    short at the end is allowed only while writers may still be appending."""
    found, offset = [], 0
    while offset < len(data):
        if offset + HEADER.size > len(data):
            assert not complete, f"truncated header at {offset}"
            break
        worker, sequence, length, digest = HEADER.unpack_from(data, offset)
        payload = data[offset + HEADER.size:offset + HEADER.size + length]
        if len(payload) < length:
            assert not complete, f"truncated record at {offset}"
            break
        assert hashlib.sha256(payload).digest() == digest, f"corrupt record at {offset}"
        found.append((worker, sequence))
        offset += HEADER.size + length
    return found


def self_checked(rng: random.Random, worker: int) -> bytes:
    body = rng.randbytes(rng.randrange(1, 50_000))
    return hashlib.sha256(body).digest() + struct.pack(">I", worker) + body


def check_self_checked(data: bytes) -> None:
    assert hashlib.sha256(data[36:]).digest() == data[:32], "torn replacement"


def make_worker(mnt: str):
    def work(number: int, results_dir: str) -> None:
        rng = random.Random(number)
        own = f"{mnt}/work/own-{number}"
        model = bytearray()
        appended = 0
        fd = os.open(own, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for _ in rounds():
                action = rng.randrange(5)
                if action == 0:                                   # own file: pwrite
                    offset = rng.randrange(len(model) + 1)
                    data = rng.randbytes(rng.randrange(1, 70_000))
                    os.pwrite(fd, data, offset)
                    model[offset:offset + len(data)] = data
                    assert os.pread(fd, len(model) + 10, 0) == bytes(model)
                elif action == 1:                                 # shared log: append
                    with open(f"{mnt}/work/shared.log", "ab") as log:
                        log.write(record(number, appended, rng))
                    appended += 1
                elif action == 2:                                 # shared log: read all
                    with open(f"{mnt}/work/shared.log", "rb") as log:
                        parse_records(log.read(), complete=False)
                elif action == 3:                                 # shared file: replace
                    temporary = f"{mnt}/work/current.{number}.tmp"
                    with open(temporary, "wb") as out:
                        out.write(self_checked(rng, number))
                    os.rename(temporary, f"{mnt}/work/current")
                else:                                             # lower file: read
                    # (reading work/current here would race the renames:
                    # see test_posix.py::test_a_replaced_file_stays_reachable_through_a_held_descriptor)
                    with open(f"{mnt}/bin/tool", "rb") as lower:
                        lower.seek(rng.randrange(len(BIG)))
                        start = lower.tell()
                        assert lower.read(5000) == BIG[start:start + 5000]
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(f"{results_dir}/result-{number}", "w", encoding="ascii") as result:
            result.write(f"{hashlib.sha256(model).hexdigest()} {appended}\n")
    return work


@requires_upper
def test_parallel_writers_and_readers(sample_layers, mountpoint, tmp_path):
    upper = str(tmp_path / "upper")
    results = tmp_path / "results"
    results.mkdir()
    layerfs_mount.mount(sample_layers, mountpoint, upper=upper)
    os.mkdir(f"{mountpoint}/work")
    with open(f"{mountpoint}/work/current", "wb") as current:
        current.write(self_checked(random.Random(-1), 99))
    os.close(os.open(f"{mountpoint}/work/shared.log", os.O_CREAT | os.O_WRONLY, 0o644))

    errors = run_workers(make_worker(mountpoint), WORKERS, str(results))
    assert not errors, "\n".join(errors)
    expected = {}
    for number in range(WORKERS):
        digest, appended = (results / f"result-{number}").read_text().split()
        expected[number] = (digest, int(appended))

    def check_everything(mnt: str) -> None:
        for number, (digest, _) in expected.items():
            with open(f"{mnt}/work/own-{number}", "rb") as own:
                assert hashlib.sha256(own.read()).hexdigest() == digest, number
        with open(f"{mnt}/work/shared.log", "rb") as log:
            records = parse_records(log.read(), complete=True)
        for number, (_, appended) in expected.items():
            # Each writer's records, all there, in its own order.
            assert [seq for worker, seq in records if worker == number] == list(range(appended))
        assert len(records) == sum(appended for _, appended in expected.values())
        with open(f"{mnt}/work/current", "rb") as current:
            check_self_checked(current.read())
        assert sorted(os.listdir(f"{mnt}/work")) == sorted(
            ["current", "shared.log"] + [f"own-{number}" for number in range(WORKERS)])

    # Still healthy: stat, listing, a fresh write and read, everything checks.
    assert os.stat(mountpoint).st_ino and "work" in os.listdir(mountpoint)
    with open(f"{mountpoint}/after", "wb") as after:
        after.write(b"fresh")
    with open(f"{mountpoint}/after", "rb") as after:
        assert after.read() == b"fresh"
    check_everything(mountpoint)

    layerfs_mount.umount(mountpoint)
    assert not is_mounted(mountpoint)
    layerfs_mount.mount(sample_layers, mountpoint, upper=upper)
    check_everything(mountpoint)
    with open(f"{mountpoint}/after", "rb") as after:
        assert after.read() == b"fresh"


def test_parallel_readers_of_lower_files(mounted, tmp_path):
    passwd = b"root:x:0:0::/root:/bin/bash\n"

    def work(number: int, results_dir: str) -> None:
        rng = random.Random(number)
        for _ in rounds():
            with open(f"{mounted}/bin/tool-link" if number % 2 else f"{mounted}/bin/tool",
                      "rb") as tool:
                if rng.random() < 0.2:
                    assert hashlib.sha256(tool.read()).digest() == hashlib.sha256(BIG).digest()
                else:
                    offset, size = rng.randrange(len(BIG)), rng.randrange(1, 200_000)
                    assert os.pread(tool.fileno(), size, offset) == BIG[offset:offset + size]
            with open(f"{mounted}/etc/passwd", "rb") as small:
                assert small.read() == passwd

    errors = run_workers(work, WORKERS, str(tmp_path))
    assert not errors, "\n".join(errors)
