"""The bounded cache (issue 12): cache bytes per image against the compressed
and uncompressed sizes, and what a budget of a tenth of the image costs in
speed.

    python -m benchmarks.cache [--mib 64] [--files 10000] [--reps 3]
                               [--compare DIR] [--only mixed,tree]
                               [--results benchmarks/results/cache.json]

Corpora (generated, seeded, under ``--corpus-dir``):

* ``mixed``: one layer of ``--mib`` MiB, files of 200 B to 200 KB, four in
  five of them words (about 3:1 in gzip), one in five random bytes, in
  walk order (as ``tar -c`` writes a tree);
* ``tree``: the benchmarks' tree corpus (``--files`` entries, one layer),
  whose contents compress very well.

Each as gzip, zstd (one frame) and ``zstdf`` (zstd in frames of 4 MiB, as
parallel writers make).  For each, two caches: unbounded (the default
budget), and a budget of a tenth of the uncompressed size.  Reported:

* ``cache_bytes``: what the cache holds after opening the layer (index,
  copy, spans or checkpoints);
* ``index_s``: the first open (one pass over the blob);
* ``scan_s``: reading every regular file in walk order, whole, through
  :func:`layerfs.open` with the cache warm (the layer opened before), the
  best of three alternating with the other cache; ``scan_ratio`` =
  bounded / unbounded, the issue's target is at most 2;
* ``fuse_s``: the same files read as a FUSE daemon reads them: in 128 KiB
  reads, by two threads taking the next file as they come free;
  ``fuse_ratio`` = bounded / unbounded.  A run longer than ``--deadline``
  seconds stops and reports its time divided by the share it read;
  ``fuse_errors`` counts files whose read failed;
* ``random_ms``: a 4 KiB read at a random offset of a random file,
  mean over 300 reads (the same reads for both caches);
* ``decompress_s``: decompressing the blob once with zlib or zstandard
  (no layerfs): the floor of any scan that keeps no decompressed copy.

Every measurement runs in a fresh process per repetition, the two caches
alternating, and is the median of ``--reps``.  ``--compare DIR`` measures a
second checkout of layerfs (``DIR/layerfs``, e.g. ``git worktree add DIR
main``) side by side, alternating before / after in each repetition, each
with caches of its own; the table then gives both.

``--fetch-mib 100`` measures instead what opening a gzip layer of that
size costs when it is served as a registry blob (no local file), under a
budget of three quarters and of a tenth of its tar: the blob bytes read
(the indexing pass, and rapidgzip's checkpoint pass if it fetches the blob
again) and the CPU time.

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
import subprocess
import sys
import tarfile
import time
from typing import Optional

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
    """{"gzip": path, "zstd": path, "zstdf": path} next to *tar_path* (made once)."""
    out = {"gzip": tar_path + ".gz", "zstd": tar_path + ".zst",
           "zstdf": tar_path + ".frames.zst"}
    if not os.path.exists(out["gzip"]):
        with open(tar_path, "rb") as src, gzip.open(out["gzip"] + ".tmp", "wb", 6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(out["gzip"] + ".tmp", out["gzip"])
    if not os.path.exists(out["zstd"]):
        with open(tar_path, "rb") as src, open(out["zstd"] + ".tmp", "wb") as dst:
            zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        os.replace(out["zstd"] + ".tmp", out["zstd"])
    if not os.path.exists(out["zstdf"]):
        compressor = zstandard.ZstdCompressor(level=3)
        with open(tar_path, "rb") as src, open(out["zstdf"] + ".tmp", "wb") as dst:
            while block := src.read(4 << 20):
                dst.write(compressor.compress(block))
        os.replace(out["zstdf"] + ".tmp", out["zstdf"])
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


def fuse_scan(blob: str, cache: IndexCache, paths: list, deadline: float) -> tuple:
    """Every file in 128 KiB reads, by two threads taking the next file
    as they come free (what a FUSE daemon's threads do for a scanner);
    past *deadline* seconds, the time divided by the share read.  Returns
    (seconds, reads that failed: a thread goes on with the next file)."""
    import threading
    read_size = 128 << 10
    start = time.perf_counter()
    with layerfs.open(blob, cache=cache) as fs:
        nodes = [fs.node(path) for path in paths]
        total = sum(node.size for node in nodes) or 1
        queue = iter(nodes)
        lock = threading.Lock()
        done = [0]
        errors = [0]

        def work():
            while time.perf_counter() - start < deadline:
                with lock:
                    node = next(queue, None)
                if node is None:
                    return
                try:
                    for offset in range(0, node.size, read_size):
                        fs.read_node(node, offset, read_size)
                except OSError:       # InvalidLayerError too: what FUSE answers EIO
                    with lock:
                        errors[0] += 1
                with lock:
                    done[0] += node.size

        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return (time.perf_counter() - start) * total / max(done[0], 1), errors[0]


def random_reads(blob: str, cache: IndexCache, reads: list) -> float:
    with layerfs.open(blob, cache=cache) as fs:
        start = time.perf_counter()
        for path, offset in reads:
            with fs.open(path, "rb") as handle:
                handle.seek(offset)
                handle.read(4096)
        return (time.perf_counter() - start) / len(reads) * 1000


def decompress_once(blob: str) -> float:
    import zlib
    start = time.perf_counter()
    with open(blob, "rb") as src:
        if blob.endswith(".gz"):
            obj = zlib.decompressobj(31)
            while data := src.read(1 << 20):
                obj.decompress(data)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
            while reader.read(1 << 20):
                pass
    return time.perf_counter() - start


def worker(name: str, blob: str, tar_size: int, scratch: str, deadline: float) -> dict:
    """One repetition for one checkout of layerfs (this process's): both
    caches made (and timed) if new, then scanned in alternation."""
    caches = {"unbounded": IndexCache(os.path.join(scratch, name, "unbounded")),
              "tenth": IndexCache(os.path.join(scratch, name, "tenth"), size=tar_size // 10)}
    result = {"layerfs": os.path.dirname(os.path.dirname(layerfs.__file__))}
    for label, cache in caches.items():
        start = time.perf_counter()
        with layerfs.open(blob, cache=cache) as fs:
            storage = fs.image.layers[0].storage
            paths = files_in_walk_order(fs)
        result[label] = {"index_s": round(time.perf_counter() - start, 3),
                         "cache_bytes": cache.usage(), "storage": storage}
    rng = random.Random(7)
    with layerfs.open(blob, cache=caches["unbounded"]) as fs:
        sizes = {path: fs.stat(path).st_size for path in paths}
    big = [p for p in paths if sizes[p] > 4096] or paths
    reads = [(p, rng.randrange(max(1, sizes[p] - 4096))) for p in rng.choices(big, k=300)]
    for label in caches:
        result[label].update(scan_s=[], fuse_s=[], fuse_errors=0)
    for _ in range(3):          # the best of three, alternating: load spikes are long here
        for label, cache in caches.items():
            result[label]["scan_s"].append(scan(blob, cache, paths))
            seconds, errors = fuse_scan(blob, cache, paths, deadline)
            result[label]["fuse_s"].append(seconds)
            result[label]["fuse_errors"] += errors
    for label, cache in caches.items():
        result[label]["scan_s"] = min(result[label]["scan_s"])
        result[label]["fuse_s"] = min(result[label]["fuse_s"])
        result[label]["random_ms"] = random_reads(blob, cache, reads)
    result["decompress_s"] = decompress_once(blob)
    return result


def fetch_worker(blob_path: str, tar_size: int, cache_dir: str, percent: int) -> dict:
    """Opens a gzip layer served from memory as a registry blob is (no
    local file), under a budget of *percent* of its tar: blob bytes read
    and CPU seconds of the open (indexing, checkpoints)."""
    from layerfs.blobsource import BytesBlob, CountingBlob
    from layerfs.layer import open_layer
    with open(blob_path, "rb") as file:
        blob = CountingBlob(BytesBlob(file.read(), label="remote"))
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = IndexCache(cache_dir, size=tar_size * percent // 100)
    start = time.process_time()
    with open_layer(blob, cache=cache) as layer:
        storage = layer.storage
    result = {"storage": storage, "cpu_s": round(time.process_time() - start, 3),
              "bytes_read": blob.bytes_read, "blob": blob.size}
    shutil.rmtree(cache_dir, ignore_errors=True)
    return result


def run_worker(checkout: Optional[str], args: list, function: str = "worker") -> dict:
    """Runs :func:`worker` (or another function of this module) in a fresh
    process, with layerfs imported from *checkout* (None: this one)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, json\n"
            f"sys.path.insert(0, {checkout or here!r}); import layerfs\n"
            f"sys.path.insert(0, {here!r}); from benchmarks import cache\n"
            f"print(json.dumps(cache.{function}(*{args!r})))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd="/",
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:        # e.g. main's spans under threads: a crash in zstandard
        return {"crashed": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list) -> dict:
    """The median of each timing over the repetitions, and the ratios."""
    crashed = sum(1 for r in runs if "crashed" in r)
    runs = [r for r in runs if "crashed" not in r]
    if not runs:
        return {"crashed": crashed}
    first = runs[0]
    out = {"layerfs": first["layerfs"],
           "decompress_s": round(statistics.median(r["decompress_s"] for r in runs), 3)}
    for label in ("unbounded", "tenth"):
        out[label] = dict(first[label])
        for key in ("scan_s", "fuse_s", "random_ms"):
            out[label][key] = round(statistics.median(r[label][key] for r in runs), 4)
        out[label]["fuse_errors"] = sum(r[label]["fuse_errors"] for r in runs)
    for key, ratio in (("scan_s", "scan_ratio"), ("fuse_s", "fuse_ratio"),
                       ("random_ms", "random_ratio")):
        out[ratio] = round(out["tenth"][key] / max(out["unbounded"][key], 1e-9), 2)
    out["floor_ratio"] = round(out["decompress_s"] / max(out["unbounded"]["scan_s"], 1e-9), 2)
    out["crashed"] = crashed
    return out


def measure(name: str, blob: str, tar_size: int, scratch: str, reps: int,
            sides: dict, deadline: float) -> dict:
    runs: dict = {side: [] for side in sides}
    for _ in range(reps):
        for side, checkout in sides.items():      # before, after, before, after ...
            runs[side].append(run_worker(checkout, [name, blob, tar_size,
                                                    os.path.join(scratch, side), deadline]))
    result = {"corpus": name, "compressed": os.path.getsize(blob), "uncompressed": tar_size}
    for side in sides:
        result[side] = summarise(runs[side])
    return result


def table(results: list) -> str:
    """The markdown table of docs/benchmarks.md."""
    lines = ["| corpus | side | cache, unb. / 1/10 (form) | scan ratio | "
             "FUSE-like scan ratio | random 4 KiB ratio | decompress once / unb. scan |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for side in ("before", "after"):
            if side not in r:
                continue
            x = r[side]
            if "tenth" not in x:
                lines.append(f"| {r['corpus']} | {side} | every run crashed | | | | |")
                continue
            u, t = x["unbounded"], x["tenth"]
            failed = f" ({t['fuse_errors']} files failed)" if t["fuse_errors"] else ""
            if x["crashed"]:
                failed += f" ({x['crashed']} of the runs crashed)"
            lines.append(
                f"| {r['corpus']} | {side} | {u['cache_bytes'] / 1e6:.1f} / "
                f"{t['cache_bytes'] / 1e6:.1f} MB ({t['storage']}) | {x['scan_ratio']} "
                f"| {x['fuse_ratio']}{failed} | {x['random_ratio']} | {x['floor_ratio']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compare", metavar="DIR",
                        help="another checkout of layerfs, measured as 'before'")
    parser.add_argument("--only", default="mixed,tree")
    parser.add_argument("--kinds", default="gzip,zstd,zstdf")
    parser.add_argument("--deadline", type=float, default=30.0)
    parser.add_argument("--corpus-dir", default=os.path.join("benchmarks", "corpus"))
    parser.add_argument("--results", default=os.path.join("benchmarks", "results",
                                                          "cache.json"))
    parser.add_argument("--fetch-mib", type=int, metavar="MIB",
                        help="instead: blob bytes read and CPU time to open a gzip "
                             "layer of MIB MiB served as a registry blob")
    args = parser.parse_args(argv)
    corpus_dir = os.path.abspath(args.corpus_dir)
    os.makedirs(corpus_dir, exist_ok=True)
    sides = {"after": None}
    if args.compare:
        sides = {"before": os.path.abspath(args.compare), "after": None}
    if args.fetch_mib:
        return fetch_main(args, corpus_dir, sides)
    tars = {}
    if "mixed" in args.only:
        tars["mixed"] = os.path.join(corpus_dir, f"cache-mixed-{args.mib}.tar")
        if not os.path.exists(tars["mixed"]):
            mixed_tar(tars["mixed"] + ".tmp", args.mib)
            os.replace(tars["mixed"] + ".tmp", tars["mixed"])
    if "tree" in args.only:
        built = corpus.build(corpus_dir, args.files, (1,), 1 << 20)
        tars["tree"] = os.path.abspath(built.stacks[1].layer_files("tar")[0])
    scratch = os.path.join(corpus_dir, "cache-scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    results = []
    for name, tar_path in tars.items():
        for kind, blob in compressed(tar_path).items():
            if kind not in args.kinds.split(","):
                continue
            results.append(measure(f"{name}.{kind}", blob, os.path.getsize(tar_path),
                                   scratch, args.reps, sides, args.deadline))
            print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as out:
        json.dump(results, out, indent=1)
    print(table(results))
    return 0


def fetch_main(args, corpus_dir: str, sides: dict) -> int:
    tar_path = os.path.join(corpus_dir, f"cache-mixed-{args.fetch_mib}.tar")
    if not os.path.exists(tar_path):
        mixed_tar(tar_path + ".tmp", args.fetch_mib)
        os.replace(tar_path + ".tmp", tar_path)
    blob = compressed(tar_path)["gzip"]
    tar_size = os.path.getsize(tar_path)
    results = []
    for percent in (75, 10):
        runs: dict = {side: [] for side in sides}
        for _ in range(args.reps):
            for side, checkout in sides.items():
                runs[side].append(run_worker(checkout, [
                    blob, tar_size, os.path.join(corpus_dir, "fetch-scratch"), percent],
                    "fetch_worker"))
        for side in sides:
            result = dict(runs[side][0], side=side, budget_percent=percent)
            result["cpu_s"] = statistics.median(r["cpu_s"] for r in runs[side])
            results.append(result)
            print(json.dumps(result), flush=True)
    print("| budget | side | form | blob bytes read / blob | CPU s (median) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['budget_percent']}% of the tar | {r['side']} | {r['storage']} "
              f"| {r['bytes_read'] / r['blob']:.2f} | {r['cpu_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
