"""Kernel overlayfs against the reference model: two independent opinions
on the union of the same stacks (see docs/testing.md for the deliberate
differences, which expected_overlay_view applies and checks)."""

import os

import pytest
from hypothesis import given

from layerfs.testing import strategies
from layerfs.testing.layers import (Layer, device, directory, fifo, file, hardlink, opaque,
                                    symlink, whiteout)
from layerfs.testing.model import apply_stack
from layerfs.testing.oracle import overlay_available, overlay_differences, overlay_view

AVAILABLE, REASON = overlay_available()
pytestmark = [pytest.mark.overlayfs,
              pytest.mark.skipif(not AVAILABLE and os.environ.get("CI") != "true",
                                 reason=f"overlayfs oracle unavailable: {REASON}")]

HAND_WRITTEN = {
    "opaque": [[file("d/old"), directory("d/sub", mode=0o700), file("d/sub/x")],
               [file("d/new"), opaque("d")]],
    "whiteout-same-layer": [[file("a", b"lower")], [file("a", b"upper"), whiteout("a")]],
    "dir-file-dir": [[directory("p", mode=0o700), file("p/child")], [file("p", b"f")],
                     [file("p/new")]],
    "implied-keeps-lower-metadata": [[directory("d", mode=0o711, uid=5, mtime=7,
                                                xattrs={"user.k": b"v"})],
                                     [file("d/f")]],
    "hardlink-across-layers": [[file("f", b"data", mode=0o600), hardlink("f2", "f")],
                               [hardlink("g", "f"), hardlink("h", "g")], [whiteout("f")]],
    "repeated-path": [[file("f", b"one"), hardlink("g", "f"), file("f", b"two"),
                       directory("f"), file("f/x")]],
    "whiteout-then-recreate-dir": [[file("a/b/c")], [whiteout("a"), file("a/z")]],
    "symlink-parent-replaced": [[directory("etc"), symlink("link", "/etc", mode=0o755)],
                                [file("link/passwd")]],
    "specials": [[fifo("p", xattrs={"user.x": b"1"}), device("c", 1, 3),
                  device("b", 8, 1, block=True)], [whiteout("p")]],
    "root-entry": [[directory("./", mode=0o700, uid=3, mtime=11), file("a")], [file("b")]],
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_overlay_agrees_with_model_on_hand_written_stacks(name, tmp_path):
    stack = [Layer(members) for members in HAND_WRITTEN[name]]
    result = overlay_view(stack, tmp_path)
    assert overlay_differences(apply_stack(stack), result) == []


def test_overlay_copies_cross_layer_hardlinks_and_that_is_checked(tmp_path):
    stack = [Layer(m) for m in HAND_WRITTEN["hardlink-across-layers"]]
    result = overlay_view(stack, tmp_path)
    assert result.copies == 1
    assert result.view["/g"].link_group == {"/g", "/h"}      # the copy and its link
    assert apply_stack(stack)["/g"].link_group == {"/f2", "/g", "/h"}


@given(stack=strategies.layer_stacks(max_layers=4))
def test_overlay_agrees_with_model(stack, tmp_path_factory):
    result = overlay_view(stack, tmp_path_factory.mktemp("overlay"))
    lines = overlay_differences(apply_stack(stack), result)
    assert not lines, "overlayfs and the model differ:\n  " + "\n  ".join(lines)
