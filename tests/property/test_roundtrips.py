"""Properties that tie the read view, the export, the writable view, diff and
commit together (issue 5): each is one more way to compute the same tree."""

from hypothesis import given, settings

import layerfs
from layerfs.commit import commit
from layerfs.testing import apply_stack, operations, strategies
from layerfs.testing.view import diff_views, snapshot
from layerfs.testing.writers import write_layer

STACKS = strategies.layer_stacks(max_layers=3, names=strategies.SHORT_NAMES[:4])


def write_stack(stack, directory):
    return [write_layer(layer, f"{directory}/layer{n}", compression=("none", "gzip")[n % 2])
            for n, layer in enumerate(stack)]


@given(stack=STACKS)
def test_flattened_export_shows_the_same_view(stack, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export")
    with layerfs.open(write_stack(stack, directory)) as fs:
        fs.export(directory / "flat.tar")
        view = snapshot(fs)
    with layerfs.open([str(directory / "flat.tar")]) as flat:
        assert diff_views(view, snapshot(flat)) == []
    assert diff_views(apply_stack(stack), view) == []


def inodes_and_order(fs):
    """What a snapshot leaves out: inode numbers, link counts, listing order."""
    return {path: (node.ino, node.nlink, list(node.children or ()))
            for path, node in fs.tree.nodes.items()}


@given(stack=STACKS)
def test_reopening_is_idempotent(stack, tmp_path_factory):
    """The second open restores the view the first one stored in the cache."""
    paths = write_stack(stack, tmp_path_factory.mktemp("reopen"))
    with layerfs.open(paths) as first, layerfs.open(paths) as second:
        assert diff_views(snapshot(first), snapshot(second)) == []
        restored = inodes_and_order(second)
        assert inodes_and_order(first) == restored
    with layerfs.open(paths, cache=False) as uncached:
        assert inodes_and_order(uncached) == restored


def base_view_with_diff(base: dict, view: dict, changes) -> dict:
    """The base view with the diff applied: what diff claims the upper did."""
    result = dict(base)
    for change in changes:
        if change.change == "deleted":
            for path in [p for p in result if p == change.path or p.startswith(change.path + "/")]:
                del result[path]
    for change in changes:
        if change.change != "deleted":
            result[change.path] = view[change.path]
    result["/"] = view["/"]         # diff, like docker's, never lists the root
    return result


@settings(max_examples=60)
@given(stack=STACKS, ops=operations.operation_lists())
def test_writable_view_survives_reopen_diff_and_commit(stack, ops, tmp_path_factory):
    directory = tmp_path_factory.mktemp("writable")
    paths = write_stack(stack, directory)
    with layerfs.open(paths) as base_fs:
        base = snapshot(base_fs)
    with layerfs.open(paths, upper=directory / "upper") as fs:
        for operation in ops:
            operations.apply(fs, operation)
        view = snapshot(fs)
        changes = fs.diff()
        result = commit(fs, directory / "out", tag="t", compression="gzip")
    assert diff_views(view, base_view_with_diff(base, view, changes)) == []
    with layerfs.open(paths, upper=directory / "upper") as reopened:
        assert diff_views(view, snapshot(reopened)) == []
    with layerfs.open(result.dest, tag="t") as committed:
        assert diff_views(view, snapshot(committed)) == []
