"""Run every benchmark in one go: ``python -m benchmarks.run [--quick]``.

Builds (or reuses) the corpora, runs the in-process and the mount
workloads on layerfs and on every installed peer and floor, in alternation
(A B A B ...), and prints medians and ratios measured in the same run.
Writes ``benchmarks/results/latest.json``.  Needs root (mounts,
``drop_caches``); a peer that cannot run is skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import layerfs
from layerfs.layer import IndexCache

from benchmarks import corpus, debian, inprocess, memory, mounted, peers, report, requests

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {
    "quick": dict(files=10_000, depths=(1, 10, 50), mount_depths=(1, 10),
                  large=64 << 20, reps=3, debian=False),
    "full": dict(files=100_000, depths=(1, 10, 50, 100), mount_depths=(1, 10, 100),
                 large=512 << 20, reps=3, debian=True),
}
COMPRESSIONS = {"tar": "tar", "tar.gz": "gzip", "tar.zst": "zstd"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list) -> float:
    return statistics.median(values)


class Runner:
    def __init__(self, args):
        self.args = args
        self.size = dict(SIZES["quick" if args.quick else "full"])
        if args.files:
            self.size["files"] = args.files
        if args.reps:
            self.size["reps"] = args.reps
        if args.depths:
            depths = tuple(int(depth) for depth in args.depths.split(","))
            # One layer is always built: its extraction is the ext4 floor.
            self.size["depths"] = tuple(sorted({1, *depths}))
            self.size["mount_depths"] = depths
        if args.large_mib:
            self.size["large"] = args.large_mib << 20
        self.reps = self.size["reps"]
        self.corpus_dir = os.path.abspath(args.corpus_dir)
        self.scratch = os.path.join(self.corpus_dir, "scratch")
        self.mnt = os.path.join(self.corpus_dir, "mnt")
        self.results = {"machine": machine(), "config": {**self.size, "quick": args.quick,
                        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]])},
                        "inprocess": {}, "mount": {}, "ready": {}, "skipped": {}}

    def skip(self, what: str, reason: str) -> None:
        log(f"skip {what}: {reason}")
        self.results["skipped"][what] = reason

    # -- corpus -------------------------------------------------------

    def build_corpus(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        os.makedirs(self.scratch)
        self.corpus = corpus.build(self.corpus_dir, self.size["files"], self.size["depths"],
                                   self.size["large"], seed=self.args.seed, log=log)
        listing = self.corpus.paths()
        self.paths = {
            "all": inprocess.shuffled(listing["all"], 1),
            "dirs": ["/"] + listing["dirs"],
            "files": listing["files"],
            "random_stat": inprocess.shuffled(listing["all"], 2, 10_000),
            "small_files": inprocess.shuffled(listing["files"], 3, 5_000),
            "large": "/large.bin",
        }

    # -- in-process ---------------------------------------------------

    def run_open(self) -> None:
        """Cold and warm open, index rate and memory, per depth and compression."""
        rows = {}
        for rep in range(self.reps):
            for depth, stack in self.corpus.stacks.items():
                for compression in COMPRESSIONS:
                    log(f"open: {depth} layers {compression} (rep {rep + 1})")
                    files = stack.layer_files(compression)
                    cold, warm = inprocess.cold_and_warm_open(files, self.scratch)
                    row = rows.setdefault(f"{depth}/{compression}", {
                        "cold": [], "warm": [], "rss": [], "entries": cold["entries"],
                        "nodes": cold["nodes"], "blob_bytes": sum(map(os.path.getsize, files)),
                        "tar_bytes": sum(map(os.path.getsize, stack.layer_files("tar")))})
                    row["cold"].append(cold["seconds"])
                    row["warm"].append(warm["seconds"])
                    row["rss"].append(warm["rss_after"] - warm["rss_before"])
        out = {}
        for key, row in rows.items():
            cold, warm = median(row["cold"]), median(row["warm"])
            out[key] = {
                "cold_open_s": cold, "warm_open_s": warm, "warm_over_cold": warm / cold,
                "entries": row["entries"], "nodes": row["nodes"],
                "index_entries_per_s": row["entries"] / cold,
                "index_blob_mb_per_s": row["blob_bytes"] / cold / 1e6,
                "index_tar_mb_per_s": row["tar_bytes"] / cold / 1e6,
                "bytes_per_entry": median(row["rss"]) / row["entries"],
                "bytes_per_node": median(row["rss"]) / row["nodes"],
            }
        self.results["inprocess"]["open"] = out

    def open_fs(self, depth: int):
        cache = IndexCache(os.path.join(self.scratch, "inproc-cache"))
        return layerfs.open(self.corpus.stacks[depth].layer_files("tar.gz"), cache=cache)

    def run_lookups(self) -> None:
        """stat/lstat/missing rates per depth, against the bare dict loop."""
        paths = self.paths["all"]
        missing = inprocess.missing_paths(paths)
        depths = list(self.corpus.stacks)
        systems = {depth: self.open_fs(depth) for depth in depths}
        table = {p: None for p in paths}
        samples: dict = {}

        def add(name, seconds, count):
            samples.setdefault(name, []).append(count / seconds)
        try:
            for rep in range(self.reps + 2):
                log(f"lookups: rep {rep + 1}")
                for depth in depths:
                    fresh = self.open_fs(depth)
                    add(f"{depth}/stat_fresh", inprocess.timed(inprocess.stat_loop, fresh, paths), len(paths))
                    fresh.close()
                    fs = systems[depth]
                    add(f"{depth}/stat_hot", inprocess.timed(inprocess.stat_loop, fs, paths), len(paths))
                    add(f"{depth}/lstat_hot", inprocess.timed(inprocess.lstat_loop, fs, paths), len(paths))
                    add(f"{depth}/missing_hot", inprocess.timed(inprocess.missing_loop, fs, missing), len(missing))
                    add("dict_floor", inprocess.timed(inprocess.dict_loop, table, paths), len(paths))
                for depth in depths:
                    fs = systems[depth]
                    dirs = self.paths["dirs"]
                    add(f"{depth}/listdir", inprocess.timed(inprocess.listdir_loop, fs, dirs), len(dirs))
                    add(f"{depth}/walk_entries", inprocess.timed(inprocess.walk_all, fs), len(paths))
                    small = self.paths["small_files"]
                    add(f"{depth}/read_bytes_small", inprocess.timed(inprocess.read_small, fs, small), len(small))
                    add(f"{depth}/open_read_small", inprocess.timed(inprocess.open_read_small, fs, small), len(small))
        finally:
            for fs in systems.values():
                fs.close()
        self.results["inprocess"]["rates"] = {k: median(v) for k, v in samples.items()}

    def run_large_inprocess(self) -> None:
        """Sequential read of the large file: layerfs (tar, gzip copy) vs a
        plain file on ext4, page cache warm for all."""
        large = self.corpus.large
        plain = os.path.join(self.large_extracted(), "large.bin")
        size = os.path.getsize(plain)
        cache = IndexCache(os.path.join(self.scratch, "inproc-cache"))
        systems = {c: layerfs.open(large.layer_files(c), cache=cache) for c in ("tar", "tar.gz")}
        samples: dict = {}
        try:
            for rep in range(self.reps):
                for name, fs in systems.items():
                    seconds = inprocess.timed(inprocess.read_stream, fs.open, "/large.bin")
                    samples.setdefault(f"layerfs/{name}", []).append(size / seconds / 1e6)
                seconds = inprocess.timed(inprocess.read_stream, open, plain)
                samples.setdefault("ext4_file", []).append(size / seconds / 1e6)
        finally:
            for fs in systems.values():
                fs.close()
        self.results["inprocess"]["large_read_mb_per_s"] = {k: median(v) for k, v in samples.items()}

    def large_extracted(self) -> str:
        """The large file's layer extracted (once) into the scratch directory."""
        extracted = os.path.join(self.scratch, "large-extracted")
        if not os.path.exists(os.path.join(extracted, "large.bin")):
            peers.extract_tar(self.corpus.large.layer_files()[0], extracted)
        return extracted

    # -- mounts -------------------------------------------------------

    def overlay_layers(self, name: str, stack) -> tuple:
        # Beside the corpus it comes from: tree-N-sS/extracted/layers-D.
        dest = os.path.join(os.path.dirname(stack.root), "extracted", os.path.basename(stack.root))
        return dest, peers.extract_for_overlay(stack.layer_files(), dest)

    def mount_targets(self, name: str, stack, final_tree: str) -> list:
        """Every target over *stack*, mounted; the skipped ones recorded."""
        layers_dir, names = self.overlay_layers(name, stack)
        mnt = os.path.join(self.mnt, name)
        attempts = [
            ("layerfs", lambda: peers.mount_layerfs([stack.oci("tar.gz")], f"{mnt}/layerfs",
                                                     os.path.join(self.scratch, "mount-cache"))),
            ("overlayfs", lambda: peers.mount_overlay(layers_dir, names, f"{mnt}/overlayfs")),
            ("fuse-overlayfs", lambda: peers.mount_fuse_overlayfs(layers_dir, names, f"{mnt}/fuse-overlayfs")),
            ("ratarmount", lambda: peers.mount_ratarmount(stack.layer_files(), f"{mnt}/ratarmount",
                                                           os.path.join(self.scratch, "ratarmount-index"))),
            ("tmpfs", lambda: peers.mount_tmpfs_copy(final_tree, f"{mnt}/tmpfs")),
        ]
        targets = [peers.Target("ext4", final_tree)]
        for target_name, attempt in attempts:
            try:
                targets.append(attempt())
            except (peers.Skip, RuntimeError, OSError) as error:
                self.skip(f"{name}/{target_name}", str(error))
        return targets

    def run_requests(self, name: str, stack, paths: dict) -> None:
        """FUSE requests per workload on a traced layerfs mount."""
        log(f"FUSE requests: {name}")
        counts = requests.count_requests(
            [stack.oci("tar.gz")], os.path.join(self.mnt, name, "traced"),
            os.path.join(self.scratch, "mount-cache"),
            os.path.join(self.scratch, f"trace-{name}.log"), paths, requests.WORKLOADS)
        self.results.setdefault("requests", {})[name] = counts
        for workload, found in counts.items():
            log(f"  {workload}: {sum(found.values())} requests "
                + ", ".join(f"{op} {n}" for op, n in found.items()))

    def run_memory(self, name: str, stack, final_tree: str) -> None:
        """Peak RSS of each FUSE server after a cold find, each freshly mounted."""
        log(f"server memory: {name}")
        targets = self.mount_targets(name, stack, final_tree)
        with peers.targets_closed(targets):
            found = memory.after_cold_find(
                [t for t in targets if t.name in ("layerfs", "fuse-overlayfs")])
        self.results.setdefault("memory", {})[name] = found
        log("  " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in found.items()))

    def run_tree_mounts(self, name: str, stack, final_tree: str, paths: dict) -> None:
        if self.args.memory:
            self.run_memory(name, stack, final_tree)
            self.save()
        if self.args.requests or self.args.requests_only:
            self.run_requests(name, stack, paths)
            self.save()
        if self.args.requests_only:
            return
        log(f"mount workloads: {name}")
        targets = self.mount_targets(name, stack, final_tree)
        out = self.results["mount"].setdefault(name, {})
        with peers.targets_closed(targets):
            for workload, function in mounted.TREE_WORKLOADS.items():
                samples: dict = {}
                failed: set = set()
                for rep in range(self.reps):
                    for target in targets:
                        if target.name in failed:
                            continue
                        try:
                            samples.setdefault(target.name, []).append(function(target.root, paths))
                        except OSError as error:
                            # ratarmount's union has no whiteouts nor type changes:
                            # its view differs, so some workloads cannot run on it.
                            failed.add(target.name)
                            samples.pop(target.name, None)
                            self.skip(f"{name}/{workload}/{target.name}", f"failed: {error}")
                out[workload] = {k: median(v) for k, v in samples.items()}
                log(f"  {workload}: " + ", ".join(f"{k} {v:.3f}s" for k, v in out[workload].items()))

    def run_large_mounts(self) -> None:
        log("mount workloads: large file")
        stack = self.corpus.large
        extracted = self.large_extracted()
        targets = self.mount_targets("large", stack, extracted)
        samples: dict = {}
        with peers.targets_closed(targets):
            for rep in range(self.reps):
                for target in targets:
                    samples.setdefault(target.name, []).append(
                        mounted.read_large(target.root, self.paths))
        size = os.path.getsize(os.path.join(extracted, "large.bin"))
        self.results["mount"]["large"] = {"read_large_mb_per_s": {
            k: size / median(v) / 1e6 for k, v in samples.items()}}

    def run_ready(self, name: str, stack) -> None:
        """Time to a usable tree: layerfs mount (first, cached) per
        compression, ratarmount (first, cached), and ``tar -x``."""
        log(f"ready times: {name}")
        mnt = os.path.join(self.mnt, name, "ready")
        samples: dict = {}

        def add(key, seconds):
            samples.setdefault(key, []).append(seconds)
        for rep in range(self.reps):
            for compression in ("tar", "tar.gz", "tar.zst"):
                files = stack.layer_files(compression)
                image = [stack.oci(compression)]
                cache_dir = tempfile.mkdtemp(prefix="ready-cache-", dir=self.scratch)
                try:
                    for when in ("first", "cached"):
                        peers.drop_caches()
                        target = peers.mount_layerfs(image, mnt, cache_dir)
                        target.close()
                        add(f"layerfs_{when}/{compression}", target.ready_seconds)
                finally:
                    shutil.rmtree(cache_dir, ignore_errors=True)
                add(f"tar_x/{compression}", peers.time_tar_extract(files, compression, self.scratch))
            index_dir = tempfile.mkdtemp(prefix="ratarmount-", dir=self.scratch)
            try:
                for when in ("first", "cached"):
                    peers.drop_caches()
                    target = peers.mount_ratarmount(stack.layer_files(), mnt, index_dir)
                    target.close()
                    add(f"ratarmount_{when}/tar", target.ready_seconds)
            except peers.Skip as error:
                self.skip(f"{name}/ratarmount-ready", str(error))
            finally:
                shutil.rmtree(index_dir, ignore_errors=True)
        self.results["ready"][name] = {k: median(v) for k, v in samples.items()}

    # -- the whole run ------------------------------------------------

    def save(self) -> None:
        """Write the results so far (a long run keeps its finished parts)."""
        path = os.path.abspath(self.args.results)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as out:
            json.dump(self.results, out, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)

    def prepare(self) -> None:
        """Build every corpus and the peers' extracted layers, measure nothing."""
        self.build_corpus()
        for depth in self.size["mount_depths"]:
            self.overlay_layers(f"tree-{depth}", self.corpus.stacks[depth])
        self.overlay_layers("large", self.corpus.large)
        if self.size["debian"] or self.args.debian:
            with contextlib.suppress(peers.Skip):
                self.overlay_layers("debian", debian.build(os.path.join(self.corpus_dir, "debian"), log=log))

    def run(self) -> dict:
        started = time.time()
        self.build_corpus()
        if not self.args.mount_only:
            self.run_open()
            self.save()
            self.run_lookups()
            self.save()
            self.run_large_inprocess()
            self.save()
        if not self.args.no_mount:
            chosen = self.args.mounts.split(",") if self.args.mounts else None
            if chosen is None or "debian" in chosen:
                self.run_debian()
                self.save()
            final_tree, _ = self.overlay_layers("tree-1", self.corpus.stacks[1])
            final_tree = os.path.join(final_tree, "0")
            for depth in self.size["mount_depths"]:
                if chosen is not None and f"tree-{depth}" not in chosen:
                    continue
                stack = self.corpus.stacks[depth]
                self.run_tree_mounts(f"tree-{depth}", stack, final_tree, self.paths)
                if not self.args.requests_only:
                    self.run_ready(f"tree-{depth}", stack)
                self.save()
            if (chosen is None or "large" in chosen) and not self.args.requests_only:
                self.run_large_mounts()
        self.results["elapsed_s"] = time.time() - started
        self.results["targets"] = report.evaluate(self.results)
        return self.results

    def run_debian(self) -> None:
        if not (self.size["debian"] or self.args.debian):
            self.skip("debian", "not part of the --quick size (use --debian)")
            return
        try:
            stack = debian.build(os.path.join(self.corpus_dir, "debian"), log=log)
        except peers.Skip as error:
            self.skip("debian", str(error))
            return
        final_tree = os.path.join(self.corpus_dir, "debian", "final")
        listing = debian.final_paths(final_tree)
        paths = {"all": listing["all"], "dirs": listing["dirs"],
                 "random_stat": inprocess.shuffled(listing["all"], 2, 10_000),
                 "small_files": inprocess.shuffled(listing["files"], 3, 5_000)}
        self.results["debian_entries"] = len(listing["all"])
        self.run_tree_mounts("debian", stack, final_tree, paths)
        if not self.args.requests_only:
            self.run_ready("debian", stack)


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    with open("/proc/meminfo") as meminfo:
        memory_kb = int(meminfo.readline().split()[1])
    return {"cpu": models[0] if models else platform.processor(), "cores": os.cpu_count(),
            "memory_gib": round(memory_kb / 2**20, 1), "kernel": platform.release(),
            "python": platform.python_version()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k files, 1/10/50 layers, 64 MiB file")
    parser.add_argument("--corpus-dir", default=os.path.join(HERE, "corpus"))
    parser.add_argument("--results", default=os.path.join(HERE, "results", "latest.json"))
    parser.add_argument("--files", type=int, help="entries in the tree corpus")
    parser.add_argument("--reps", type=int, help="repetitions of each measurement")
    parser.add_argument("--depths", help="layer counts of the tree corpus, e.g. 10 or 1,10")
    parser.add_argument("--large-mib", type=int, help="size of the large file")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-mount", action="store_true", help="in-process workloads only")
    parser.add_argument("--mount-only", action="store_true",
                        help="mounted workloads only (combine with an in-process run: "
                             "python -m benchmarks.report A.json B.json)")
    parser.add_argument("--debian", action="store_true", help="the Debian corpus even with --quick")
    parser.add_argument("--mounts", help="only these mounted corpora, e.g. debian,tree-10,large")
    parser.add_argument("--prepare", action="store_true", help="build the corpora only, measure nothing")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each FUSE server's peak RSS after a cold find")
    parser.add_argument("--requests", action="store_true",
                        help="also count FUSE requests per workload (a traced mount)")
    parser.add_argument("--requests-only", action="store_true",
                        help="only count FUSE requests per workload (implies --mount-only)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.requests_only:
        args.mount_only = True
    if os.geteuid() != 0:
        print("benchmarks.run needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    runner = Runner(args)
    if args.prepare:
        runner.prepare()
        return 0
    results = runner.run()
    runner.save()
    print(report.render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
