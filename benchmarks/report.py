"""The targets of issue 6, judged on one run's results, and the printed table.

Every verdict is a ratio of two figures measured in the same run; an
absolute rate appears only where the target itself names one (stat >= 1M/s).
A target whose figures are missing (peer skipped, size not run) is
"not measured", never met.
"""

from __future__ import annotations

from typing import Optional


def _get(results: dict, *keys):
    node = results
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ratio(a, b) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def _verdict(name: str, value, limit: float, higher_is_better: bool, where: str) -> dict:
    if value is None:
        met = None
    else:
        met = value >= limit if higher_is_better else value <= limit
    return {"target": name, "measured": value, "limit": limit,
            "higher_is_better": higher_is_better, "met": met, "where": where}


def _largest(keys, default=None):
    return max(keys) if keys else default


def evaluate(results: dict) -> list:
    rates = _get(results, "inprocess", "rates") or {}
    depths = sorted({int(k.split("/")[0]) for k in rates if k[0].isdigit()})
    mid = 50 if 50 in depths else _largest(depths)
    top = _largest(depths)
    mount_names = sorted(k for k in (results.get("mount") or {}) if k.startswith("tree-"))
    ten = "tree-10" if "tree-10" in mount_names else None
    deep = [n for n in mount_names if int(n.split("-")[1]) >= 10]
    mount = results.get("mount") or {}

    def m(corpus, workload, target):
        return _get(mount, corpus, workload, target)

    out = [
        _verdict(f"in-process stat, {results['config']['files']} entries x {mid} layers, >= 1M/s",
                 rates.get(f"{mid}/stat_hot"), 1e6, True, f"inprocess.rates.{mid}/stat_hot"),
        _verdict(f"in-process stat >= 1/3 of the bare dict loop ({mid} layers)",
                 _ratio(rates.get(f"{mid}/stat_hot"), rates.get("dict_floor")), 1 / 3, True,
                 "stat_hot / dict_floor"),
        _verdict(f"{top}-layer stat rate >= 90% of 1-layer",
                 _ratio(rates.get(f"{top}/stat_hot"), rates.get("1/stat_hot")), 0.9, True,
                 f"{top}/stat_hot / 1/stat_hot"),
        _verdict("FUSE cold find <= 1.5x kernel overlayfs (Debian)",
                 _ratio(m("debian", "find_cold", "layerfs"), m("debian", "find_cold", "overlayfs")),
                 1.5, False, "mount.debian.find_cold layerfs/overlayfs"),
    ]
    for name in deep:
        out.append(_verdict(f"FUSE cold find faster than overlayfs ({name})",
                            _ratio(m(name, "find_cold", "layerfs"), m(name, "find_cold", "overlayfs")),
                            1.0, False, f"mount.{name}.find_cold layerfs/overlayfs"))
    for corpus_name in [n for n in (ten, "debian") if n in mount]:
        for workload, label in (("find_warm", "warm find"), ("random_stat_10k_warm", "warm random stats"),
                                ("readdir_all", "readdir of every directory"),
                                ("read_small_5k", "5,000 small-file reads")):
            out.append(_verdict(f"{label} within 1.5x ext4 ({corpus_name})",
                                _ratio(m(corpus_name, workload, "layerfs"), m(corpus_name, workload, "ext4")),
                                1.5, False, f"mount.{corpus_name}.{workload} layerfs/ext4"))
    if ten:
        out.append(_verdict("FUSE random stats (cold) >= 10x fuse-overlayfs (10 layers)",
                            _ratio(m(ten, "random_stat_10k", "fuse-overlayfs"),
                                   m(ten, "random_stat_10k", "layerfs")),
                            10.0, True, "fuse-overlayfs time / layerfs time"))
    ready = results.get("ready") or {}
    for name in [n for n in (ten, "debian") if n in ready]:
        for compression in ("tar.gz", "tar.zst"):
            out.append(_verdict(f"first mount <= 1/2 of tar -x ({name}, {compression})",
                                _ratio(ready[name].get(f"layerfs_first/{compression}"),
                                       ready[name].get(f"tar_x/{compression}")),
                                0.5, False, f"ready.{name} layerfs_first / tar_x"))
    opens = _get(results, "inprocess", "open") or {}
    for compression in ("tar", "tar.gz", "tar.zst"):
        row = opens.get(f"{mid}/{compression}")
        out.append(_verdict(f"warm-cache open <= 1/10 of first open ({mid} layers, {compression})",
                            row and row["warm_over_cold"], 0.1, False,
                            f"inprocess.open.{mid}/{compression}"))
    large = _get(mount, "large", "read_large_mb_per_s") or {}
    out.append(_verdict("large sequential read >= 0.8x fuse-overlayfs",
                        _ratio(large.get("layerfs"), large.get("fuse-overlayfs")), 0.8, True,
                        "mount.large MB/s layerfs / fuse-overlayfs"))
    row = opens.get(f"{mid}/tar.gz")
    out.append(_verdict(f"index memory <= 250 bytes/entry ({mid} layers)",
                        row and row["bytes_per_entry"], 250, False,
                        f"inprocess.open.{mid}/tar.gz bytes_per_entry"))
    return out


# -- rendering ---------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render(results: dict) -> str:
    lines = []
    config = results["config"]
    machine = results["machine"]
    lines.append(f"layerfs benchmarks: {config['files']} entries, layers {list(config['depths'])}, "
                 f"{config['reps']} repetitions (medians); {machine['cores']} cores, {machine['cpu']}, "
                 f"kernel {machine['kernel']}, Python {machine['python']}")
    lines.append("")
    rates = _get(results, "inprocess", "rates") or {}
    depths = sorted({int(k.split("/")[0]) for k in rates if k[0].isdigit()})
    if rates:
        lines.append(f"In-process rates (operations/s; bare dict loop: {_fmt(rates.get('dict_floor'))}/s)")
        names = ["stat_hot", "lstat_hot", "stat_fresh", "missing_hot", "listdir", "walk_entries",
                 "read_bytes_small", "open_read_small"]
        rows = []
        for depth in depths:
            stat = rates.get(f"{depth}/stat_hot")
            rows.append([depth] + [_fmt(rates.get(f"{depth}/{n}")) for n in names]
                        + [_fmt(_ratio(stat, rates.get("dict_floor"))),
                           _fmt(_ratio(stat, rates.get("1/stat_hot")))])
        lines += _table(["layers"] + names + ["stat/dict", "stat/1-layer"], rows)
    opens = _get(results, "inprocess", "open") or {}
    if opens:
        lines.append("Open and index (cold = empty index cache, page cache dropped)")
        rows = [[k, _fmt(v["cold_open_s"]), _fmt(v["warm_open_s"]), _fmt(v["warm_over_cold"]),
                 _fmt(v["index_entries_per_s"]), _fmt(v["index_blob_mb_per_s"]),
                 _fmt(v["index_tar_mb_per_s"]), _fmt(v["bytes_per_entry"]), _fmt(v["bytes_per_node"])]
                for k, v in sorted(opens.items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0]))]
        lines += _table(["layers/compression", "cold s", "warm s", "warm/cold", "entries/s",
                         "blob MB/s", "tar MB/s", "RSS B/entry", "RSS B/node"], rows)
    large = _get(results, "inprocess", "large_read_mb_per_s") or {}
    if large:
        lines.append("In-process sequential read of the large file (MB/s, page cache warm): "
                     + ", ".join(f"{k} {_fmt(v)}" for k, v in large.items()))
        lines.append("")
    for name, workloads in (results.get("mount") or {}).items():
        if name == "large":
            continue
        others = sorted({t for w in workloads.values() for t in w} - {"layerfs"})
        lines.append(f"Through the mount: {name} (seconds, median; ratio = layerfs / other, < 1 is faster)")
        rows = []
        for workload, by_target in workloads.items():
            base = by_target.get("layerfs")
            rows.append([workload, _fmt(base)] + [
                f"{_fmt(by_target.get(o))} ({_fmt(_ratio(base, by_target.get(o)), 2)}x)" for o in others])
        lines += _table(["workload", "layerfs"] + others, rows)
    large = _get(results, "mount", "large", "read_large_mb_per_s") or {}
    if large:
        base = large.get("layerfs")
        lines.append("Through the mount: large file sequential read, caches dropped (MB/s; ratio = layerfs / other)")
        lines += _table(["target", "MB/s", "layerfs/target"],
                        [[k, _fmt(v), _fmt(_ratio(base, v), 2)] for k, v in large.items()])
    for name, ready in (results.get("ready") or {}).items():
        lines.append(f"Time to ready: {name} (seconds; tar -x = extracting every layer)")
        rows = []
        for compression in ("tar", "tar.gz", "tar.zst"):
            first, cached = ready.get(f"layerfs_first/{compression}"), ready.get(f"layerfs_cached/{compression}")
            tar_x = ready.get(f"tar_x/{compression}")
            rows.append([compression, _fmt(first), _fmt(cached), _fmt(tar_x),
                         _fmt(_ratio(first, tar_x), 2), _fmt(_ratio(cached, first), 2)])
        rows.append(["ratarmount (tar)", _fmt(ready.get("ratarmount_first/tar")),
                     _fmt(ready.get("ratarmount_cached/tar")), "-", "-", "-"])
        lines += _table(["layers", "first mount", "cached mount", "tar -x", "first/tar -x",
                         "cached/first"], rows)
    for name, found in (results.get("memory") or {}).items():
        lines.append(f"FUSE server peak RSS after a cold find: {name} (MiB)")
        lines += _table(["server", "MiB"], [[k, _fmt(v / 2**20)] for k, v in found.items()])
    for name, counts in (results.get("requests") or {}).items():
        lines.append(f"FUSE requests per workload: {name} (counted on a traced mount, one run each)")
        rows = [[workload, sum(found.values()),
                 ", ".join(f"{op} {count}" for op, count in found.items())]
                for workload, found in counts.items()]
        lines += _table(["workload", "requests", "by opcode"], rows)
    targets = results.get("targets") or []
    if targets:
        lines.append("Targets")
        rows = []
        for t in targets:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            sign = ">=" if t["higher_is_better"] else "<="
            rows.append([t["target"], _fmt(t["measured"]), f"{sign} {_fmt(t['limit'])}", verdict])
        lines += _table(["target", "measured", "limit", "verdict"], rows)
    for what, reason in (results.get("skipped") or {}).items():
        lines.append(f"skipped {what}: {reason}")
    return "\n".join(lines)


def merge(runs: list) -> dict:
    """Several runs' results as one (say an in-process and a mounted run of
    the same size): each section's keys are combined, later runs winning."""
    merged: dict = {}
    for run in runs:
        for key, value in run.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def main(argv=None) -> int:
    """``python -m benchmarks.report [results.json ...]``: the table of a
    (possibly unfinished) run, or of several runs combined."""
    import json
    import os
    import sys
    argv = sys.argv[1:] if argv is None else argv
    paths = argv or [os.path.join(os.path.dirname(__file__), "results", "latest.json")]
    runs = []
    for path in paths:
        with open(path) as source:
            runs.append(json.load(source))
    results = merge(runs)
    results["targets"] = evaluate(results)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
