"""The FUSE mount of random stacks shows what the reference model says:
the same property as test_union_view, through the kernel this time."""

import os

import attrs

import pytest
from hypothesis import given, settings

from layerfs import mount as layerfs_mount
from layerfs.errors import MountError
from layerfs.testing import apply_stack, strategies
from layerfs.testing.view import diff_views, snapshot
from layerfs.testing.writers import write_layer


def mount_unavailable() -> str:
    if os.geteuid() != 0:
        return "mounting needs root here"
    try:
        layerfs_mount.check_device()
        layerfs_mount.load_fuse()
    except MountError as error:
        return str(error)
    return ""


REASON = mount_unavailable()
# Under CI (root, /dev/fuse, libfuse installed by .ci/run) a missing mount fails.
pytestmark = [pytest.mark.mount, pytest.mark.skipif(
    bool(REASON) and os.environ.get("CI") != "true", reason=REASON or "-")]


def linux_view(view: dict) -> dict:
    """What a Linux mount can show of a view: only files and directories
    have user.* xattrs (the kernel answers ENODATA for the others, so the
    adapter does not list them)."""
    result = {}
    for path, node in view.items():
        if node.kind not in ("file", "dir"):
            node = attrs.evolve(node, xattrs=tuple(
                (name, value) for name, value in node.xattrs if not name.startswith("user.")))
        result[path] = node
    return result


@settings(max_examples=25)
@given(stack=strategies.layer_stacks(max_layers=3))
def test_mounted_view_equals_the_model(stack, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mounted")
    paths = [write_layer(layer, directory / f"layer{n}") for n, layer in enumerate(stack)]
    mountpoint = directory / "mnt"
    mountpoint.mkdir()
    layerfs_mount.mount(paths, str(mountpoint))
    try:
        seen = snapshot(str(mountpoint))
    finally:
        layerfs_mount.umount(str(mountpoint))
    expected = linux_view(apply_stack(stack))
    seen["/"] = expected["/"]      # the mount point's own root metadata is checked elsewhere
    assert diff_views(expected, linux_view(seen)) == []
