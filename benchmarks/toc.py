"""Lazy reading of layers with a table of contents, against plain gzip.

``python -m benchmarks.toc [--source DIR] [--max-mb N] [--reps N]``

Commits the same upper (a copy of *DIR*, default Python's standard library,
cut at *N* MB) three times, as gzip, eStargz and zstd:chunked, then opens
each image with an empty index cache and measures, per compression:

- the bytes read from the top layer's blob before the first ``ls /`` and
  before the first ``cat`` of one file (TOC layers: counted by the blob
  source; gzip: the plain reader streams the whole blob to index it, so
  its size), and the number of reads (what would be HTTP requests);
- the wall time to the first ``ls`` and to the first ``cat`` (medians of
  *reps*, local disk with a warm page cache: no network);
- an estimate for a registry at 100 Mbit/s and 20 ms per request, from the
  counted bytes and reads (derived, not measured).

Prints a table and writes ``benchmarks/results/toc.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import layerfs
import layerfs.tocopen as toc_module
from layerfs.commit import commit
from layerfs.example import build_example

HERE = os.path.dirname(os.path.abspath(__file__))
COMPRESSIONS = ("gzip", "estargz", "zstd:chunked")
BANDWIDTH = 100e6 / 8      # bytes per second
RTT = 0.020                # seconds per request


class _Counting(toc_module.FileRange):
    log: list = []

    def read_at(self, offset, length):
        data = super().read_at(offset, length)
        _Counting.log.append((self.path, len(data)))
        return data


def fill_upper(fs, source: str, limit: int) -> tuple[int, int, str]:
    """Copy regular files of *source* into *fs* up to *limit* bytes;
    returns (files, bytes, a path in the middle to cat)."""
    files = total = 0
    middle = ""
    for top, dirs, names in os.walk(source):
        dirs.sort()
        for name in sorted(names):
            host = os.path.join(top, name)
            if not os.path.isfile(host) or os.path.islink(host):
                continue
            with open(host, "rb") as f:
                data = f.read()
            path = "/corpus/" + os.path.relpath(host, source)
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            fs.write_bytes(path, data)
            files += 1
            total += len(data)
            if not middle and total > limit // 2 and len(data) > 4096:
                middle = path
            if total >= limit:
                return files, total, middle
    return files, total, middle


def measure(dest: str, cat_path: str, blob_path: str, blob_size: int, cache_root: str,
            compression: str) -> dict:
    _Counting.log = []
    cache = os.path.join(cache_root, f"cache-{time.monotonic_ns()}")
    start = time.perf_counter()
    with layerfs.open(dest, tag="bench", cache=cache) as fs:
        fs.listdir("/")
        listed = time.perf_counter()
        before = list(_Counting.log)
        fs.read_bytes(cat_path)
        catted = time.perf_counter()
    shutil.rmtree(cache, ignore_errors=True)
    after = _Counting.log
    if compression == "gzip":
        ls_bytes, ls_reads = blob_size, 1
        cat_bytes, cat_reads = blob_size, 1    # nothing more: the copy is local by then
    else:
        mine = [n for p, n in before if p == blob_path]
        ls_bytes, ls_reads = sum(mine), len(mine)
        mine = [n for p, n in after if p == blob_path]
        cat_bytes, cat_reads = sum(mine), len(mine)
    return {"ls_s": listed - start, "cat_s": catted - start, "ls_bytes": ls_bytes,
            "ls_reads": ls_reads, "cat_bytes": cat_bytes, "cat_reads": cat_reads}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=os.path.dirname(os.__file__))
    parser.add_argument("--max-mb", type=int, default=40)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "toc.json"))
    args = parser.parse_args(argv)
    original_blob, original_epoch = toc_module.FileRange, os.environ.get("SOURCE_DATE_EPOCH")
    toc_module.FileRange = _Counting          # count what the TOC reader fetches
    work = tempfile.mkdtemp(prefix="layerfs-toc-bench-")
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        base = build_example(os.path.join(work, "base"))
        results = {}
        for compression in COMPRESSIONS:
            with layerfs.open(base, upper=os.path.join(work, "up-" + compression),
                              cache=os.path.join(work, "cache-base")) as fs:
                files, total, cat_path = fill_upper(fs, args.source, args.max_mb << 20)
                dest = os.path.join(work, compression.replace(":", "-"))
                began = time.perf_counter()
                result = commit(fs, dest, tag="bench", compression=compression)
                commit_s = time.perf_counter() - began
            size = os.path.getsize(result.layer_path)
            runs = [measure(dest, cat_path, result.layer_path, size, work, compression)
                    for _ in range(args.reps)]
            row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            row.update(blob_bytes=size, commit_s=commit_s, files=files, tar_bytes=total,
                       cat_path=cat_path)
            for stage in ("ls", "cat"):
                row[f"{stage}_estimate_s"] = (row[f"{stage}_bytes"] / BANDWIDTH
                                              + row[f"{stage}_reads"] * RTT)
            results[compression] = row
            print(f"{compression:13} blob {size / 1e6:6.1f} MB  commit {commit_s:5.2f} s  "
                  f"ls: {row['ls_bytes']:>10,} B in {row['ls_reads']:.0f} reads, "
                  f"{row['ls_s'] * 1000:7.1f} ms (est. {row['ls_estimate_s']:.2f} s)  "
                  f"cat: {row['cat_bytes']:>10,} B in {row['cat_reads']:.0f} reads, "
                  f"{row['cat_s'] * 1000:7.1f} ms (est. {row['cat_estimate_s']:.2f} s)",
                  file=sys.stderr)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"source": args.source, "max_mb": args.max_mb, "reps": args.reps,
                       "bandwidth_bytes_s": BANDWIDTH, "rtt_s": RTT,
                       "results": results}, f, indent=2, sort_keys=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        toc_module.FileRange = original_blob
        if original_epoch is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = original_epoch
    return 0


if __name__ == "__main__":
    sys.exit(main())
