"""Containers over one image: ``python -m benchmarks.containers``.

Opening a writable filesystem (a container) over an image of 15 entries
and one of N entries (default 100,000), the index cache warm, median of
several opens; and the Python heap (tracemalloc) held by 1, 10 and 50
writable filesystems of the large image open at once in one process.
Runs without root and without FUSE.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc

import layerfs
from benchmarks.upper import write_image


def open_times(image: str, cache: str, scratch: str, repeats: int, label: str,
               held: bool) -> list:
    """Seconds to open a writable filesystem over *image*, each with a new
    upper, the index cache warm (one open beforehand).  With *held*, another
    filesystem of the image stays open meanwhile (as in a store serving
    several containers), so the image's shared view is not rebuilt."""
    layerfs.open([image], cache=cache).close()
    keeper = layerfs.open([image], cache=cache) if held else None
    times = []
    for number in range(repeats):
        began = time.perf_counter()
        fs = layerfs.open([image], cache=cache,
                          upper=os.path.join(scratch, f"u{label}-{held}-{number}"))
        times.append(time.perf_counter() - began)
        fs.close()
    if keeper is not None:
        keeper.close()
    return times


def heap_of_open(image: str, cache: str, scratch: str, counts: tuple,
                 walked: bool = False) -> dict:
    """Bytes of Python heap held by *count* writable filesystems open at
    once (each after a walk over its whole tree if *walked*)."""
    layerfs.open([image], cache=cache).close()
    result = {}
    for count in counts:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        opened = [layerfs.open([image], cache=cache,
                               upper=os.path.join(scratch, f"m{count}-{n}-{walked}"))
                  for n in range(count)]
        for fs in opened if walked else ():
            for _ in fs.walk("/"):
                pass
        result[count] = tracemalloc.get_traced_memory()[0] - base
        for fs in opened:
            fs.close()
        tracemalloc.stop()
    return result


def pss_of(pid: int) -> int:
    """Proportional set size of *pid*, bytes (shared pages divided among
    their sharers)."""
    with open(f"/proc/{pid}/smaps_rollup") as stream:
        for line in stream:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def mounted_pss(image: str, scratch: str, counts: tuple, shared: bool) -> dict:
    """Total PSS of the processes serving *count* mounted containers of
    *image*, after a ``find`` over each mount (root and FUSE needed): with
    *shared*, as ``layerfs container mount`` serves them (the store's one
    daemon); else one ``layerfs mount --upper`` daemon per container."""
    import subprocess
    from layerfs import mount as layerfs_mount
    kind = "shared" if shared else "separate"
    store = layerfs.Store(os.path.join(scratch, f"store-{kind}"))
    result = {}
    for count in counts:
        points = []
        try:
            for number in range(count):
                name = f"c{count}-{number}"
                store.create([image], name)
                point = os.path.join(scratch, f"{kind}-{name}")
                os.mkdir(point)
                # Through the CLI, as users mount: a daemon forked from this
                # process would share its pages with it (PSS counted half).
                if shared:
                    command = ["container", "mount", "--store", store.path, name, point]
                else:
                    command = ["mount", "--layer", image, "--upper",
                               store.get(name).upper, point]
                subprocess.run([sys.executable, "-m", "layerfs.cli", *command], check=True)
                points.append(point)
                subprocess.run(["find", point], stdout=subprocess.DEVNULL, check=True)
            pids = {layerfs_mount.server_pid(p) for p in points}
            result[count] = sum(pss_of(pid) for pid in pids)
        finally:
            for point in points:
                layerfs_mount.umount(point)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--counts", default="1,10,50")
    parser.add_argument("--results", help="write the results as JSON here")
    parser.add_argument("--mounted", default="",
                        help="also the PSS of N mounted containers, e.g. 1,5 (root, FUSE)")
    args = parser.parse_args(argv)
    counts = tuple(int(c) for c in args.counts.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        cache = os.path.join(scratch, "cache")
        small, large = os.path.join(scratch, "small.tar"), os.path.join(scratch, "large.tar")
        _write_small(small)
        write_image(large, args.files)
        results = {"files": args.files, "open_seconds": {}, "heap_bytes": {},
                   "heap_bytes_walked": {}}
        if args.mounted:     # first: the daemons fork from this process
            counts_mounted = tuple(int(c) for c in args.mounted.split(","))
            results["mounted_pss_bytes"] = {}
            for shared in (False, True):
                pss = mounted_pss(large, scratch, counts_mounted, shared)
                how = "one store daemon" if shared else "a daemon each"
                results["mounted_pss_bytes"][how] = {str(c): size for c, size in pss.items()}
                for count, size in pss.items():
                    print(f"{count:3} mounted containers of the {args.files}-entry image, "
                          f"{how}: {size / 2**20:8.1f} MiB PSS in total (after find)")
        for held in (False, True):
            for label, image in (("15", small), (str(args.files), large)):
                times = open_times(image, cache, scratch, args.repeats, label, held)
                key = f"{label}{' (view held)' if held else ''}"
                results["open_seconds"][key] = statistics.median(times)
                print(f"open a container over {label:>7} entries"
                      f"{', image view held' if held else ', first of its image'}: "
                      f"{statistics.median(times) * 1000:8.1f} ms (median of {len(times)})")
        for walked, key in ((False, "heap_bytes"), (True, "heap_bytes_walked")):
            heap = heap_of_open(large, cache, scratch, counts, walked)
            for count, size in heap.items():
                results[key][str(count)] = size
                print(f"{count:3} containers of the {args.files}-entry image open"
                      f"{', each walked' if walked else ''}: "
                      f"{size / 2**20:8.1f} MiB of Python heap")
    if args.results:
        with open(args.results, "w") as stream:
            json.dump(results, stream, indent=1)
    return 0


def _write_small(path: str) -> None:
    """An image of 15 entries: 3 directories of 4 files each."""
    import tarfile
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for number in range(3):
            info = tarfile.TarInfo(f"d{number}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            for file_number in range(4):
                info = tarfile.TarInfo(f"d{number}/f{file_number}")
                info.mode = 0o644
                tar.addfile(info)


if __name__ == "__main__":
    sys.exit(main())
