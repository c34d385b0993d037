"""Open an image in a fresh process and report time and memory as JSON.

``python -m benchmarks.open_probe CACHE_DIR SOURCE...`` prints
``{"seconds", "rss_before", "rss_after", "entries", "nodes"}``.  A fresh
process, so the resident-set growth is the index's and nothing else's.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * 4096


def main(argv: list) -> int:
    cache_dir, sources = argv[0], argv[1:]
    import layerfs
    from layerfs.layer import IndexCache
    source = sources[0] if len(sources) == 1 and os.path.isdir(sources[0]) else sources
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    fs = layerfs.open(source, cache=IndexCache(cache_dir))
    seconds = time.perf_counter() - start
    gc.collect()
    after = rss_bytes()
    report = {"seconds": seconds, "rss_before": before, "rss_after": after,
              "entries": sum(layer.entry_count for layer in fs.layers),
              "nodes": len(fs.tree.nodes)}
    fs.close()
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
