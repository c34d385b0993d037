"""The bounded cache (issue 12): cache bytes per image against the compressed
and uncompressed sizes, and what a budget of a tenth of the image costs in
speed.

    python -m benchmarks.cache [--mib 64] [--files 10000] [--reps 3]
                               [--results benchmarks/results/cache.json]

Corpora (generated, seeded, under ``--corpus-dir``):

* ``mixed``: one layer of ``--mib`` MiB, files of 200 B to 200 KB, four in
  five of them words (about 3:1 in gzip), one in five random bytes, in
  walk order (as ``tar -c`` writes a tree);
* ``tree``: the benchmarks' tree corpus (``--files`` entries, one layer),
  whose contents compress very well.

Each in gzip and zstd.  For each, two caches: unbounded (the default
budget), and a budget of a tenth of the uncompressed size.  Reported:

* ``cache_bytes``: what the cache holds after opening the layer (index,
  copy, spans or checkpoints);
* ``index_s``: the first open (one pass over the blob);
* ``scan_s``: reading every regular file in walk order through
  :func:`layerfs.open` with the cache warm (the layer opened before),
  median of ``--reps`` runs alternating between the two caches;
  ``scan_ratio`` = bounded / unbounded, the issue's target is at most 2;
* ``random_ms``: a 4 KiB read at a random offset of a random file,
  mean over 300 reads (the same reads for both caches).

Timings move with the machine's load: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import shutil
import statistics
import tarfile
import time

import zstandard

import layerfs
from layerfs.cache import IndexCache

from . import corpus


def mixed_tar(path: str, mib: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(1, 5)).hex().encode() for _ in range(4000)]
    total, number = 0, 0
    with open(path, "wb") as out, tarfile.open(fileobj=out, mode="w") as tar:
        while total < mib << 20:
            size = rng.choice([200, 2000, 20_000, 200_000])
            if number % 5 == 0:
                data = rng.randbytes(size)
            else:
                data = b" ".join(rng.choices(words, k=size // 5 + 1))[:size]
            info = tarfile.TarInfo(f"d{number // 200:04d}/f{number:06d}")   # walk order
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            total += size
            number += 1


def compressed(tar_path: str) -> dict:
    """{"gzip": path, "zstd": path} next to *tar_path* (made once)."""
    out = {"gzip": tar_path + ".gz", "zstd": tar_path + ".zst"}
    if not os.path.exists(out["gzip"]):
        with open(tar_path, "rb") as src, gzip.open(out["gzip"] + ".tmp", "wb", 6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(out["gzip"] + ".tmp", out["gzip"])
    if not os.path.exists(out["zstd"]):
        with open(tar_path, "rb") as src, open(out["zstd"] + ".tmp", "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        os.replace(out["zstd"] + ".tmp", out["zstd"])
    return out


def files_in_walk_order(fs) -> list:
    found = []
    for top, _, names in fs.walk("/"):
        for name in names:
            path = top.rstrip("/") + "/" + name
            if fs.is_file(path) and not fs.is_symlink(path):
                found.append(path)
    return found


def scan(blob: str, cache: IndexCache, paths: list) -> float:
    start = time.perf_counter()
    with layerfs.open(blob, cache=cache) as fs:
        for path in paths:
            fs.read_bytes(path)
    return time.perf_counter() - start


def random_reads(blob: str, cache: IndexCache, reads: list) -> float:
    with layerfs.open(blob, cache=cache) as fs:
        start = time.perf_counter()
        for path, offset in reads:
            with fs.open(path, "rb") as handle:
                handle.seek(offset)
                handle.read(4096)
        return (time.perf_counter() - start) / len(reads) * 1000


def measure(name: str, blob: str, tar_size: int, scratch: str, reps: int) -> dict:
    caches = {"unbounded": IndexCache(os.path.join(scratch, name, "unbounded")),
              "tenth": IndexCache(os.path.join(scratch, name, "tenth"), size=tar_size // 10)}
    result = {"corpus": name, "compressed": os.path.getsize(blob), "uncompressed": tar_size}
    for label, cache in caches.items():
        start = time.perf_counter()
        with layerfs.open(blob, cache=cache) as fs:
            storage = fs.image.layers[0].storage
            paths = files_in_walk_order(fs)
        result[label] = {"index_s": round(time.perf_counter() - start, 3),
                         "cache_bytes": cache.usage(), "storage": storage}
    rng = random.Random(7)
    sizes = {}
    with layerfs.open(blob, cache=caches["unbounded"]) as fs:
        for path in paths:
            sizes[path] = fs.stat(path).st_size
    big = [p for p in paths if sizes[p] > 4096] or paths
    reads = [(p, rng.randrange(max(1, sizes[p] - 4096))) for p in rng.choices(big, k=300)]
    scans = {label: [] for label in caches}
    randoms = {label: [] for label in caches}
    for _ in range(reps):
        for label, cache in caches.items():
            scans[label].append(scan(blob, cache, paths))
            randoms[label].append(random_reads(blob, cache, reads))
    for label in caches:
        result[label]["scan_s"] = round(statistics.median(scans[label]), 3)
        result[label]["random_ms"] = round(statistics.median(randoms[label]), 3)
    result["scan_ratio"] = round(statistics.median(scans["tenth"])
                                 / max(statistics.median(scans["unbounded"]), 1e-9), 2)
    result["random_ratio"] = round(statistics.median(randoms["tenth"])
                                   / max(statistics.median(randoms["unbounded"]), 1e-9), 2)
    return result


def table(results: list) -> str:
    lines = ["| corpus | compressed | uncompressed | cache, unbounded | cache, 1/10 budget "
             "(form) | index s (unb. / 1/10) | scan s (unb. / 1/10) | scan ratio | "
             "random 4 KiB ms (unb. / 1/10) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        u, t = r["unbounded"], r["tenth"]
        lines.append(
            f"| {r['corpus']} | {r['compressed'] / 1e6:.1f} MB | {r['uncompressed'] / 1e6:.1f} MB "
            f"| {u['cache_bytes'] / 1e6:.1f} MB | {t['cache_bytes'] / 1e6:.1f} MB ({t['storage']}) "
            f"| {u['index_s']} / {t['index_s']} | {u['scan_s']} / {t['scan_s']} "
            f"| {r['scan_ratio']} | {u['random_ms']} / {t['random_ms']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--corpus-dir", default=os.path.join("benchmarks", "corpus"))
    parser.add_argument("--results", default=os.path.join("benchmarks", "results",
                                                          "cache.json"))
    args = parser.parse_args(argv)
    os.makedirs(args.corpus_dir, exist_ok=True)
    mixed = os.path.join(args.corpus_dir, f"cache-mixed-{args.mib}.tar")
    if not os.path.exists(mixed):
        mixed_tar(mixed + ".tmp", args.mib)
        os.replace(mixed + ".tmp", mixed)
    built = corpus.build(args.corpus_dir, args.files, (1,), 1 << 20)
    tree = built.stacks[1].layer_files("tar")[0]
    scratch = os.path.join(args.corpus_dir, "cache-scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    results = []
    for name, tar_path in (("mixed", mixed), ("tree", tree)):
        for kind, blob in compressed(tar_path).items():
            results.append(measure(f"{name}.{kind}", blob, os.path.getsize(tar_path),
                                   scratch, args.reps))
            print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as out:
        json.dump(results, out, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
