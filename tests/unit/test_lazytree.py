"""layerfs.lazytree: a container's tree copies the shared view lazily, and
is indistinguishable from a full copy."""

from __future__ import annotations

import threading

import pytest

import layerfs
from layerfs.testing import layers as L
from layerfs.testing.writers import write_image

from layerfs.entry import DIRECTORY, HARDLINK, REGULAR, SYMLINK, Entry
from layerfs.lazytree import LazyChildren, container_tree
from layerfs.union import Tree


def f(path, data=0):
    return Entry(path, REGULAR, 0o644, 0, 0, 5 * 10**9, 1, data=data)


def d(path):
    return Entry(path, DIRECTORY, 0o755, 0, 0, 5 * 10**9)


def base_tree() -> Tree:
    tree = Tree()
    tree.apply_layer([d("/a"), d("/a/b"), f("/a/b/x"), f("/a/y"), d("/c"), f("/c/z"),
                      Entry("/c/hard", HARDLINK, 0o644, 0, 0, 0, linkname="/a/y"),
                      Entry("/s", SYMLINK, 0o777, 0, 0, 0, linkname="a/b")], 0, "base")
    return tree


def shape(tree: Tree) -> dict:
    return {path: (node.ino, node.mode, node.nlink, node.size, node.target,
                   sorted(node.children) if node.children is not None else None)
            for path, node in tree.walk_nodes()}


def test_a_new_container_tree_has_copied_nothing_but_the_root():
    base = base_tree()
    tree = container_tree(base)
    assert dict.__len__(tree.nodes) == 1
    assert tree.root is not base.root
    assert tree.nodes.get("/a/b/x").ino == base.nodes["/a/b/x"].ino
    # Only the directories on the way were copied.
    assert set(dict.keys(tree.nodes)) == {"/", "/a", "/c", "/s", "/a/b", "/a/y", "/a/b/x"}


def test_it_shows_what_the_base_shows_and_its_changes_stay_its_own():
    base = base_tree()
    before = shape(base)
    tree = container_tree(base)
    assert shape(tree) == before
    assert tree.resolve("/s/x")[0] == "/a/b/x"
    assert "/nope" not in tree.nodes and tree.nodes.get("/a/b/x/under") is None
    tree.remove("/a")
    tree.insert("/c/new", tree.new_node(0o100644))
    tree.move("/c", "/moved")
    assert shape(base) == before
    assert "/a/b/x" not in tree.nodes and "/a/b/x" in base.nodes
    assert sorted(tree.nodes) == ["/", "/moved", "/moved/hard", "/moved/new", "/moved/z",
                                  "/s"]


def test_a_hardlinked_inode_is_copied_once_under_all_its_names_at_its_first_change():
    base = base_tree()
    tree = container_tree(base)
    hard = tree.nodes["/c/hard"]
    assert tree.nodes["/a/y"] is hard is base.nodes["/a/y"]     # shared until changed
    tree.remove("/a/y")
    copy = tree.nodes["/c/hard"]
    assert copy is not hard and tree.current(hard) is copy
    assert copy.nlink == 1 and hard.nlink == 2


def test_two_containers_of_one_view_are_isolated():
    base = base_tree()
    one, two = container_tree(base), container_tree(base)
    with pytest.raises(AttributeError, match="shared view"):
        one.nodes["/a/y"].mode = 0o100600       # a change that did not take its copy
    one.own("/a/y", one.nodes["/a/y"]).mode = 0o100600
    one.remove("/c")
    assert one.nodes["/a/y"].mode == 0o100600 and "/c/z" not in one.nodes
    assert two.nodes["/a/y"].mode == 0o100644 and "/c/z" in two.nodes


def test_files_are_the_views_own_until_changed_and_directories_are_copied():
    base = base_tree()
    one, two = container_tree(base), container_tree(base)
    assert one.nodes["/a/b/x"] is two.nodes["/a/b/x"] is base.nodes["/a/b/x"]
    assert one.nodes["/a"] is not base.nodes["/a"] is not two.nodes["/a"]
    copy = one.own("/a/b/x", one.nodes["/a/b/x"])
    assert one.nodes["/a/b/x"] is one.nodes["/a/b"].children["x"] is copy
    assert one.own("/a/b/x", base.nodes["/a/b/x"]) is copy      # once per container
    assert two.nodes["/a/b/x"] is base.nodes["/a/b/x"]


def test_concurrent_lookups_make_one_copy_of_each_node():
    base = Tree()
    base.apply_layer([d("/big")] + [f(f"/big/f{n}") for n in range(2000)], 0, "base")
    tree = container_tree(base)
    assert isinstance(tree.nodes["/big"].children, LazyChildren)
    seen = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def look(found):
        barrier.wait()
        found.extend(tree.nodes.get(f"/big/f{n}") for n in range(0, 2000, 7))

    threads = [threading.Thread(target=look, args=(found,)) for found in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for found in seen[1:]:
        assert all(a is b for a, b in zip(found, seen[0], strict=True))
    assert all(tree.root.children["big"].children[f"f{n}"] is node
               for n, node in zip(range(0, 2000, 7), seen[0]))


def test_images_share_a_view_only_where_their_nodes_would_be_equal():
    """The same ChainID is not enough when a layer is read through its table
    of contents: its nodes point at the blob's chunks, so the blob counts."""
    from types import SimpleNamespace as Fake
    from layerfs.fs import view_key
    plain = Fake(cache=object(), digest="sha256:gzip")
    toc = Fake(cache=None, digest="sha256:chunked")
    other_toc = Fake(cache=None, digest="sha256:chunked2")

    def image(*layers):
        return Fake(chain_id=lambda: "sha256:c", layers=list(layers))

    assert view_key(image(plain)) == view_key(image(Fake(cache=object(), digest="sha256:z")))
    assert len({view_key(image(plain)), view_key(image(toc)),
                view_key(image(other_toc))}) == 3
    assert view_key(Fake(chain_id=lambda: None, layers=[])) is None


def test_the_names_of_a_hardlinked_inode_are_found_without_copying_everything():
    base = Tree()
    base.apply_layer([d("/a"), f("/a/x"), d("/b"), d("/far")]
                     + [f(f"/far/f{n}") for n in range(500)]
                     + [Entry("/b/y", HARDLINK, 0o644, 0, 0, 0, linkname="/a/x")], 0, "base")
    tree = container_tree(base)
    node = tree.nodes["/a/x"]
    assert tree.names_of(node) == ["/a/x", "/b/y"]
    assert "/far/f1" not in dict.keys(tree.nodes)
    node = tree.own("/a/x", node)
    assert tree.names_of(node) == ["/a/x", "/b/y"]
    tree.insert("/c", node)
    tree.remove("/a/x")
    assert tree.names_of(node) == ["/b/y", "/c"] and node.nlink == 2
    assert dict.__len__(tree.nodes) < 20


def test_what_was_found_through_a_symlink_before_a_change_is_found_changed_after(tmp_path):
    image = write_image([[L.file("etc/real", b"x", mode=0o644), L.symlink("etc/link", "real")]],
                        str(tmp_path / "image"), kind="layers", compression="none")
    with layerfs.open(image, upper=tmp_path / "upper") as fs:
        assert fs.stat("/etc/link").st_mode & 0o777 == 0o644      # remembered by path
        fs.chmod("/etc/real", 0o600)
        assert fs.stat("/etc/link").st_mode & 0o777 == 0o600
        assert fs.node("etc/./link").mode & 0o777 == 0o600
