"""Writable mounts: libfuse 3's low-level server against its high-level one.

``python -m benchmarks.writable [--files N] [--large-mib M] [--reps R]``
(root: it mounts and drops caches) builds the tree corpus (N entries, one
layer) and the large file with :mod:`benchmarks.corpus`, then mounts each
with a fresh upper (``layerfs mount --upper``), alternating
``LAYERFS_FUSE_API=low`` (the default) and ``high``, and times on each
mount: a cold ``find -printf`` (a stat of every entry, caches dropped), the
same ``find`` warm, 20,000 ``lstat`` of 1,000 paths, a cold sequential
read of the large file, a 64 MiB sequential write into the upper, and 2,000
creates then unlinks.  Prints
each repetition and the medians, in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import corpus
from benchmarks.mounted import CHUNK, find_cold, find_warm, read_cold


def mount(image: str, mountpoint: str, upper: str, api: str) -> None:
    subprocess.run([sys.executable, "-m", "layerfs.cli", "mount", image, mountpoint,
                    "--upper", upper], check=True, env=dict(os.environ, LAYERFS_FUSE_API=api))


def umount(mountpoint: str) -> None:
    subprocess.run([sys.executable, "-m", "layerfs.cli", "umount", mountpoint], check=True)


def write_big(path: str, size: int = 64 << 20) -> float:
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as stream:
        for _ in range(size // CHUNK):
            stream.write(block)
        os.fsync(stream.fileno())
    return time.perf_counter() - start


def stats(root: str, paths: list, count: int = 20000) -> float:
    """*count* ``lstat`` of the corpus's paths in turn: with a writable
    mount's timeouts of 0 each is a LOOKUP and a GETATTR."""
    chosen = [root + path for path in paths]
    lstat = os.lstat
    start = time.perf_counter()
    for index in range(count):
        lstat(chosen[index % len(chosen)])
    return time.perf_counter() - start


def create_unlink(root: str, count: int = 2000) -> float:
    os.mkdir(f"{root}/many")
    start = time.perf_counter()
    for index in range(count):
        with open(f"{root}/many/{index}", "wb") as stream:
            stream.write(b"x")
    for index in range(count):
        os.unlink(f"{root}/many/{index}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--large-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--corpus-dir", default="benchmarks/corpus")
    args = parser.parse_args()
    built = corpus.build(args.corpus_dir, args.files, (1,), args.large_mib << 20)
    tree = built.stacks[1].oci("tar")
    large = built.large.oci("tar")
    results: dict = {}
    for rep in range(args.reps):
        for api in ("low", "high"):
            with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
                mnt, big = f"{scratch}/mnt", f"{scratch}/big"
                os.mkdir(mnt)
                os.mkdir(big)
                mount(tree, mnt, f"{scratch}/upper", api)
                try:
                    row = {"find cold": find_cold(mnt, {}), "find warm": find_warm(mnt, {}),
                           "20,000 lstat": stats(mnt, built.paths()["all"][:1000]),
                           "write 64 MiB": write_big(f"{mnt}/written"),
                           "2,000 creates + unlinks": create_unlink(mnt)}
                finally:
                    umount(mnt)
                mount(large, big, f"{scratch}/upper-large", api)
                try:
                    row[f"read {args.large_mib} MiB cold"] = read_cold(f"{big}/large.bin")
                finally:
                    umount(big)
            print(api, rep, {key: round(value, 3) for key, value in row.items()}, flush=True)
            for key, value in row.items():
                results.setdefault((api, key), []).append(value)
    for (api, key), values in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f"{key:28} {api:5} median {statistics.median(values):.3f} s  {values}")


if __name__ == "__main__":
    main()
