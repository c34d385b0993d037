"""Realistic shapes: thousands of files, deep trees, many layers, every entry
type, read through real tar and zstd blobs and compared with the reference model."""

import random

import pytest

import layerfs
from layerfs.testing import (Layer, apply_stack, device, directory, fifo, file, hardlink,
                             opaque, snapshot, symlink, whiteout, write_layer)
from layerfs.testing.view import diff_views


def realistic_stack(seed: int, layers: int, files_per_layer: int) -> list[Layer]:
    """A base of many files in a deep tree, then layers that override, delete,
    make directories opaque, change types and add links, as package managers do."""
    rng = random.Random(seed)
    directories = [""]
    for depth in range(25):                            # one deep chain, then a bushy tree
        directories.append(f"{directories[-1]}deep{depth}/")
    directories += [f"usr/share/pkg{n}/" for n in range(40)]
    base = [directory(d) for d in directories if d]
    known_files = []
    for number in range(files_per_layer * 3):
        name = f"{rng.choice(directories)}file{number}"
        base.append(file(name, f"{number}".encode() * rng.randint(1, 50), mode=0o644))
        known_files.append(name)
    base += [symlink("bin", "usr/bin"), directory("usr/bin"), fifo("run/pipe"),
             device("dev/null", 1, 3), hardlink("usr/bin/first-link", known_files[0])]
    stack = [Layer(base)]
    for index in range(1, layers):
        members = []
        for _ in range(files_per_layer):
            action = rng.random()
            victim = rng.choice(known_files)
            if action < 0.5:
                members.append(file(victim, f"v{index}".encode(), mode=0o600))
            elif action < 0.7:
                members.append(whiteout(victim))
            elif action < 0.75:
                members.append(opaque(rng.choice(directories[1:])))
            elif action < 0.85:
                members.append(symlink(f"usr/bin/l{index}-{len(members)}", "/" + victim))
            else:
                name = f"usr/share/pkg{rng.randrange(40)}/new{index}-{len(members)}"
                members.append(file(name, b"new"))
                known_files.append(name)
        stack.append(Layer(members))
    return stack


@pytest.mark.parametrize("layers, per_layer", [(2, 1500), (40, 100)])
def test_many_files_and_layers_equal_the_model(tmp_path, layers, per_layer):
    stack = realistic_stack(seed=layers, layers=layers, files_per_layer=per_layer)
    paths = [write_layer(layer, tmp_path / f"layer{n}", compression=("zstd", "none")[n % 2])
             for n, layer in enumerate(stack)]
    expected = apply_stack(stack)
    with layerfs.open(paths) as fs:
        assert diff_views(expected, snapshot(fs)) == []
        assert sum(layer.entry_count for layer in fs.layers) > 4000
    with layerfs.open(paths) as warm:          # the second open reads the cached index
        assert diff_views(expected, snapshot(warm)) == []
