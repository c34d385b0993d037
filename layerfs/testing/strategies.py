"""Hypothesis strategies for layer stacks, realistic and nasty.

Names come from a small alphabet so that layers collide often: the same path
is a directory in one layer, a file in the next and whited out in the third.
The reference model is consulted while drawing, so that a hardlink only ever
points at a path that exists as a non-directory at that moment: every stack
drawn by :func:`layer_stacks` is valid, and :func:`invalid_layer_stacks`
draws stacks that must be refused.
"""

from __future__ import annotations

from hypothesis import strategies as st

from layerfs.paths import normalize_member_name, parents
from layerfs.testing import layers as L
from layerfs.testing.model import ModelError, apply_stack

#: The default name alphabet: plain, awkward (spaces, leading ``-`` and
#: ``.``, unicode, a non-UTF-8 byte kept by surrogateescape) and long.
NAMES = ("a", "b", "c", "d", " sp ace", "-dash", ".hidden", "...", "é", "日本",
         "caf\udce9", "L" * 200)
#: Names every tar format can hold (ustar: short ASCII names only).
SHORT_NAMES = ("a", "b", "c", "d", "e f", "-x", ".h")

SYMLINK_TARGETS = ("/", "/etc", "a", "../a", "../../../etc/passwd", "./b/c", "a/b", "nowhere")
XATTR_NAMES = ("user.a", "user.mime_type", "user.with.dots")
MODES = (0o644, 0o755, 0o600, 0o700, 0o777, 0o4755, 0o1777, 0o000)

_KIND_WEIGHTS = ((L.FILE, 30), (L.DIR, 20), (L.SYMLINK, 10), (L.HARDLINK, 14),
                 (L.FIFO, 4), (L.CHARDEV, 3), (L.BLOCKDEV, 2))


def paths(names=NAMES, max_depth: int = 3):
    """Relative paths such as ``"a/b"``, drawn from *names*."""
    return st.lists(st.sampled_from(names), min_size=1, max_size=max_depth).map("/".join)


@st.composite
def spellings(draw, path: str, trailing_slash: bool = False):
    """*path* as a tar might spell it: ``./a``, ``/a``, ``a//b``, ``x/../a``..."""
    head = draw(st.sampled_from(("", "", "", "./", "/", "x/../")))
    body = path
    if "/" in body and draw(st.booleans()):
        body = body.replace("/", draw(st.sampled_from(("//", "/./"))), 1)
    tail = "/" if trailing_slash and draw(st.booleans()) else ""
    return head + body + tail


def _metadata(xattrs: bool):
    return st.fixed_dictionaries({
        "mode": st.sampled_from(MODES) | st.integers(0, 0o7777),
        "uid": st.sampled_from((0, 1000)) | st.integers(0, 2**21 - 1),
        "gid": st.sampled_from((0, 1000)) | st.integers(0, 2**21 - 1),
        "mtime": st.sampled_from((0, 1_700_000_000)) | st.integers(0, 2**33 - 1),
        "xattrs": st.dictionaries(
            st.sampled_from(XATTR_NAMES),
            st.text("abc= \n\u00e9", min_size=1, max_size=8).map(str.encode),
            max_size=2) if xattrs else st.just({}),
    })


def _contents():
    return st.binary(max_size=64) | st.sampled_from((b"", b"x" * 70_000))


def _kinds(hardlinks: bool, special_files: bool):
    kinds = [(k, w) for k, w in _KIND_WEIGHTS
             if (hardlinks or k != L.HARDLINK)
             and (special_files or k not in (L.FIFO, L.CHARDEV, L.BLOCKDEV))]
    return st.sampled_from([k for k, w in kinds for _ in range(w)])


@st.composite
def _marker(draw, view: dict, names):
    """A whiteout or opaque marker, aimed at what the lower layers left
    most of the time and at missing names otherwise."""
    existing = sorted(p[1:] for p in view if p != "/")
    dirs = sorted(p[1:] for p, n in view.items() if n.kind == L.DIR and p != "/")
    if draw(st.integers(0, 3)) == 0:
        target = draw(st.sampled_from(dirs) if dirs else paths(names))
        return L.opaque(target)
    target = draw(st.sampled_from(existing) if existing and draw(st.booleans())
                  else paths(names))
    return L.whiteout(target)


def _link_targets(view: dict, path: str) -> list:
    """Paths a hardlink at *path* may point at without ambiguity: existing
    non-directories that are neither *path*, its ancestors nor beneath it."""
    def ok(p):
        return not (p == path or p in parents(path) or p.startswith(path + "/"))
    return sorted(p for p, n in view.items() if n.kind != L.DIR and ok(p))


@st.composite
def _entry(draw, lower: list, earlier: list, later_markers: list, names, options):
    view = apply_stack(lower + [L.Layer(earlier + later_markers)])
    existing = sorted(p[1:] for p in view if p != "/")
    rel = draw(paths(names) if not existing or draw(st.booleans())
               else st.sampled_from(existing))
    kind = draw(_kinds(options["hardlinks"], options["special_files"]))
    meta = draw(_metadata(options["xattrs"]))
    if kind == L.HARDLINK:
        targets = _link_targets(view, normalize_member_name(rel))
        if not targets:
            kind = L.FILE
        else:
            meta["target"] = draw(spellings(draw(st.sampled_from(targets))[1:]))
    if kind == L.FILE:
        meta["content"] = draw(_contents())
    elif kind == L.SYMLINK:
        meta["target"] = draw(st.sampled_from(SYMLINK_TARGETS) | paths(names))
        meta["mode"] = draw(st.sampled_from((0o777, 0o777, meta["mode"])))
    elif kind in L.DEVICE_KINDS:
        # 0/0 is kernel overlayfs's whiteout; keep devices unambiguous.
        meta["devmajor"] = draw(st.integers(1, 255))
        meta["devminor"] = draw(st.integers(0, 255))
    name = draw(spellings(rel, trailing_slash=kind == L.DIR))
    return L.Member(name, kind, **meta)


@st.composite
def layers(draw, lower=(), *, max_members: int = 8, names=NAMES, xattrs: bool = True,
           hardlinks: bool = True, special_files: bool = True, root_entry: bool = True):
    """One valid layer to put on top of the stack *lower* (base first)."""
    lower = list(lower)
    options = {"xattrs": xattrs, "hardlinks": hardlinks, "special_files": special_files}
    view = apply_stack(lower)
    count = draw(st.integers(0, max_members))
    markers = draw(st.lists(st.tuples(st.integers(0, count), _marker(view, names)),
                            max_size=3))
    members: list = []
    if root_entry and draw(st.integers(0, 9)) == 0:
        meta = draw(_metadata(xattrs))
        members.append(L.Member(draw(st.sampled_from(("./", "/", "."))), L.DIR, **meta))
    for index in range(count + 1):
        members += [m for pos, m in markers if pos == index]
        if index < count:
            later = [m for pos, m in markers if pos > index]
            members.append(draw(_entry(lower, members, later, names, options)))
    layer = L.Layer(members)
    apply_stack(lower + [layer])        # a generator bug shows up here, not later
    return layer


@st.composite
def layer_stacks(draw, min_layers: int = 1, max_layers: int = 4, **layer_options):
    """A valid stack (list of :class:`~layerfs.testing.layers.Layer`, base
    first).  *layer_options* go to :func:`layers`."""
    count = draw(st.integers(min_layers, max_layers))
    stack: list = []
    for _ in range(count):
        stack.append(draw(layers(stack, **layer_options)))
    return stack


BAD_MEMBERS = (
    L.Member(".wh."), L.Member("d/.wh.."), L.Member("d/.wh..."),
    L.Member("../escape"), L.Member("a/../../escape"), L.Member("x" * 256),
    L.Member("./", L.FILE), L.hardlink("g", "missing-target"), L.hardlink("self", "self"),
)


@st.composite
def invalid_layer_stacks(draw, min_layers: int = 1, max_layers: int = 3, **layer_options):
    """A stack that a reader must refuse: a valid stack with one bad member
    (malformed marker, name escaping the root, over-long name, root that is
    not a directory, hardlink to a missing name, to itself or to a
    directory) slipped into one of its layers."""
    stack = draw(layer_stacks(min_layers, max_layers, **layer_options))
    which = draw(st.integers(0, len(stack) - 1))
    view = apply_stack(stack[:which])
    dirs = sorted(p for p, n in view.items() if n.kind == L.DIR and p != "/")
    bad = [*BAD_MEMBERS] + [L.hardlink("to-a-dir", d[1:]) for d in dirs]
    member = draw(st.sampled_from(bad))
    members = list(stack[which].members)
    # Insert before the first entry that would make the bad hardlink valid.
    members.insert(draw(st.integers(0, len(members))) if member.kind != L.HARDLINK else 0,
                   member)
    stack[which] = L.Layer(members)
    try:
        apply_stack(stack)
    except ModelError:
        return stack
    raise AssertionError(f"invalid_layer_stacks drew a valid stack: {stack!r}")


__all__ = ["NAMES", "SHORT_NAMES", "paths", "spellings", "layers", "layer_stacks",
           "invalid_layer_stacks", "BAD_MEMBERS"]
