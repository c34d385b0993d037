"""Metadata changes on a large upper: ``python -m benchmarks.upper``.

chmod of every lower file of an image of N files, through the library, for
two sizes of N (each chmod makes a lower file a metacopy: a record in the
upper's sidecar, no data copied).  Reports the median per-chmod cost of
each round and the bytes the sidecar files take on disk.  If a change
rewrote the whole sidecar, the per-operation cost would grow with N; with
an append-only journal it stays flat.  Runs without root and without FUSE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time

import layerfs

DEFAULT_SIZES = (1_000, 10_000)


def write_image(path: str, files: int) -> None:
    """One uncompressed layer of *files* empty files in 100 directories."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for number in range(100):
            info = tarfile.TarInfo(f"d{number:02}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for number in range(files):
            info = tarfile.TarInfo(f"d{number % 100:02}/f{number}")
            info.mode = 0o644
            tar.addfile(info)


def chmod_all(image: str, upper: str, files: int, mode: int, rounds: int) -> list:
    """Per-chmod seconds, in *rounds* equal batches over all files."""
    costs = []
    with layerfs.open([image], upper=upper, cache=False) as fs:
        paths = [f"/d{number % 100:02}/f{number}" for number in range(files)]
        batch = max(1, len(paths) // rounds)
        for start in range(0, len(paths), batch):
            chunk = paths[start:start + batch]
            began = time.perf_counter()
            for path in chunk:
                fs.chmod(path, mode)
            costs.append((time.perf_counter() - began) / len(chunk))
    return costs


def sidecar_bytes(upper: str) -> int:
    return sum(os.path.getsize(os.path.join(upper, name)) for name in os.listdir(upper)
               if name.startswith("attrs."))


def measure(sizes, rounds: int = 5) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="layerfs-bench-upper-") as scratch:
        for files in sizes:
            image = os.path.join(scratch, f"image-{files}.tar")
            write_image(image, files)
            upper = os.path.join(scratch, f"upper-{files}")
            costs = chmod_all(image, upper, files, 0o600, rounds)
            results[files] = {
                "per_chmod_us_by_round": [round(c * 1e6, 1) for c in costs],
                "per_chmod_us_median": round(statistics.median(costs) * 1e6, 1),
                "last_round_us": round(costs[-1] * 1e6, 1),
                "sidecar_bytes": sidecar_bytes(upper),
            }
    return results


def operations(count: int = 2000) -> dict:
    """Per-operation cost of other writes, *count* of each, in a directory
    of *count* lower files at depth 3 (what a change costs besides its
    sidecar record: host calls, renames, whiteouts)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="layerfs-bench-upper-") as scratch:
        image = os.path.join(scratch, "image.tar")
        with tarfile.open(image, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in ("a", "a/b", "a/b/c"):
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for number in range(count):
                tar.addfile(tarfile.TarInfo(f"a/b/c/l{number}"))
        with layerfs.open([image], upper=os.path.join(scratch, "upper"), cache=False) as fs:
            for label, operation in (
                    ("create", lambda n: fs.write_bytes(f"/a/b/c/f{n}", b"x")),
                    ("chmod upper file", lambda n: fs.chmod(f"/a/b/c/f{n}", 0o600)),
                    ("chmod lower file", lambda n: fs.chmod(f"/a/b/c/l{n}", 0o600)),
                    ("rename upper file", lambda n: fs.rename(f"/a/b/c/f{n}", f"/a/b/c/g{n}")),
                    ("unlink lower file", lambda n: fs.unlink(f"/a/b/c/l{n}"))):
                began = time.perf_counter()
                for number in range(count):
                    operation(number)
                results[label] = round((time.perf_counter() - began) / count * 1e6, 1)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=list(DEFAULT_SIZES),
                        help="numbers of lower files (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--operations", action="store_true",
                        help="also time create, chmod, rename and unlink (2,000 each)")
    args = parser.parse_args(argv)
    if args.operations:
        for label, cost in operations().items():
            print(f"{label:>20} {cost:>8} µs")
    results = measure(args.sizes)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'files':>8} {'median µs/chmod':>16} {'last round µs':>14} {'sidecar bytes':>14}")
    for files, result in results.items():
        print(f"{files:>8} {result['per_chmod_us_median']:>16} {result['last_round_us']:>14} "
              f"{result['sidecar_bytes']:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
