"""The marker classifier: every name a layer may hold, and the look-alikes
other tools got wrong (FIELD-NOTES: go-containerregistry#1897,
stereoscope#647 and #696)."""

import pytest
from hypothesis import given, strategies as st

from layerfs import whiteout
from layerfs.whiteout import MALFORMED, NOT_A_MARKER, OPAQUE, WHITEOUT, classify


@pytest.mark.parametrize("name, expected", [
    (".wh..wh..opq", (OPAQUE, "")),
    (".wh.etc", (WHITEOUT, "etc")),
    (".wh..wh..opqX", (WHITEOUT, ".wh..opqX")),   # not opaque: exact match only
    (".wh..wh.x", (WHITEOUT, ".wh.x")),           # hides a name no view can hold
    (".wh..hidden", (WHITEOUT, ".hidden")),
    (".wh.", (MALFORMED, "")),                    # never "delete my parent"
    (".wh..", (MALFORMED, "")),
    (".wh...", (MALFORMED, "")),
    (".wh", (NOT_A_MARKER, "")),
    ("x.wh.y", (NOT_A_MARKER, "")),
    (".WH.etc", (NOT_A_MARKER, "")),
    ("etc", (NOT_A_MARKER, "")),
])
def test_classify(name, expected):
    assert classify(name) == expected


names = st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                min_size=1, max_size=40)


@given(names)
def test_a_whiteout_name_classifies_back_to_its_target(name):
    kind, target = classify(whiteout.whiteout_name(name))
    if name in (".", ".."):
        assert kind == MALFORMED
    elif whiteout.whiteout_name(name) == whiteout.OPAQUE_NAME:
        assert kind == OPAQUE
    else:
        assert (kind, target) == (WHITEOUT, name)


@given(names)
def test_every_marker_name_is_hidden_and_only_those(name):
    assert whiteout.is_marker_name(name) == (classify(name)[0] != NOT_A_MARKER)
