"""Seeded benchmark corpora: one final view, spread over any number of layers.

A *tree corpus* is N entries (regular files, symlinks, hardlinks, empty
directories) in a tree of directories.  The final view depends on the seed
and N only; :func:`plan_layers` spreads it over D layers and adds the
history that real images carry, in configurable shares: files overridden
from a lower layer, junk files and directories deleted by whiteouts, opaque
directories hiding a lower layer's junk, and type changes (a file where a
lower layer had a directory, and the reverse).  With D = 1 there is no
history, so the 1-, 10-, 50- and 100-layer stacks of one seed show the same
view.

Each layer is written as ``layer-NNN.tar``, ``.tar.gz`` and ``.tar.zst``,
and the stack as three OCI layouts (``oci-tar/``, ``oci-tar.gz/``,
``oci-tar.zst/``) whose blobs are those files.  A *large
corpus* is one layer holding one big file, for streaming reads.
Everything is deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import tarfile
from typing import Optional

import attrs
import zstandard

from layerfs.imagewrite import write_oci_layout

MTIME = 1_700_000_000
COMPRESSIONS = ("tar", "tar.gz", "tar.zst")
FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
OPAQUE_MARKER = ".wh..wh..opq"


@attrs.frozen
class Shares:
    """What share of the final entries each kind of history touches."""

    overrides: float = 0.10      # regular files with an older copy below
    whiteouts: float = 0.05      # junk paths created, then whited out
    opaque_dirs: float = 0.002   # directories made opaque over lower junk
    type_changes: float = 0.01   # file<->directory between layers
    hardlinks: float = 0.02
    symlinks: float = 0.05


@attrs.define
class Item:
    """One entry of the final view (directories are kept apart)."""

    path: str                  # relative, no leading slash
    kind: str
    size: int = 0
    target: str = ""           # symlink target or hardlink target path


@attrs.frozen
class FinalView:
    dirs: tuple                # relative directory paths, parents first
    items: tuple               # Items that are not directories


def file_content(path: str, size: int, salt: int = 0) -> bytes:
    """Compressible, path-dependent bytes, so versions differ."""
    unit = f"{salt}:{path}\n".encode()
    return (unit * (size // len(unit) + 1))[:size]


def _file_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.80:
        return rng.randint(0, 1024)
    if roll < 0.98:
        return rng.randint(1025, 8192)
    return rng.randint(8193, 65536)


def final_view(files: int, seed: int, shares: Shares = Shares()) -> FinalView:
    """The view every stack of *files* entries and *seed* shows."""
    rng = random.Random(seed)
    dir_count = max(2, files // 25)
    dirs = ["d0000"]
    for number in range(1, dir_count):
        parent = rng.choice(dirs)
        if parent.count("/") >= 6:
            parent = dirs[0]
        dirs.append(f"{parent}/d{number:04d}")
    items: list[Item] = []
    regular: list[Item] = []
    for number in range(files):
        where = rng.choice(dirs)
        roll = rng.random()
        if roll < shares.symlinks and regular:
            target = rng.choice(regular).path
            depth = where.count("/") + 1
            items.append(Item(f"{where}/s{number:06d}", SYMLINK,
                              target="../" * depth + target))
        elif roll < shares.symlinks + shares.hardlinks and regular:
            items.append(Item(f"{where}/h{number:06d}", HARDLINK,
                              target=rng.choice(regular).path))
        else:
            item = Item(f"{where}/f{number:06d}", FILE, size=_file_size(rng))
            items.append(item)
            regular.append(item)
    return FinalView(tuple(sorted(dirs)), tuple(items))


@attrs.define
class _Member:
    kind: str
    size: int = 0
    target: str = ""
    salt: int = 0


class LayerPlan:
    """What each of D layers holds: path -> member, per layer."""

    def __init__(self, depth: int):
        self.layers: list[dict[str, _Member]] = [{} for _ in range(depth)]

    def put(self, layer: int, path: str, member: _Member) -> None:
        here = self.layers[layer]
        assert path not in here or here[path] == member, (layer, path)
        here[path] = member
        parent = os.path.dirname(path)
        while parent and parent not in here:
            here[parent] = _Member(DIR)
            parent = os.path.dirname(parent)


def _subtree_of(path: str, roots: set) -> Optional[str]:
    """The first of *roots* that is *path* or one of its ancestors."""
    probe = path
    while probe:
        if probe in roots:
            return probe
        probe = os.path.dirname(probe)
    return None


def plan_layers(view: FinalView, depth: int, seed: int,
                shares: Shares = Shares()) -> LayerPlan:
    """Spread *view* over *depth* layers and add history (none when 1)."""
    rng = random.Random(seed * 1000 + depth)
    plan = LayerPlan(depth)
    dir_owner = {d: rng.randrange(depth) for d in view.dirs}
    owner = {item.path: rng.randrange(depth) for item in view.items}
    history = depth > 1
    parents_of_dirs = {os.path.dirname(d) for d in view.dirs}
    leaf_dirs = {d for d in view.dirs if d not in parents_of_dirs}
    count = len(view.items)
    opaque = {}
    retyped_dirs = {}
    if history:
        candidates = [d for d in view.dirs if d != "d0000"]
        rng.shuffle(candidates)
        n_opaque = max(1, int(count * shares.opaque_dirs))
        n_retyped = max(1, int(count * shares.type_changes / 2 / 10))
        for d in candidates[:n_opaque]:
            if _subtree_of(d, set(opaque) | set(retyped_dirs)) is None:
                opaque[d] = rng.randrange(1, depth)
        for d in candidates[n_opaque:n_opaque + n_retyped]:
            if _subtree_of(d, set(opaque) | set(retyped_dirs)) is None and d in leaf_dirs:
                retyped_dirs[d] = rng.randrange(1, depth)
    floors = {**opaque, **retyped_dirs}

    def floor_of(path: str) -> int:
        """The lowest layer *path* may live in: above every opaque or
        retyped ancestor's change."""
        floor, probe = 0, os.path.dirname(path)
        while probe:
            floor = max(floor, floors.get(probe, 0))
            probe = os.path.dirname(probe)
        return floor

    for d in view.dirs:
        dir_owner[d] = max(dir_owner[d], floor_of(d + "/x"))
    for item in view.items:
        owner[item.path] = max(owner[item.path], floor_of(item.path))
    for item in view.items:
        if item.kind == HARDLINK:
            top = max(owner[item.path], owner[item.target])
            owner[item.path] = owner[item.target] = top
    for item in view.items:
        if item.kind == HARDLINK:   # a target raised by a later link
            owner[item.path] = owner[item.target]

    for d in view.dirs:
        plan.put(dir_owner[d], d, _Member(DIR))
    for item in view.items:
        plan.put(owner[item.path], item.path,
                 _Member(item.kind, item.size, item.target))
    if not history:
        return plan

    for d, layer in opaque.items():
        plan.put(layer, f"{d}/{OPAQUE_MARKER}", _Member(FILE))
        for junk in range(3):
            plan.put(rng.randrange(layer), f"{d}/opaque-junk{junk}", _Member(FILE, 100, salt=junk))
    for d, layer in retyped_dirs.items():
        plan.put(rng.randrange(layer), d, _Member(FILE, 64, salt=1))
    linked = {item.target for item in view.items if item.kind == HARDLINK}
    special = set(floors)
    files = [item for item in view.items
             if item.kind == FILE and item.path not in linked
             and _subtree_of(item.path, special) is None]
    rng.shuffle(files)
    n_over = int(count * shares.overrides)
    n_retyped_files = int(count * shares.type_changes / 2)
    movable = [f for f in files if owner[f.path] > 0]
    for item in movable[:n_over]:
        plan.put(rng.randrange(owner[item.path]), item.path,
                 _Member(FILE, max(1, item.size // 2), salt=7))
    for item in movable[n_over:n_over + n_retyped_files]:
        layer = rng.randrange(owner[item.path])
        plan.put(layer, item.path, _Member(DIR))
        plan.put(layer, f"{item.path}/was-a-dir", _Member(FILE, 10, salt=3))
    safe_dirs = [d for d in view.dirs if _subtree_of(d, special) is None]
    for number in range(int(count * shares.whiteouts)):
        where = rng.choice(safe_dirs)
        born = rng.randrange(depth - 1)
        dies = rng.randrange(born + 1, depth)
        name = f"{where}/junk{number:06d}"
        if number % 4 == 0:
            plan.put(born, f"{name}/inner", _Member(FILE, 50, salt=number))
        else:
            plan.put(born, name, _Member(FILE, rng.randint(0, 2048), salt=number))
        plan.put(dies, f"{where}/.wh.junk{number:06d}", _Member(FILE))
    return plan


def _tar_info(path: str, member: _Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.mtime = MTIME
    info.uname = info.gname = ""
    if member.kind == DIR:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif member.kind == SYMLINK:
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, member.target
    elif member.kind == HARDLINK:
        info.type, info.mode, info.linkname = tarfile.LNKTYPE, 0o644, member.target
    else:
        info.mode, info.size = 0o644, member.size
    return info


def write_layer_tar(members: dict, out) -> None:
    """One layer as a tar: sorted (parents first), hardlinks last."""
    ordered = sorted(members.items(), key=lambda kv: (kv[1].kind == HARDLINK, kv[0]))
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, member in ordered:
            info = _tar_info(path, member)
            data = None
            if member.kind == FILE and member.size:
                data = io.BytesIO(file_content(path, member.size, member.salt))
            tar.addfile(info, data)


def compress_layer(tar_path: str) -> None:
    """Write ``.gz`` and ``.zst`` beside *tar_path* (deterministic)."""
    base = tar_path[:-len(".tar")]
    with open(tar_path, "rb") as src, open(base + ".tar.gz.tmp", "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
    os.replace(base + ".tar.gz.tmp", base + ".tar.gz")
    with open(tar_path, "rb") as src, open(base + ".tar.zst.tmp", "wb") as dst:
        zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
    os.replace(base + ".tar.zst.tmp", base + ".tar.zst")


@attrs.frozen
class Stack:
    """A written stack: its directory, layer count and per-layer files."""

    root: str
    depth: int

    def layer_files(self, compression: str = "tar") -> list[str]:
        return [os.path.join(self.root, f"layer-{i:03d}.{compression}") for i in range(self.depth)]

    def oci(self, compression: str = "tar.gz") -> str:
        """The stack as an OCI layout whose blobs are the *compression* files."""
        return os.path.join(self.root, f"oci-{compression}")

    def write_oci(self) -> None:
        for compression in COMPRESSIONS:
            write_oci_layout(self.oci(compression), self.layer_files(compression), tag="bench")


def _done(root: str) -> bool:
    return os.path.exists(os.path.join(root, "DONE"))


def _mark_done(root: str, description: dict) -> None:
    with open(os.path.join(root, "DONE"), "w") as stamp:
        json.dump(description, stamp, sort_keys=True)


def write_stack(root: str, view: FinalView, depth: int, seed: int,
                shares: Shares = Shares()) -> Stack:
    """Write the layers of *view* over *depth* layers under *root* (kept
    if already complete)."""
    stack = Stack(root, depth)
    if _done(root):
        return stack
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    plan = plan_layers(view, depth, seed, shares)
    for index, members in enumerate(plan.layers):
        path = os.path.join(root, f"layer-{index:03d}.tar")
        with open(path, "wb") as out:
            write_layer_tar(members, out)
        compress_layer(path)
    stack.write_oci()
    _mark_done(root, {"depth": depth, "seed": seed, "entries": len(view.items)})
    return stack


def write_final_listing(root: str, view: FinalView) -> str:
    """``paths.json``: the final view's dirs, regular files and all paths."""
    path = os.path.join(root, "paths.json")
    listing = {
        "dirs": ["/" + d for d in view.dirs],
        "files": ["/" + i.path for i in view.items if i.kind == FILE],
        "all": ["/" + d for d in view.dirs] + ["/" + i.path for i in view.items],
    }
    with open(path, "w") as out:
        json.dump(listing, out)
    return path


def write_large(root: str, size: int, seed: int) -> Stack:
    """One layer holding ``large.bin`` of *size* bytes (half compressible)."""
    stack = Stack(root, 1)
    if _done(root):
        return stack
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rng = random.Random(seed)
    block = rng.randbytes(1 << 19) + bytes(1 << 19)
    path = os.path.join(root, "layer-000.tar")
    with open(path, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = _tar_info("large.bin", _Member(FILE, size))
        tar.addfile(info, _Repeat(block, size))
    compress_layer(path)
    stack.write_oci()
    _mark_done(root, {"size": size, "seed": seed})
    return stack


class _Repeat(io.RawIOBase):
    """*size* bytes: *block* again and again."""

    def __init__(self, block: bytes, size: int):
        self.block, self.left, self.at = block, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self.block) - self.at)
            out += self.block[self.at:self.at + take]
            self.at = (self.at + take) % len(self.block)
        self.left -= n
        return bytes(out)


@attrs.frozen
class Corpus:
    root: str
    files: int
    seed: int
    stacks: dict          # depth -> Stack
    large: Stack
    listing: str          # paths.json

    def paths(self) -> dict:
        with open(self.listing) as source:
            return json.load(source)


def build(root: str, files: int, depths: tuple, large_size: int, seed: int = 1,
          shares: Shares = Shares(), log=lambda message: None) -> Corpus:
    """Every stack of one view, and the large file; reuses complete parts."""
    base = os.path.join(root, f"tree-{files}-s{seed}")
    os.makedirs(base, exist_ok=True)
    view = final_view(files, seed, shares)
    listing = write_final_listing(base, view)
    stacks = {}
    for depth in depths:
        log(f"corpus: {files} entries over {depth} layers")
        stacks[depth] = write_stack(os.path.join(base, f"layers-{depth}"), view, depth, seed, shares)
    log(f"corpus: large file of {large_size >> 20} MiB")
    large = write_large(os.path.join(root, f"large-{large_size}"), large_size, seed)
    return Corpus(base, files, seed, stacks, large, listing)
