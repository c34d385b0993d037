"""The reference model against hand-worked cases: if these fail, every
property test that trusts the model is worthless."""

import pytest

from layerfs.testing.layers import (Layer, device, directory, fifo, file, hardlink, opaque,
                                    symlink, whiteout)
from layerfs.testing.model import ModelError, apply_stack


def view(*layers):
    return apply_stack([Layer(members) for members in layers])


def test_empty_stack_is_a_default_root():
    (root,) = view().values()
    assert (root.kind, root.mode, root.uid, root.gid, root.mtime_ns) == ("dir", 0o755, 0, 0, 0)


def test_opaque_hides_lower_children_but_not_same_layer_ones():
    v = view([file("d/old"), file("d/sub/deep")],
             [file("d/new"), opaque("d")])
    assert sorted(v) == ["/", "/d", "/d/new"]


def test_opaque_on_missing_or_non_directory_hides_nothing_else():
    v = view([file("f", b"x")], [opaque("g"), file("keep")])
    assert sorted(v) == ["/", "/f", "/g", "/keep"]
    assert v["/g"].kind == "dir"


def test_whiteout_in_same_layer_does_not_hide_that_layers_entry():
    v = view([file("a", b"lower")], [file("a", b"upper"), whiteout("a")])
    assert v["/a"].content == b"upper"


def test_whiteout_removes_whole_subtree_and_missing_names_are_harmless():
    v = view([file("d/x/y"), file("e")], [whiteout("d"), whiteout("nothing")])
    assert sorted(v) == ["/", "/e"]


def test_type_change_dir_file_dir_hides_old_children():
    v = view([directory("p", mode=0o700), file("p/child")],
             [file("p", b"now a file")],
             [file("p/new")])
    assert sorted(v) == ["/", "/p", "/p/new"]
    assert v["/p"].mode == 0o755           # re-created as a default directory


def test_dir_over_dir_replaces_attributes_keeps_children():
    v = view([directory("d", mode=0o700, uid=5), file("d/f")],
             [directory("d", mode=0o750, uid=7, mtime=9, xattrs={"user.k": b"v"})])
    assert sorted(v) == ["/", "/d", "/d/f"]
    d = v["/d"]
    assert (d.mode, d.uid, d.mtime_ns, d.xattrs) == (0o750, 7, 9 * 10**9, (("user.k", b"v"),))


def test_implied_parent_keeps_existing_directory_metadata():
    v = view([directory("d", mode=0o700, uid=3)], [file("d/f")])
    assert (v["/d"].mode, v["/d"].uid) == (0o700, 3)


def test_implied_parent_replaces_symlink_instead_of_following_it():
    v = view([directory("etc"), symlink("link", "/etc")], [file("link/passwd")])
    assert v["/link"].kind == "dir"
    assert "/etc/passwd" not in v


def test_hardlink_to_lower_file_survives_whiteout_of_its_target():
    v = view([file("f", b"data", mode=0o600)],
             [hardlink("g", "f")],
             [whiteout("f")])
    assert sorted(v) == ["/", "/g"]
    assert (v["/g"].content, v["/g"].mode, v["/g"].link_group) == (b"data", 0o600, {"/g"})


def test_hardlink_shares_the_inode_and_ignores_its_own_metadata():
    v = view([file("f", b"x", uid=4)], [hardlink("g", "./f", uid=99, mode=0o777)])
    assert v["/g"].link_group == v["/f"].link_group == {"/f", "/g"}
    assert (v["/g"].uid, v["/g"].mode) == (4, 0o644)


def test_repeated_path_last_wins_and_earlier_hardlink_keeps_old_file():
    v = view([file("f", b"one"), hardlink("g", "f"), file("f", b"two"), file("f", b"three")])
    assert v["/f"].content == b"three"
    assert v["/g"].content == b"one"
    assert v["/f"].link_group == {"/f"}


def test_whiteout_of_target_in_same_layer_applies_before_the_hardlink():
    with pytest.raises(ModelError):
        view([file("f")], [hardlink("g", "f"), whiteout("f")])


def test_names_are_normalised():
    v = view([file("/a/./b//c"), directory("./x/../y/")])
    assert sorted(v) == ["/", "/a", "/a/b", "/a/b/c", "/y"]


def test_root_entry_sets_root_attributes():
    v = view([directory("./", mode=0o700, uid=1, mtime=5)])
    assert (v["/"].mode, v["/"].uid, v["/"].mtime_ns) == (0o700, 1, 5 * 10**9)


def test_special_files():
    v = view([fifo("p"), device("c", 1, 3), device("b", 8, 1, block=True)])
    assert (v["/p"].kind, v["/c"].rdev, v["/b"].kind, v["/b"].rdev) == ("fifo", (1, 3), "blockdev", (8, 1))


def test_markers_are_never_in_the_view_and_imply_parents():
    v = view([file("a/.wh.b"), file("c/.wh..wh..opq")])
    assert sorted(v) == ["/", "/a", "/c"]


def test_look_alike_opaque_is_a_whiteout():
    v = view([file("d/.wh..opqX"), file("d/keep")], [file("d/.wh..wh..opqX")])
    assert sorted(v) == ["/", "/d", "/d/keep"]


@pytest.mark.parametrize("members", [
    [file(".wh.")], [file("d/.wh..")], [file("d/.wh...")],
    [file("../escape")], [file("a\x00b")], [file("x" * 256)],
    [hardlink("g", "missing")], [directory("d"), hardlink("g", "d")], [hardlink("g", "g")],
    [file("./", b"")],
])
def test_invalid_layers_raise(members):
    with pytest.raises(ModelError):
        view(members)
