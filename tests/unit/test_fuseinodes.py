"""The writable mount's inode table (layerfs.fuseinodes), without FUSE:
lookup counts, paths that follow renames, inodes that outlive their names,
and what an unlinked file's data does meanwhile (layerfs.upper)."""

from __future__ import annotations

import errno
import os

import pytest

import layerfs
import layerfs.writable
from layerfs.fuseinodes import ROOT_ID, InodeTable
from layerfs.testing import layers as L
from layerfs.testing.writers import write_image

IMAGE = [L.Layer([L.directory("dir"), L.directory("dir/sub"), L.file("dir/sub/file", b"lower"),
                  L.file("top", b"top")])]


@pytest.fixture
def fs(tmp_path):
    image = write_image(IMAGE, tmp_path / "image", kind="layers", compression="none")
    with layerfs.open(image, upper=tmp_path / "upper", cache=False) as opened:
        yield opened


def look(table, fs, path):
    """The records of every component of *path*, as the kernel's lookups
    make them, one lookup each; the last one's record."""
    record = table.get(ROOT_ID)
    walked = ""
    for name in path.strip("/").split("/"):
        walked += "/" + name
        record = table.looked_up(record, name, fs.node(walked, False))
    return record


def test_paths_follow_a_renamed_directory(fs):
    table = InodeTable(fs.tree)
    file = look(table, fs, "/dir/sub/file")
    assert table.path(file) == "/dir/sub/file"
    fs.rename("/dir", "/moved")
    table.moved(fs.node("/moved"), table.get(ROOT_ID), "moved")
    assert table.path(file) == "/moved/sub/file"


def test_a_record_lives_while_the_kernel_or_a_record_beneath_holds_it(fs):
    released = []
    table = InodeTable(fs.tree, released.append)
    file = look(table, fs, "/dir/sub/file")
    sub = fs.node("/dir/sub")
    table.forget(sub.ino, 1)
    assert table.holds(sub.ino)               # the file's record names it
    assert table.path(file) == "/dir/sub/file"
    table.forget(file.node.ino, 1)
    assert [table.holds(fs.node(p).ino) for p in ("/dir", "/dir/sub")] == [True, False]
    table.forget(fs.node("/dir").ino, 1)
    assert table.records.keys() == {ROOT_ID}
    assert released == [file.node, sub, fs.node("/dir")]


def test_lookups_are_counted(fs):
    table = InodeTable(fs.tree)
    look(table, fs, "/top")
    record = look(table, fs, "/top")
    assert record.lookups == 2
    table.forget(record.node.ino, 1)
    assert table.holds(record.node.ino)
    table.forget(record.node.ino, 1)
    assert not table.holds(record.node.ino)
    table.forget(ROOT_ID, 5)                  # the root is never forgotten
    assert table.holds(ROOT_ID)


def test_a_file_with_several_names_is_found_through_any(fs):
    table = InodeTable(fs.tree)
    record = look(table, fs, "/top")
    fs.link("/top", "/other")
    fs.unlink("/top")
    assert table.path(record) == "/other"
    fs.unlink("/other")
    assert table.path(record) is None
    assert record.node.nlink == 0


def test_an_unlinked_upper_file_keeps_its_data_while_referenced(fs):
    table = InodeTable(fs.tree, fs.upper.forgotten)
    fs.upper.referenced = table.holds
    fs.write_bytes("/new", b"kept")
    record = look(table, fs, "/new")
    fs.unlink("/new")
    assert table.path(record) is None
    handle = layerfs.writable.open_unnamed(fs, record.node, os.O_RDWR)
    try:
        assert handle.pread(10, 0) == b"kept"
        handle.pwrite(b"!", 4)
    finally:
        handle.close()
    assert record.node.ino in fs.upper.orphans     # the kernel still holds it
    table.forget(record.node.ino, 1)
    assert fs.upper.orphans == {}
    assert not any(name.startswith("tmp") for name in os.listdir(f"{fs.upper.directory}/work"))
    assert fs.diff() == []


def test_a_lower_file_without_a_name_reads_but_does_not_write(fs):
    table = InodeTable(fs.tree)
    fs.upper.referenced = table.holds
    record = look(table, fs, "/top")
    fs.unlink("/top")
    handle = layerfs.writable.open_unnamed(fs, record.node, os.O_RDONLY)
    try:
        assert handle.pread(10, 0) == b"top"
    finally:
        handle.close()
    with pytest.raises(OSError) as caught:
        layerfs.writable.open_unnamed(fs, record.node, os.O_WRONLY)
    assert caught.value.errno == errno.ESTALE


def test_an_inode_without_a_name_takes_metadata_changes_in_memory(fs):
    node = fs.node("/top")
    fs.unlink("/top")
    unnamed = layerfs.writable.Unnamed(node)
    fs.chmod(unnamed, 0o600, follow_symlinks=False)
    fs.setxattr(unnamed, "user.a", b"1", follow_symlinks=False)
    fs.utime(unnamed, ns=(1, 2), follow_symlinks=False)
    node = fs.tree.current(node)        # the container's copy, made at the unlink
    st = node.stat()
    assert (st.st_mode & 0o7777, st.st_mtime_ns, node.xattrs) == (0o600, 2, {"user.a": b"1"})
    assert fs.diff()[0].change == "deleted" and len(fs.diff()) == 1


def test_a_record_follows_the_copy_a_container_takes_of_an_image_file(fs):
    table = InodeTable(fs.tree)
    record = look(table, fs, "/top")
    found_before = record.node                      # the image's node, shared
    fs.chmod("/top", 0o600)                         # the container copies it
    assert record.node is fs.node("/top") is not found_before
    assert record.node.mode & 0o777 == 0o600
    root = table.get(ROOT_ID)
    # A lookup that found the node before the copy, answered after it.
    assert table.looked_up(root, "top", found_before) is record
    assert record.node is fs.node("/top") and record.lookups == 2
    assert table.path(record) == "/top"
