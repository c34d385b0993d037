"""``layerfs cache ls | prune | path``: what the cache holds, and freeing it.

Only this module and :mod:`layerfs.cache` know the cache's layout; cli.py
registers the command (:func:`add_parser`) and nothing more.  Every removal
goes through :meth:`layerfs.cache.IndexCache.remove`, which skips pinned
entries (those of open layers: mounts, containers, uppers) unless
``--force`` with ``--all``, so a prune never breaks a running mount.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from .cache import (CacheEntry, IndexCache, _scandir, format_size, load_marshal,
                    parse_duration, parse_size)


def add_parser(commands) -> None:
    """Registers ``cache`` and its subcommands on *commands* (argparse)."""
    sub = commands.add_parser("cache", help="list, prune or locate the layer cache",
                              description="list, prune or locate the layer cache "
                                          "(see docs/cache.md)")
    sub.add_argument("--cache-dir", help="the cache directory (default: "
                                         "$LAYERFS_CACHE_DIR or ~/.cache/layerfs)")
    sub.add_argument("--cache-size", metavar="SIZE",
                     help="record a new budget for the cache directory (500M, 20G)")
    actions = sub.add_subparsers(dest="cache_command", metavar="ACTION")
    actions.required = True
    ls = actions.add_parser("ls", help="list what is cached")
    ls.add_argument("--json", action="store_true", help="one JSON document")
    ls.set_defaults(function=cmd_ls)
    prune = actions.add_parser("prune", help="free space (pinned entries are kept)")
    how = prune.add_mutually_exclusive_group()
    how.add_argument("--all", action="store_true", help="everything not pinned")
    how.add_argument("--older-than", metavar="DURATION",
                     help="entries not used for DURATION (30m, 12h, 7d)")
    how.add_argument("--keep", metavar="SIZE",
                     help="evict least recently used until at most SIZE remains")
    prune.add_argument("--force", action="store_true",
                       help="with --all: pinned entries too (open readers keep reading)")
    prune.set_defaults(function=cmd_prune)
    path = actions.add_parser("path", help="print the cache directory")
    path.set_defaults(function=cmd_path)


def open_cache(args) -> IndexCache:
    size = getattr(args, "cache_size", None)
    if size is not None:
        try:
            size = parse_size(size)
        except ValueError as error:
            raise _usage(f"--cache-size: {error}") from None
    return IndexCache(args.cache_dir, size=size)


def cmd_path(args) -> int:
    print(open_cache(args).root)
    return 0


def cmd_ls(args) -> int:
    cache = open_cache(args)
    entries = sorted(cache.scan(), key=lambda e: (e.kind, e.digest))
    entries = [e for e in entries if e.kind != "temp"]
    images = image_references(cache)
    if args.json:
        json.dump({"root": cache.root, "budget": cache.budget,
                   "used": sum(e.size for e in entries),
                   "entries": [_record(e, images) for e in entries]},
                  sys.stdout, indent=1)
        print()
        return 0
    print("DIGEST\tKIND\tSIZE\tLAST USE\tPINNED\tIMAGES")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_use))
        print(f"{e.digest}\t{e.kind}\t{format_size(e.size)}\t{used}\t"
              f"{'yes' if e.pinned else 'no'}\t{','.join(images.get(e.digest, [])) or '-'}")
    total = sum(e.size for e in entries)
    print(f"total {format_size(total)} of a budget of {format_size(cache.budget)} "
          f"({cache.root})")
    return 0


def cmd_prune(args) -> int:
    cache = open_cache(args)
    if args.force and not args.all:
        raise _usage("cache prune: --force goes with --all only")
    try:
        older_than = parse_duration(args.older_than) if args.older_than else None
        keep = parse_size(args.keep) if args.keep else None
    except ValueError as error:
        raise _usage(f"cache prune: {error}") from None
    entries = [e for e in cache.scan() if e.kind != "temp"]
    victims = select(entries, all_=args.all, older_than=older_than, keep=keep)
    freed = kept = 0
    for entry in victims:
        if cache.remove(entry, force=args.force):
            freed += entry.size
        else:
            kept += 1
    if args.all:
        cache.remove_stale_pins()
    print(f"freed {format_size(freed)}" + (f"; {kept} pinned entries kept" if kept else ""))
    return 0


def _usage(message: str) -> Exception:
    from .cli import UsageError
    return UsageError(message)


def select(entries: list, *, all_: bool, older_than: Optional[float],
           keep: Optional[int], now: Optional[float] = None) -> list:
    """The entries a prune removes.  Without an option: decompressed data
    (copies, spans, checkpoints, frames) and fetched ranges only, which a
    later open rebuilds or fetches again.  ``--all``:
    everything (indexes, views, registry blobs too).  ``--older-than``:
    whatever was not used for that long.  ``--keep``: least recently used
    decompressed data first, until at most *keep* bytes remain."""
    now = time.time() if now is None else now
    if all_:
        return list(entries)
    if older_than is not None:
        return [e for e in entries if now - e.last_use > older_than]
    if keep is not None:
        total = sum(e.size for e in entries)
        chosen = []
        for entry in sorted((e for e in entries if e.evictable), key=lambda e: e.last_use):
            if total <= keep:
                break
            if not entry.pinned:
                chosen.append(entry)
                total -= entry.size
        return chosen
    return [e for e in entries if e.evictable]


def image_references(cache: IndexCache) -> dict:
    """digest -> the images known to use it: the ``docker://`` references
    whose last-fetched manifest (under ``registry/tags``) names it (its
    config or a layer), and the local images whose layer files the stat
    memo remembers (:func:`local_references`)."""
    found = local_references(cache)
    tags = os.path.join(cache.root, "registry", "tags")
    for directory, _, files in os.walk(tags):
        for name in files:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(directory, name)) as file:
                    digest = json.load(file)["digest"]
                hex_ = digest.partition(":")[2]
                with open(os.path.join(cache.root, "registry", "blobs", "sha256", hex_)) as f:
                    manifest = json.load(f)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            repo = os.path.relpath(directory, tags)
            ref = f"docker://{repo}:{name[:-5]}"
            for d in [manifest.get("config", {})] + list(manifest.get("layers", [])):
                if isinstance(d, dict) and "digest" in d:
                    found.setdefault(d["digest"], []).append(ref)
            found.setdefault(digest, []).append(ref)
    return found


def local_references(cache: IndexCache) -> dict:
    """digest -> the local images whose layer blobs were indexed from a file
    that is still there, unchanged: the stat memo (``memo/``) keeps, per
    file indexed, its path, offset and identity (inode, size, mtime, ctime)
    and the blob's digest.  A blob file of an OCI layout names the layout
    (``oci:DIR``); a layer inside an archive, the archive; any other file,
    itself.  A file edited, moved or removed since names nothing: the cache
    cannot know where that image went."""
    found: dict = {}
    for item in _scandir(os.path.join(cache.root, "memo")):
        if item.name.startswith("."):
            continue
        record = load_marshal(item.path)
        try:
            identity, hex_ = record["identity"], record["digest"]
            path, offset = identity[0], identity[1]
            st = os.stat(path)
        except (OSError, TypeError, KeyError, IndexError):
            continue
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != \
                tuple(identity[3:8]):
            continue
        found.setdefault("sha256:" + hex_, []).append(_local_image(path, offset))
    return {digest: sorted(set(names)) for digest, names in found.items()}


def _local_image(path: str, offset: int) -> str:
    blobs, hex_ = os.path.split(path)
    algorithms, algorithm = os.path.split(blobs)
    layout, name = os.path.split(algorithms)
    if (offset == 0 and name == "blobs" and algorithm == "sha256"
            and os.path.isfile(os.path.join(layout, "oci-layout"))):
        return f"oci:{layout}"
    return path


def _record(entry: CacheEntry, images: dict) -> dict:
    return {"digest": entry.digest, "kind": entry.kind, "size": entry.size,
            "last_use": entry.last_use, "pinned": entry.pinned,
            "images": images.get(entry.digest, []), "path": entry.path}
