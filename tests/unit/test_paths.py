"""Canonical paths: how a tar member name becomes one, and the helpers that
take them apart."""

import pytest
from hypothesis import given, strategies as st

from layerfs import paths
from layerfs.paths import BadMemberName, normalize_member_name


@pytest.mark.parametrize("name, expected", [
    ("", "/"), (".", "/"), ("./", "/"), ("/", "/"),
    ("etc/passwd", "/etc/passwd"), ("./etc/passwd", "/etc/passwd"),
    ("/etc//passwd/", "/etc/passwd"), ("etc/./passwd", "/etc/passwd"),
    ("usr/lib/../bin", "/usr/bin"), ("a/b/../../c", "/c"),
])
def test_normalize_member_name(name, expected):
    assert normalize_member_name(name) == expected


@pytest.mark.parametrize("name, words", [
    ("../etc/passwd", "climbs out"), ("a/../../b", "climbs out"), ("/..", "climbs out"),
    ("a\x00b", "NUL"), ("a/" + "x" * 256, "longer than 255"),
    ("/".join(["d" * 200] * 21), "longer than 4095"),
])
def test_normalize_member_name_refuses(name, words):
    with pytest.raises(BadMemberName, match=words):
        normalize_member_name(name)


def test_a_component_of_255_bytes_is_allowed_and_counted_in_bytes():
    assert normalize_member_name("x" * 255) == "/" + "x" * 255
    with pytest.raises(BadMemberName):
        normalize_member_name("é" * 128)   # 256 bytes in UTF-8


# Names as the view holds them: any text but "/" and NUL, and no lone surrogate
# (bytes that are not UTF-8 arrive as surrogate escapes, tested below).
components = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                     min_size=1, max_size=12).filter(
    lambda part: part not in (".", ".."))
canonical = st.lists(components, max_size=6).map(lambda parts: "/" + "/".join(parts))


@given(canonical)
def test_canonical_paths_are_fixed_points(path):
    assert paths.is_canonical(path)
    assert normalize_member_name(path) == path


@given(canonical, st.sampled_from(["//", "/./", "/x/../"]))
def test_a_path_with_a_detour_is_not_canonical(path, detour):
    if path == "/":
        return
    head, name = paths.split(path)
    spelled = head.rstrip("/") + detour + name
    assert not paths.is_canonical(spelled)
    assert normalize_member_name(spelled) == path


@given(canonical)
def test_split_and_join_are_inverse(path):
    if path == "/":
        return
    head, name = paths.split(path)
    assert paths.join(head, name) == path
    assert paths.parents(path) == paths.parents(head) + ([head] if head != "/" else [])


@given(canonical, canonical)
def test_is_within(path, top):
    inside = path == top or top == "/" or path.startswith(top + "/")
    assert paths.is_within(path, top) == inside
    assert paths.is_within(paths.join(top, "x"), top)
    assert not paths.is_within(top + "x", top) or top == "/"


def test_names_keep_bytes_that_are_not_utf8():
    raw = b"caf\xe9"
    assert paths.encode_name(paths.decode_name(raw)) == raw


def test_order_key_keeps_each_subtree_together():
    spelled = ["/d-x/g", "/d/f", "/d.y", "/", "/d", "/d-x", "/d/sub/h", "/d/sub"]
    assert sorted(spelled, key=paths.order_key) == [
        "/", "/d", "/d/f", "/d/sub", "/d/sub/h", "/d-x", "/d-x/g", "/d.y"]
