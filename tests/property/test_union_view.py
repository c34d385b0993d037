"""layerfs's read path against the reference model, for random stacks."""

import os
import stat

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import layerfs
from layerfs.errors import InvalidLayerError
from layerfs.testing import strategies
from layerfs.testing.layers import Layer, directory, file, hardlink, opaque, whiteout
from layerfs.testing.model import apply_stack
from layerfs.testing.view import assert_views_equal, snapshot
from layerfs.testing.writers import write_image


def open_view(stack, tmp_path_factory, kind="layers", **write_options):
    source = write_image(stack, tmp_path_factory.mktemp("image"), kind=kind, **write_options)
    with layerfs.open(source) as fs:
        return snapshot(fs)


@given(stack=strategies.layer_stacks())
@example(stack=[Layer([file("f", b"one"), hardlink("g", "f"), file("f", b"two")]),
                Layer([whiteout("f"), opaque("d"), file("d/x")])])
def test_layer_list_view_equals_model(stack, tmp_path_factory):
    assert_views_equal(apply_stack(stack), open_view(stack, tmp_path_factory, "layers"))


@given(stack=strategies.layer_stacks(max_layers=3),
       kind=st.sampled_from(["oci-layout", "oci-archive", "docker-archive"]))
def test_image_view_equals_model(stack, kind, tmp_path_factory):
    assert_views_equal(apply_stack(stack), open_view(stack, tmp_path_factory, kind))


@given(stack=strategies.layer_stacks(max_layers=3),
       compression=st.sampled_from(["gzip", "zstd"]))
def test_view_does_not_depend_on_compression(stack, compression, tmp_path_factory):
    plain = open_view(stack, tmp_path_factory, compression="none")
    assert_views_equal(plain, open_view(stack, tmp_path_factory, compression=compression))


@given(stack=strategies.layer_stacks(max_layers=3, xattrs=False))
def test_view_does_not_depend_on_tar_format(stack, tmp_path_factory):
    pax = open_view(stack, tmp_path_factory, compression="none", format="pax")
    assert_views_equal(pax, open_view(stack, tmp_path_factory, compression="none",
                                      format="gnu"))


@given(stack=strategies.layer_stacks(max_layers=3, xattrs=False,
                                     names=strategies.SHORT_NAMES))
def test_ustar_layers_read_like_pax_ones(stack, tmp_path_factory):
    pax = open_view(stack, tmp_path_factory, compression="none", format="pax")
    assert_views_equal(pax, open_view(stack, tmp_path_factory, compression="none",
                                      format="ustar"))


@given(stack=strategies.invalid_layer_stacks())
def test_invalid_stacks_are_refused(stack, tmp_path_factory):
    source = write_image(stack, tmp_path_factory.mktemp("image"), kind="layers",
                         compression="none")
    with pytest.raises(InvalidLayerError):
        with layerfs.open(source) as fs:
            snapshot(fs)


@given(stack=strategies.layer_stacks())
@example(stack=[Layer([directory("d"), file("d/.wh..wh..opq"), file("e/.wh.x")])])
def test_listing_stat_and_walk_agree(stack, tmp_path_factory):
    source = write_image(stack, tmp_path_factory.mktemp("image"), kind="layers",
                         compression="none")
    with layerfs.open(source) as fs:
        view = snapshot(fs)
        check_view_invariants(fs, view)


def check_view_invariants(fs, view):
    """Rules every view obeys, whatever the stack."""
    for path, node in view.items():
        assert not any(part.startswith(".wh.") for part in path.split("/")), path
        if path != "/":
            parent = os.path.dirname(path)
            assert view[parent].kind == "dir", path
        st_ = fs.lstat(path)
        assert st_.st_atime_ns == st_.st_mtime_ns == st_.st_ctime_ns, path
        if node.kind == "dir":
            subdirs = [n for n in fs.listdir(path)
                       if stat.S_ISDIR(fs.lstat(os.path.join(path, n)).st_mode)]
            assert st_.st_nlink == 2 + len(subdirs), path
            assert st_.st_size == 0, path
            entries = {e.name: e for e in fs.scandir(path)}
            assert sorted(entries) == sorted(fs.listdir(path)), path
            for name, entry in entries.items():
                child = view[os.path.join(path, name)]
                assert entry.is_dir(follow_symlinks=False) == (child.kind == "dir")
                assert entry.is_symlink() == (child.kind == "symlink")
        else:
            assert st_.st_nlink == len(node.link_group), path
            inodes = {fs.lstat(name).st_ino for name in node.link_group}
            assert inodes == {st_.st_ino}, path
            size = {"file": len(node.content),
                    "symlink": len(os.fsencode(node.target))}.get(node.kind, 0)
            assert st_.st_size == size, path
    walked = set()
    for dirpath, dirnames, filenames in fs.walk("/"):
        assert view[dirpath].kind == "dir"
        assert sorted(dirnames + filenames) == sorted(fs.listdir(dirpath))
        walked.add(dirpath)
        walked.update(os.path.join(dirpath, n) for n in filenames)
        walked.update(os.path.join(dirpath, n) for n in dirnames)
    assert walked == set(view)
    inodes = {}
    for path, node in view.items():
        if node.kind != "dir":
            inodes.setdefault(fs.lstat(path).st_ino, set()).add(path)
    assert all(frozenset(names) == view[next(iter(names))].link_group
               for names in inodes.values())
