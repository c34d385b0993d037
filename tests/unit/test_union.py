"""The union core by itself: hand-written layers, one rule per test.

docs/semantics.md names these tests next to the rules they check.
"""

import errno
import stat

import pytest

from layerfs.entry import (BLOCKDEV, CHARDEV, DIRECTORY, FIFO, HARDLINK,
                           REGULAR, SYMLINK, Entry)
from layerfs.errors import InvalidLayerError
from layerfs.union import S_IFREG, Node, Tree


def f(path, mode=0o644, size=1, data=0, mtime=5, uid=0, **kw):
    return Entry(path, REGULAR, mode, uid, 0, mtime * 10**9, size, data=data, **kw)


def d(path, mode=0o755, mtime=5, uid=0, **kw):
    return Entry(path, DIRECTORY, mode, uid, 0, mtime * 10**9, **kw)


def link(path, target):
    return Entry(path, SYMLINK, 0o777, 0, 0, 0, linkname=target)


def hard(path, target):
    return Entry(path, HARDLINK, 0o644, 0, 0, 0, linkname=target)


def view(*layers):
    tree = Tree()
    for index, layer in enumerate(layers):
        tree.apply_layer(layer, index, f"L{index}")
    return tree


def paths(tree):
    return sorted(tree.nodes)


def test_directories_merge_with_metadata_of_the_topmost():
    tree = view([d("/a", mode=0o700, uid=1), f("/a/x")],
                [d("/a", mode=0o750, uid=2), f("/a/y")])
    assert paths(tree) == ["/", "/a", "/a/x", "/a/y"]
    assert tree.get("/a").mode == stat.S_IFDIR | 0o750
    assert tree.get("/a").uid == 2


def test_whiteout_hides_lower_path_and_everything_beneath():
    tree = view([d("/a"), f("/a/x"), d("/a/sub"), f("/a/sub/y"), f("/b")],
                [f("/.wh.a")])
    assert paths(tree) == ["/", "/b"]


def test_whiteout_never_hides_its_own_layer_wherever_it_stands():
    tree = view([f("/x", data=1)],
                [f("/x", data=2), f("/.wh.x")])
    assert tree.get("/x").data == 2
    tree = view([f("/x", data=1)],
                [f("/.wh.x"), f("/x", data=2)])
    assert tree.get("/x").data == 2


def test_whiteout_then_recreated_directory_shows_only_new_children():
    tree = view([d("/a"), f("/a/old")],
                [f("/.wh.a"), d("/a"), f("/a/new")])
    assert paths(tree) == ["/", "/a", "/a/new"]


def test_opaque_hides_all_lower_children_but_not_its_own_layer():
    tree = view([d("/a", mode=0o711), f("/a/x"), d("/a/s"), f("/a/s/y")],
                [f("/a/new"), f("/a/.wh..wh..opq")])
    assert paths(tree) == ["/", "/a", "/a/new"]
    assert tree.get("/a").mode == stat.S_IFDIR | 0o711   # the directory itself stays


def test_opaque_lookalike_is_a_whiteout_of_its_suffix():
    tree = view([d("/a"), f("/a/x"), f("/a/.wh..opqX")],
                [f("/a/.wh..wh..opqX")])
    assert paths(tree) == ["/", "/a", "/a/x"]


@pytest.mark.parametrize("name", ["/.wh.", "/a/.wh.", "/a/.wh..", "/a/.wh..."])
def test_malformed_marker_is_an_error_never_delete_the_parent(name):
    with pytest.raises(InvalidLayerError) as info:
        view([d("/a"), f("/a/x")], [f(name)])
    assert info.value.entry == name and info.value.layer == "L1"


def test_marker_used_as_directory_is_an_error():
    with pytest.raises(InvalidLayerError):
        view([f("/.wh.a/x")])


def test_markers_are_never_visible():
    tree = view([d("/a"), f("/a/.wh.z"), f("/a/.wh..wh..opq"), f("/.wh.q")])
    assert paths(tree) == ["/", "/a"]


def test_non_directory_hides_lower_subtree_and_later_directory_shows_none_of_it():
    tree = view([d("/a"), f("/a/x")],
                [f("/a")],
                [d("/a"), f("/a/y")])
    assert paths(tree) == ["/", "/a", "/a/y"]


def test_directory_replaces_lower_file():
    tree = view([f("/a")], [d("/a", mode=0o700)])
    assert tree.get("/a").mode == stat.S_IFDIR | 0o700


def test_repeated_path_in_one_layer_last_wins():
    tree = view([f("/x", data=1), f("/x", data=2)])
    assert tree.get("/x").data == 2
    tree = view([d("/a"), f("/a/x"), f("/a")])
    assert paths(tree) == ["/", "/a"]
    assert stat.S_ISREG(tree.get("/a").mode)


def test_implied_parents_exist_with_default_metadata():
    tree = view([f("/a/b/c")])
    assert paths(tree) == ["/", "/a", "/a/b", "/a/b/c"]
    assert tree.get("/a/b").mode == stat.S_IFDIR | 0o755
    assert tree.get("/a/b").mtime_ns == 0


def test_implied_parent_keeps_lower_directory_metadata():
    tree = view([d("/a", mode=0o700, uid=7)], [f("/a/x")])
    assert tree.get("/a").uid == 7 and tree.get("/a").mode == stat.S_IFDIR | 0o700


def test_entry_beneath_a_symlink_replaces_it_with_a_directory():
    tree = view([link("/link", "/etc"), f("/link/passwd")])
    assert stat.S_ISDIR(tree.get("/link").mode)
    assert paths(tree) == ["/", "/link", "/link/passwd"]


def test_hardlinks_share_an_inode_and_count_names():
    tree = view([f("/x", size=3), hard("/y", "/x")], [hard("/z", "/x")])
    x, y, z = tree.get("/x"), tree.get("/y"), tree.get("/z")
    assert x is y is z
    assert x.nlink == 3 and x.stat().st_nlink == 3


def test_hardlink_to_lower_file_keeps_content_after_later_replacement():
    tree = view([f("/x", data=1)], [hard("/y", "/x")], [f("/x", data=2)])
    assert tree.get("/y").data == 1 and tree.get("/y").nlink == 1
    assert tree.get("/x").data == 2


def test_whiteout_of_one_name_keeps_the_other_link():
    tree = view([f("/x"), hard("/y", "/x")], [f("/.wh.x")])
    assert paths(tree) == ["/", "/y"]
    assert tree.get("/y").nlink == 1


@pytest.mark.parametrize("layer, why", [
    ([hard("/y", "/missing")], "does not exist"),
    ([d("/a"), hard("/y", "/a")], "directory"),
    ([hard("/y", "/y")], "itself"),
])
def test_bad_hardlinks_are_errors(layer, why):
    with pytest.raises(InvalidLayerError, match=why):
        view(layer)


def test_hardlink_cannot_reach_a_whited_out_lower_file():
    with pytest.raises(InvalidLayerError):
        view([f("/x")], [f("/.wh.x"), hard("/y", "/x")])


def test_directory_nlink_counts_subdirectories():
    tree = view([d("/a"), d("/a/b"), d("/a/c"), f("/a/f")])
    assert tree.get("/a").nlink == 4
    assert tree.root.nlink == 3


def test_root_entry_sets_root_attributes_and_must_be_a_directory():
    tree = view([d("/", mode=0o700)])
    assert tree.root.mode == stat.S_IFDIR | 0o700
    with pytest.raises(InvalidLayerError):
        view([f("/")])


def test_special_files_keep_their_type_and_device():
    tree = view([Entry("/null", CHARDEV, 0o666, 0, 0, 0, rdev=259),
                 Entry("/sda", BLOCKDEV, 0o660, 0, 0, 0, rdev=2048),
                 Entry("/pipe", FIFO, 0o644, 0, 0, 0)])
    assert stat.S_ISCHR(tree.get("/null").mode) and tree.get("/null").rdev == 259
    assert stat.S_ISBLK(tree.get("/sda").mode)
    assert stat.S_ISFIFO(tree.get("/pipe").mode)


def test_stat_of_symlink_has_target_length_as_size():
    tree = view([link("/l", "some/where")])
    assert tree.get("/l").stat().st_size == len("some/where")


class TestResolve:
    tree = view([d("/usr"), d("/usr/bin"), f("/usr/bin/ls"),
                 link("/bin", "usr/bin"), link("/abs", "/usr/bin/ls"),
                 link("/up", "../../../usr"), link("/loop", "loop"),
                 link("/dangling", "/nowhere"), f("/file")])

    def test_follows_symlinks_in_every_component(self):
        assert self.tree.resolve("/bin/ls") == ("/usr/bin/ls", self.tree.get("/usr/bin/ls"))

    def test_absolute_targets_and_dotdot_stay_inside_the_root(self):
        assert self.tree.resolve("/abs")[0] == "/usr/bin/ls"
        assert self.tree.resolve("/up/bin/ls")[0] == "/usr/bin/ls"
        assert self.tree.resolve("/../../usr")[0] == "/usr"

    def test_dotdot_after_a_symlink_is_physical(self):
        assert self.tree.resolve("/bin/../bin/ls")[0] == "/usr/bin/ls"

    def test_relative_and_unclean_paths(self):
        assert self.tree.resolve("usr//bin/./ls")[0] == "/usr/bin/ls"

    def test_last_component_followed_only_when_asked(self):
        assert self.tree.resolve("/bin", follow=False)[0] == "/bin"
        assert self.tree.resolve("/bin", follow=True)[0] == "/usr/bin"

    def test_missing_last_component_is_none(self):
        assert self.tree.resolve("/usr/nothing") == ("/usr/nothing", None)
        assert self.tree.resolve("/dangling") == ("/nowhere", None)

    @pytest.mark.parametrize("path, code", [
        ("/missing/x", errno.ENOENT), ("/file/x", errno.ENOTDIR),
        ("/file/", errno.ENOTDIR), ("/loop", errno.ELOOP), ("/loop/x", errno.ELOOP)])
    def test_errors(self, path, code):
        with pytest.raises(OSError) as info:
            self.tree.resolve(path)
        assert info.value.errno == code


def test_a_stat_built_while_its_node_changes_is_not_kept(monkeypatch):
    """A writable mount's threads: a write lands between the fields being
    read and the result being stored."""
    node = Node(7, S_IFREG | 0o644, size=5)
    read_fields = Node._stat_fields
    raced = []

    def fields_then_a_write(self):
        fields = read_fields(self)
        if not raced:
            raced.append(True)
            self.size = 9               # the other thread's write...
            self.stat_cache = None      # ...and its reset, before our store
        return fields

    monkeypatch.setattr(Node, "_stat_fields", fields_then_a_write)
    assert node.stat().st_size == 5     # what it read, for this one caller
    assert node.stat_cache is None      # but not kept
    assert node.stat().st_size == 9
