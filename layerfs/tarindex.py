"""The tar reader: one pass over an uncompressed tar stream, one
:class:`~layerfs.entry.Entry` per member, in tar order.

Everything about the tar format lives here.  We parse headers ourselves
rather than with :mod:`tarfile`, which accepts negative sizes, NUL bytes in
names and bad checksums without a word.  The stream (a
:class:`~layerfs.compression.BlobStream`) needs ``read(n)``, ``skip(n)`` and
``tell()``; file contents are skipped, never read, and an entry records where
they are (``data``: an offset into the uncompressed stream, or a sparse map).

Formats: v7, ustar, GNU (``L``/``K`` long names, ``S`` old sparse files with
extension blocks, ``D`` dump directories read as directories, ``V`` volume
labels skipped), pax (``x`` and global ``g`` headers; ``path``, ``linkpath``,
``size``, ``uid``, ``gid``, ``mtime`` with its fraction kept to the
nanosecond, ``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*`` whose name is
%-encoded and value base64-encoded, GNU sparse 0.0, 0.1 and 1.0), base-256
numbers.  ``hdrcharset=BINARY`` needs no handling: every name is decoded as
UTF-8 with ``surrogateescape`` whatever the header claims.

Rules, each refusal an :class:`~layerfs.errors.InvalidLayerError` naming the
layer and the entry:

* the header checksum must match (the unsigned sum, or the signed sum some old
  tars wrote);
* numbers must be numbers; size, uid, gid and mode may not be negative;
* names must stay inside the image root (see :func:`paths.normalize_member_name`);
  hardlink targets are normalised the same way, symlink targets kept as stored;
* a stream that stops inside a header or inside a member's data is truncated;
* the archive ends at a zero block.  A stream that simply stops on a block
  boundary, without the two zero blocks, is accepted: the members before
  it are whole and several writers forget the end marker;
* POSIX says an unknown typeflag is read as a regular file, and so do we;
  ``M`` (a member continued from another volume) cannot be read alone and is
  refused;
* mode keeps the permission bits (0o7777); the kind comes from the typeflag.
"""

from __future__ import annotations

import base64
import binascii
import os
import zlib
from typing import Iterator, Optional
from urllib.parse import unquote_to_bytes

from layerfs.entry import (BLOCKDEV, CHARDEV, DIRECTORY, FIFO, HARDLINK,
                           REGULAR, SYMLINK, Entry)
from layerfs.errors import InvalidLayerError
from layerfs.paths import (NAME_MAX, BadMemberName, decode_name,
                           normalize_member_name)

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_META_SIZE = 16 << 20   # bytes of pax / long-name data held in memory

_KINDS = {
    ord("0"): REGULAR, 0: REGULAR, ord("7"): REGULAR,
    ord("1"): HARDLINK, ord("2"): SYMLINK, ord("3"): CHARDEV,
    ord("4"): BLOCKDEV, ord("5"): DIRECTORY, ord("6"): FIFO,
    ord("D"): DIRECTORY,   # GNU dump directory: its data is a listing, skipped
    ord("S"): REGULAR,     # GNU old sparse file
}
_PAX_LOCAL = (ord("x"), ord("X"))   # X: the old Solaris spelling of x
_PAX_GLOBAL = ord("g")
_LONG_NAME = ord("L")
_LONG_LINK = ord("K")
_VOLUME = ord("V")
_MULTIVOLUME = ord("M")
_GNU_SPARSE = ord("S")
_AREGTYPE = 0

_OCTAL_DIGITS = b"01234567"
# Modes, owners, times and small sizes repeat from member to member: parsed
# octal fields are remembered (valid, non-negative ones only), which halves
# the time spent per header.
_octal_cache: dict = {}
_OCTAL_CACHE_SIZE = 1 << 16
_HIGH_BYTES = bytes(range(128, 256))
_POSIX_MAGIC = b"ustar\x00"
_SLOW_STARTS = (b"", b".", b"/")
_SCHILY_XATTR = "SCHILY.xattr."
_LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."


class _Pending:
    """What extended headers say about the next member."""
    __slots__ = ("pax", "sparse_pairs", "long_name", "long_link")

    def __init__(self):
        self.pax: Optional[dict] = None
        self.sparse_pairs: list = []
        self.long_name: Optional[bytes] = None
        self.long_link: Optional[bytes] = None

    def is_empty(self) -> bool:
        return (self.pax is None and self.long_name is None
                and self.long_link is None)


def iter_entries(stream, label: str) -> Iterator[Entry]:
    """The members of the tar *stream*, in order; *label* names the layer
    in error messages."""
    read = stream.read
    global_pax: dict = {}
    pending = _Pending()
    while True:
        block = read(BLOCK)
        if len(block) < BLOCK or block == ZERO_BLOCK:
            if block and block != ZERO_BLOCK:
                raise _error(label, _raw_name(block), "truncated: the stream "
                             "ends inside a header")
            if not pending.is_empty():
                raise _error(label, None, "an extended header is not "
                             "followed by a member")
            return
        _verify_checksum(block, label)
        flag = block[156]
        size = _number(block, 124, 136, label, "size")
        if flag in _PAX_LOCAL or flag == _PAX_GLOBAL:
            records = _parse_pax(_read_meta(stream, size, block, label), block, label)
            if flag == _PAX_GLOBAL:
                _merge_pax(global_pax, records, None)
            else:
                if pending.pax is None:
                    pending.pax = dict(global_pax)
                _merge_pax(pending.pax, records, pending.sparse_pairs)
            continue
        if flag == _LONG_NAME:
            pending.long_name = _cut(_read_meta(stream, size, block, label))
            continue
        if flag == _LONG_LINK:
            pending.long_link = _cut(_read_meta(stream, size, block, label))
            continue
        if flag == _MULTIVOLUME:
            raise _error(label, _raw_name(block), "multi-volume archives "
                         "are not supported")
        if flag == _VOLUME:
            _skip_data(stream, size, block, label)
            pending = _Pending()
            continue
        pax = pending.pax if pending.pax is not None else (global_pax or None)
        yield _make_entry(stream, block, flag, size, pax, pending, label)
        pending = _Pending()


def _make_entry(stream, block: bytes, flag: int, size: int,
                pax: Optional[dict], pending: _Pending, label: str) -> Entry:
    """One member, from its header and the extended headers before it;
    leaves the stream at the next header."""
    raw_name = pending.long_name
    if raw_name is None:
        raw_name = _header_name(block)
    raw_link = pending.long_link
    if raw_link is None:
        raw_link = _cut(block[157:257])
    mode = _number(block, 100, 108, label, "mode", raw_name)
    uid = _number(block, 108, 116, label, "uid", raw_name)
    gid = _number(block, 116, 124, label, "gid", raw_name)
    mtime_ns = _number(block, 136, 148, label, "mtime", raw_name,
                       signed=True) * 1_000_000_000
    kind = _KINDS.get(flag, REGULAR)   # POSIX: unknown typeflags are regular files
    xattrs = None
    if pax is not None:
        raw_name = pax.get("GNU.sparse.name", pax.get("path", raw_name))
        raw_link = pax.get("linkpath", raw_link)
        size = _pax_decimal(pax, "size", size, label, raw_name)
        uid = _pax_decimal(pax, "uid", uid, label, raw_name)
        gid = _pax_decimal(pax, "gid", gid, label, raw_name)
        if "mtime" in pax:
            mtime_ns = _pax_time_ns(pax["mtime"], label, raw_name)
        xattrs = _pax_xattrs(pax, label, raw_name)
    if flag == _AREGTYPE and raw_name.endswith(b"/"):
        kind = DIRECTORY   # pre-POSIX tars mark directories with a slash
    path = _member_path(raw_name, label)
    rdev = 0
    linkname = ""
    data = None
    if kind == REGULAR:
        if flag == _GNU_SPARSE or (pax is not None and _is_pax_sparse(pax)):
            size, data = _read_sparse(stream, block, flag, size, pax,
                                      pending.sparse_pairs, label, raw_name)
        else:
            data = stream.tell()
            _skip_data(stream, size, block, label, raw_name)
    else:
        if kind == HARDLINK:
            linkname = _member_path(raw_link, label, raw_name)
        elif kind == SYMLINK:
            linkname = decode_name(raw_link)
            if "\x00" in linkname:
                raise _error(label, raw_name, "symlink target contains a NUL byte")
        elif kind == CHARDEV or kind == BLOCKDEV:
            rdev = _device(block, label, raw_name)
        if kind != DIRECTORY or flag != ord("5"):
            # GNU tar skips the data of every member but a directory
            _skip_data(stream, size, block, label, raw_name)
        size = 0
    return Entry(path, kind, mode & 0o7777, uid, gid, mtime_ns, size,
                 linkname, rdev, xattrs, data)


# ---- header fields

def _verify_checksum(block: bytes, label: str) -> None:
    field = block[148:156]
    stored = _parse_octal(field)
    # The sum with the checksum field read as eight spaces (8 * 32 = 256).
    # adler32's low half is 1 + the byte sum, exact below 65521: so two
    # 256-byte halves give the exact sum of a block, computed in C.
    total = ((zlib.adler32(block[:256]) & 0xFFFF)
             + (zlib.adler32(block[256:]) & 0xFFFF) - 2)
    unsigned = total - sum(field) + 256
    if stored == unsigned:
        return
    high = BLOCK - len(block.translate(None, _HIGH_BYTES))
    high -= 8 - len(field.translate(None, _HIGH_BYTES))
    if stored is not None and stored == unsigned - 256 * high:
        return
    raise _error(label, _raw_name(block), "bad header checksum")


def _parse_octal(field: bytes) -> Optional[int]:
    """An octal field (NUL- or space-terminated), or None if it is not one."""
    end = field.find(0)
    if end >= 0:
        field = field[:end]
    field = field.strip(b" ")
    if not field:
        return 0
    if field.translate(None, _OCTAL_DIGITS):
        return None
    return int(field, 8)


def _number(block: bytes, start: int, end: int, label: str, what: str,
            raw_name: Optional[bytes] = None, signed: bool = False) -> int:
    """A numeric header field: octal, or GNU base-256 (first byte 0x80 for
    a positive, 0xff for a negative number)."""
    field = block[start:end]
    value = _octal_cache.get(field)
    if value is not None:
        return value
    first = field[0]
    if first & 0x80:
        if first == 0x80:
            value = int.from_bytes(field[1:], "big")
        elif first == 0xFF:
            value = int.from_bytes(field[1:], "big") - (1 << (8 * (len(field) - 1)))
        else:
            value = None
    else:
        value = _parse_octal(field)
    if value is None:
        raise _error(label, raw_name or _raw_name(block), f"{what} field is not a number")
    if value < 0 and not signed:
        raise _error(label, raw_name or _raw_name(block), f"negative {what}")
    if not first & 0x80 and len(_octal_cache) < _OCTAL_CACHE_SIZE:
        _octal_cache[field] = value
    return value


def _header_name(block: bytes) -> bytes:
    name = _cut(block[:100])
    if block[257:263] == _POSIX_MAGIC:
        prefix = _cut(block[345:500])
        if prefix:
            return prefix + b"/" + name
    return name


def _raw_name(block: bytes) -> bytes:
    return _cut(block[:100])


def _cut(field: bytes) -> bytes:
    end = field.find(0)
    return field if end < 0 else field[:end]


def _device(block: bytes, label: str, raw_name: bytes) -> int:
    major = _number(block, 329, 337, label, "devmajor", raw_name)
    minor = _number(block, 337, 345, label, "devminor", raw_name)
    try:
        return os.makedev(major, minor)
    except (OverflowError, ValueError):
        raise _error(label, raw_name, "device number out of range") from None


def _member_path(raw: bytes, label: str, entry: Optional[bytes] = None) -> str:
    # Fast path, for the usual "usr/bin/ls" or "usr/bin/": no component can
    # be empty, "." or "..", nor too long, and there is no NUL.
    if (len(raw) <= NAME_MAX and raw[:1] not in _SLOW_STARTS and b"//" not in raw
            and b"/." not in raw and b"\x00" not in raw):
        name = decode_name(raw)
        return "/" + (name[:-1] if name[-1] == "/" else name)
    try:
        return normalize_member_name(decode_name(raw))
    except BadMemberName as e:
        raise _error(label, entry if entry is not None else raw,
                     f"bad name {decode_name(raw)!r}: {e}") from None


# ---- member data

def _skip_data(stream, size: int, block: bytes, label: str,
               raw_name: Optional[bytes] = None) -> None:
    padded = size + (-size % BLOCK)
    if padded and stream.skip(padded) != padded:
        raise _error(label, raw_name or _raw_name(block),
                     "truncated: the stream ends inside the member's data")


def _read_meta(stream, size: int, block: bytes, label: str) -> bytes:
    """The data of an extended header (pax, long name), held in memory."""
    if size > MAX_META_SIZE:
        raise _error(label, _raw_name(block), f"extended header of {size} bytes "
                     f"(more than {MAX_META_SIZE})")
    data = stream.read(size)
    if len(data) != size:
        raise _error(label, _raw_name(block),
                     "truncated: the stream ends inside an extended header")
    pad = -size % BLOCK
    if pad and stream.skip(pad) != pad:
        raise _error(label, _raw_name(block),
                     "truncated: the stream ends inside an extended header")
    return data


# ---- pax

def _parse_pax(data: bytes, block: bytes, label: str) -> list:
    """``"<length> <key>=<value>\\n"`` records, as (str key, bytes value)."""
    records = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:        # some writers pad the data with NULs
            if data.count(0, pos) != end - pos:
                break
            return records
        space = data.find(b" ", pos, pos + 24)
        length_field = data[pos:space] if space > 0 else b""
        if not length_field.isdigit():
            break
        stop = pos + int(length_field)
        if stop > end or stop <= space + 1 or data[stop - 1] != 0x0A:
            break
        record = data[space + 1:stop - 1]
        equals = record.find(b"=")
        if equals <= 0:
            break
        records.append((record[:equals].decode("utf-8", "surrogateescape"),
                        record[equals + 1:]))
        pos = stop
    else:
        return records
    raise _error(label, _raw_name(block), f"malformed pax record at byte {pos}")


def _merge_pax(target: dict, records: list, sparse_pairs: Optional[list]) -> None:
    """Adds *records* to *target*; an empty value deletes the key (POSIX).
    GNU sparse 0.0 repeats its offset/numbytes keys: they go, in order, to
    *sparse_pairs*."""
    for key, value in records:
        if sparse_pairs is not None and key in ("GNU.sparse.offset",
                                                "GNU.sparse.numbytes"):
            sparse_pairs.append((key, value))
        elif value:
            target[key] = value
        else:
            target.pop(key, None)


def _pax_decimal(pax: dict, key: str, default: int, label: str,
                 raw_name: bytes) -> int:
    value = pax.get(key)
    if value is None:
        return default
    if not value.isdigit():
        raise _error(label, raw_name, f"pax {key} {value!r} is not a "
                     "non-negative number")
    return int(value)


def _pax_time_ns(value: bytes, label: str, raw_name: bytes) -> int:
    """``[-]seconds[.fraction]`` to nanoseconds (the fraction cut at 9 digits)."""
    negative = value.startswith(b"-")
    whole, _, fraction = value[negative:].partition(b".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()):
        raise _error(label, raw_name, f"pax mtime {value!r} is not a time")
    ns = int(whole) * 1_000_000_000 + int((fraction + b"000000000")[:9])
    return -ns if negative else ns


def _pax_xattrs(pax: dict, label: str, raw_name: bytes) -> Optional[dict]:
    xattrs = None
    for key, value in pax.items():
        if key.startswith(_SCHILY_XATTR):
            name = key[len(_SCHILY_XATTR):]
        elif key.startswith(_LIBARCHIVE_XATTR):
            name, value = _libarchive_xattr(key, value, label, raw_name)
        else:
            continue
        if xattrs is None:
            xattrs = {}
        xattrs[name] = value
    return xattrs


def _libarchive_xattr(key: str, value: bytes, label: str, raw_name: bytes):
    """libarchive %-encodes the name and base64-encodes the value."""
    encoded = key[len(_LIBARCHIVE_XATTR):].encode("utf-8", "surrogateescape")
    name = decode_name(unquote_to_bytes(encoded))
    try:
        value = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    except binascii.Error:
        raise _error(label, raw_name, f"xattr {name!r}: bad base64 value") from None
    return name, value


# ---- sparse files

def _is_pax_sparse(pax: dict) -> bool:
    return ("GNU.sparse.major" in pax or "GNU.sparse.map" in pax
            or "GNU.sparse.size" in pax or "GNU.sparse.realsize" in pax)


def _read_sparse(stream, block: bytes, flag: int, size: int,
                 pax: Optional[dict], sparse_pairs: list, label: str,
                 raw_name: bytes) -> tuple:
    """(real size, sparse map) of a GNU sparse member; consumes its data."""
    if flag == _GNU_SPARSE:
        segments, real_size = _old_gnu_map(stream, block, label, raw_name)
        if pax is not None and "GNU.sparse.size" in pax:
            real_size = _pax_decimal(pax, "GNU.sparse.size", 0, label, raw_name)
    elif pax.get("GNU.sparse.major") == b"1":
        real_size = _pax_decimal(pax, "GNU.sparse.realsize", 0, label, raw_name)
        segments, map_bytes = _sparse_1_0_map(stream, size, label, raw_name)
        size -= map_bytes
    elif "GNU.sparse.map" in pax:
        real_size = _pax_decimal(pax, "GNU.sparse.size", 0, label, raw_name)
        numbers = pax["GNU.sparse.map"].split(b",")
        segments = _pairs([_sparse_number(n, label, raw_name) for n in numbers],
                          label, raw_name)
    else:
        real_size = _pax_decimal(pax, "GNU.sparse.size", 0, label, raw_name)
        segments = _sparse_0_0_map(sparse_pairs, label, raw_name)
    start = stream.tell()
    data = _sparse_data(segments, start, real_size, size, label, raw_name)
    _skip_data(stream, size, block, label, raw_name)
    return real_size, data


def _sparse_data(segments: list, start: int, real_size: int, stored: int,
                 label: str, raw_name: bytes):
    """The entry's ``data``: ``((file_offset, length, tar_offset), ...)``
    without empty segments, or a plain offset if nothing is a hole."""
    out = []
    tar_offset = start
    file_end = 0
    for offset, length in segments:
        if offset < file_end or offset + length > real_size:
            raise _error(label, raw_name, "sparse map is out of order or "
                         "beyond the file's size")
        if length:
            out.append((offset, length, tar_offset))
            tar_offset += length
            file_end = offset + length
    if tar_offset - start > stored:
        raise _error(label, raw_name, "sparse map holds more data than the member")
    if len(out) == 1 and out[0][0] == 0 and out[0][1] == real_size:
        return start
    return tuple(out)


def _sparse_number(text: bytes, label: str, raw_name: bytes) -> int:
    if not text.isdigit():
        raise _error(label, raw_name, f"sparse map value {text!r} is not a number")
    return int(text)


def _pairs(numbers: list, label: str, raw_name: bytes) -> list:
    if len(numbers) % 2:
        raise _error(label, raw_name, "sparse map has an odd number of values")
    return list(zip(numbers[::2], numbers[1::2]))


def _sparse_0_0_map(sparse_pairs: list, label: str, raw_name: bytes) -> list:
    expected = "GNU.sparse.offset"
    numbers = []
    for key, value in sparse_pairs:
        if key != expected:
            raise _error(label, raw_name, "GNU.sparse.offset and numbytes "
                         "do not alternate")
        numbers.append(_sparse_number(value, label, raw_name))
        expected = ("GNU.sparse.numbytes" if expected == "GNU.sparse.offset"
                    else "GNU.sparse.offset")
    return _pairs(numbers, label, raw_name)


def _sparse_1_0_map(stream, size: int, label: str, raw_name: bytes) -> tuple:
    """The map at the start of a sparse 1.0 member's data: decimal numbers,
    one a line (count, then offset/length pairs), padded to a block."""
    text = b""
    lines: list = []
    while True:
        if len(text) >= min(size, MAX_META_SIZE):
            raise _error(label, raw_name, "sparse 1.0 map is too long or "
                         "runs past the member's data")
        block = stream.read(BLOCK)
        if len(block) != BLOCK:
            raise _error(label, raw_name, "truncated: the stream ends inside "
                         "a sparse map")
        text += block
        lines = text.split(b"\n")
        if lines[0] and len(lines) > 1:
            count = _sparse_number(lines[0], label, raw_name)
            if len(lines) > 2 * count + 1:
                break
    numbers = [_sparse_number(n, label, raw_name) for n in lines[1:2 * count + 1]]
    return _pairs(numbers, label, raw_name), len(text)


def _old_gnu_map(stream, block: bytes, label: str, raw_name: bytes) -> tuple:
    """The sparse map of a GNU ``S`` header (4 slots, then extension blocks
    of 21 slots each while the "isextended" byte is set)."""
    real_size = _number(block, 483, 495, label, "realsize", raw_name)
    segments = _gnu_slots(block, 386, 4, label, raw_name)
    extended = block[482]
    while extended:
        ext = stream.read(BLOCK)
        if len(ext) != BLOCK:
            raise _error(label, raw_name, "truncated: the stream ends inside "
                         "a sparse header")
        segments += _gnu_slots(ext, 0, 21, label, raw_name)
        extended = ext[504]
    return segments, real_size


def _gnu_slots(block: bytes, start: int, count: int, label: str,
               raw_name: bytes) -> list:
    segments = []
    for i in range(start, start + 24 * count, 24):
        if block[i] == 0:
            break
        offset = _number(block, i, i + 12, label, "sparse offset", raw_name)
        length = _number(block, i + 12, i + 24, label, "sparse length", raw_name)
        segments.append((offset, length))
    return segments


def _error(label: str, raw_name: Optional[bytes], message: str) -> InvalidLayerError:
    entry = None if raw_name is None else decode_name(raw_name)
    return InvalidLayerError(message, layer=label, entry=entry)
