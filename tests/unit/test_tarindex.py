import io
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from layerfs.compression import BlobStream
from layerfs.entry import (BLOCKDEV, CHARDEV, DIRECTORY, FIFO, HARDLINK,
                           REGULAR, SYMLINK)
from layerfs.errors import InvalidLayerError
from layerfs.tarindex import iter_entries

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT,
           "pax": tarfile.PAX_FORMAT}


# ---- helpers

def index_bytes(tmp_path, data, name="layer.tar"):
    path = tmp_path / name
    path.write_bytes(data)
    return index_file(path)


def index_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = BlobStream(fd, size=os.fstat(fd).st_size, label="L1")
        entries = list(iter_entries(stream, "L1"))
        stream.drain()
        return entries
    finally:
        os.close(fd)


def read_content(tar_bytes, entry):
    """A regular file's content from the tar, through its data reference."""
    if isinstance(entry.data, int):
        return tar_bytes[entry.data:entry.data + entry.size]
    out = bytearray(entry.size)
    for offset, length, tar_offset in entry.data:
        out[offset:offset + length] = tar_bytes[tar_offset:tar_offset + length]
    return bytes(out)


def build_tar(fmt, members):
    """members: (TarInfo, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name, kind=tarfile.REGTYPE, **attrs):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def header(name=b"f", flag=b"0", *, size=b"00000000000\0", mode=b"0000644\0",
           uid=b"0000000\0", gid=b"0000000\0", mtime=b"14000000000\0",
           linkname=b"", magic=b"ustar\x0000", prefix=b"", devmajor=b"0000000\0",
           devminor=b"0000000\0", checksum="unsigned", extra=b""):
    """A header block with the given raw fields and a checksum."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = mode
    block[108:116] = uid
    block[116:124] = gid
    block[124:136] = size
    block[136:148] = mtime
    block[156:157] = flag
    block[157:157 + len(linkname)] = linkname
    block[257:265] = magic
    block[329:337] = devmajor
    block[337:345] = devminor
    block[345:345 + len(prefix)] = prefix
    block[500 - len(extra):500] = extra
    block[148:156] = b" " * 8
    if checksum == "signed":
        total = sum(b - 256 if b > 127 else b for b in block)
    else:
        total = sum(block)
    if checksum == "bad":
        total += 1
    block[148:156] = b"%06o\0 " % total
    return bytes(block)


def octal(value, width=12):
    return b"%0*o\0" % (width - 1, value)


def pad(data):
    return data + bytes(-len(data) % 512)


def pax_record(key, value):
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax_member(records, flag=b"x"):
    data = b"".join(pax_record(k, v) for k, v in records)
    return header(b"././@PaxHeader", flag, size=octal(len(data))) + pad(data)


END = bytes(1024)


# ---- formats

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_kind_in_every_format(tmp_path, fmt):
    members = [
        (info("dir", tarfile.DIRTYPE, mode=0o40755), None),
        (info("dir/file", mode=0o104755, uid=1000, gid=2000), b"hello world"),
        (info("dir/empty"), b""),
        (info("dir/link", tarfile.SYMTYPE, linkname="../x/y"), None),
        (info("dir/hard", tarfile.LNKTYPE, linkname="./dir/file"), None),
        (info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
        (info("run/fifo", tarfile.FIFOTYPE), None),
        (info("contig", tarfile.CONTTYPE), b"contiguous"),
    ]
    data = build_tar(FORMATS[fmt], members)
    entries = index_bytes(tmp_path, data)
    by_path = {e.path: e for e in entries}
    assert [e.path for e in entries] == ["/dir", "/dir/file", "/dir/empty", "/dir/link",
                                         "/dir/hard", "/dev/null", "/dev/sda",
                                         "/run/fifo", "/contig"]
    assert by_path["/dir"].kind == DIRECTORY and by_path["/dir"].mode == 0o755
    f = by_path["/dir/file"]
    assert (f.kind, f.mode, f.uid, f.gid, f.size) == (REGULAR, 0o4755, 1000, 2000, 11)
    assert f.mtime_ns == 1_700_000_000 * 10**9
    assert read_content(data, f) == b"hello world"
    assert by_path["/dir/empty"].size == 0 and by_path["/dir/empty"].kind == REGULAR
    assert by_path["/dir/link"].kind == SYMLINK
    assert by_path["/dir/link"].linkname == "../x/y"
    assert by_path["/dir/hard"].kind == HARDLINK
    assert by_path["/dir/hard"].linkname == "/dir/file"
    assert by_path["/dev/null"].kind == CHARDEV
    assert by_path["/dev/null"].rdev == os.makedev(1, 3)
    assert by_path["/dev/sda"].kind == BLOCKDEV
    assert by_path["/dev/sda"].rdev == os.makedev(8, 0)
    assert by_path["/run/fifo"].kind == FIFO
    assert read_content(data, by_path["/contig"]) == b"contiguous"
    assert all(e.data is None for e in entries if e.kind != REGULAR)


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_long_names_and_long_link_names(tmp_path, fmt):
    long_dir = "/".join(["d" * 50] * 6)
    long_target = "t" * 300
    members = [
        (info(long_dir + "/file"), b"abc"),
        (info(long_dir + "/sym", tarfile.SYMTYPE, linkname=long_target), None),
        (info(long_dir + "/hard", tarfile.LNKTYPE, linkname=long_dir + "/file"), None),
    ]
    data = build_tar(FORMATS[fmt], members)
    entries = index_bytes(tmp_path, data)
    assert entries[0].path == "/" + long_dir + "/file"
    assert read_content(data, entries[0]) == b"abc"
    assert entries[1].linkname == long_target
    assert entries[2].linkname == "/" + long_dir + "/file"


def test_ustar_prefix_field(tmp_path):
    name = "p" * 120 + "/file"
    data = build_tar(tarfile.USTAR_FORMAT, [(info(name), b"x")])
    assert index_bytes(tmp_path, data)[0].path == "/" + name


def test_pax_xattrs_mtime_fraction_and_large_ids(tmp_path):
    ti = info("f", uid=5_000_000_000, gid=4_000_000_000)
    ti.pax_headers = {"SCHILY.xattr.user.comment": "h\u00e9llo",
                      "SCHILY.xattr.security.capability": "\x01\x02",
                      "LIBARCHIVE.xattr.user.%61b%20c": "dmFsdWU",
                      "mtime": "1700000000.123456789"}
    data = build_tar(tarfile.PAX_FORMAT, [(ti, b"data")])
    [entry] = index_bytes(tmp_path, data)
    assert entry.uid == 5_000_000_000 and entry.gid == 4_000_000_000
    assert entry.mtime_ns == 1_700_000_000_123_456_789
    assert entry.xattrs == {"user.comment": "h\u00e9llo".encode(),
                            "security.capability": b"\x01\x02",
                            "user.ab c": b"value"}
    assert read_content(data, entry) == b"data"


def test_pax_negative_and_short_fraction_mtime(tmp_path):
    data = (pax_member([(b"mtime", b"-1.5")]) + header(b"a") +
            pax_member([(b"mtime", b"12.3")]) + header(b"b") + END)
    a, b = index_bytes(tmp_path, data)
    assert a.mtime_ns == -1_500_000_000
    assert b.mtime_ns == 12_300_000_000


def test_gnu_base256_uid_and_size(tmp_path):
    data = build_tar(tarfile.GNU_FORMAT, [(info("f", uid=2**40, gid=2**33), b"x")])
    [entry] = index_bytes(tmp_path, data)
    assert (entry.uid, entry.gid) == (2**40, 2**33)
    size = b"\x80" + (7).to_bytes(11, "big")
    data = header(b"g", size=size) + pad(b"1234567") + END
    [entry] = index_bytes(tmp_path, data)
    assert entry.size == 7 and read_content(data, entry) == b"1234567"


def test_global_pax_header_applies_to_following_members(tmp_path):
    data = (pax_member([(b"uid", b"77"), (b"mtime", b"5")], flag=b"g")
            + header(b"a") + pax_member([(b"uid", b"")]) + header(b"b", uid=b"0000003\0")
            + header(b"c") + END)
    a, b, c = index_bytes(tmp_path, data)
    assert (a.uid, a.mtime_ns) == (77, 5 * 10**9)
    assert (b.uid, b.mtime_ns) == (3, 5 * 10**9)   # empty value: back to the header
    assert c.uid == 77


def test_pax_path_and_hdrcharset_binary(tmp_path):
    data = (pax_member([(b"hdrcharset", b"BINARY"), (b"path", b"caf\xe9/x")])
            + header(b"ignored") + END)
    [entry] = index_bytes(tmp_path, data)
    assert entry.path == "/caf\udce9/x"


def test_non_utf8_names_are_kept(tmp_path):
    data = header(b"\xff\xfe/n\xe9") + END
    [entry] = index_bytes(tmp_path, data)
    assert entry.path == "/\udcff\udcfe/n\udce9"
    assert os.fsencode(entry.path) == b"/\xff\xfe/n\xe9"


def test_names_are_normalised(tmp_path):
    data = (header(b"./a/./b/") + header(b"/etc/passwd") + header(b"x/../y")
            + header(b"./", b"5") + END)
    assert [e.path for e in index_bytes(tmp_path, data)] == ["/a/b", "/etc/passwd",
                                                             "/y", "/"]


def test_signed_checksum_accepted(tmp_path):
    data = header(b"caf\xe9", checksum="signed") + END
    assert index_bytes(tmp_path, data)[0].path == "/caf\udce9"


def test_old_v7_directory_with_trailing_slash(tmp_path):
    data = header(b"olddir/", b"\0", magic=bytes(8)) + END
    [entry] = index_bytes(tmp_path, data)
    assert (entry.path, entry.kind) == ("/olddir", DIRECTORY)


def test_unknown_typeflag_is_a_regular_file(tmp_path):
    data = header(b"odd", b"Z", size=octal(3)) + pad(b"abc") + header(b"next") + END
    odd, nxt = index_bytes(tmp_path, data)
    assert odd.kind == REGULAR and read_content(data, odd) == b"abc"
    assert nxt.path == "/next"


def test_volume_label_skipped_and_dumpdir_is_directory(tmp_path):
    data = (header(b"MYVOLUME", b"V") + header(b"dd/", b"D", size=octal(4))
            + pad(b"Yx\0\0") + header(b"f") + END)
    dd, f = index_bytes(tmp_path, data)
    assert (dd.path, dd.kind) == ("/dd", DIRECTORY)
    assert f.path == "/f"


def test_clean_eof_without_end_marker(tmp_path):
    data = header(b"a", size=octal(3)) + pad(b"abc")
    assert [e.path for e in index_bytes(tmp_path, data)] == ["/a"]


def test_data_after_end_marker_is_ignored(tmp_path):
    data = header(b"a") + END + header(b"b") + bytes(512)
    assert [e.path for e in index_bytes(tmp_path, data)] == ["/a"]


# ---- refusals

def expect_invalid(tmp_path, data, match, entry=None):
    with pytest.raises(InvalidLayerError, match=match) as info_:
        index_bytes(tmp_path, data)
    assert "L1" in str(info_.value)
    if entry is not None:
        assert info_.value.entry == entry
    return info_.value


def test_bad_checksum(tmp_path):
    expect_invalid(tmp_path, header(b"f", checksum="bad") + END, "checksum", "f")


def test_corrupted_byte_breaks_checksum(tmp_path):
    data = bytearray(build_tar(tarfile.PAX_FORMAT, [(info("somefile"), b"x")]))
    data[3] ^= 0x20
    expect_invalid(tmp_path, bytes(data), "checksum")


def test_negative_size(tmp_path):
    size = b"\xff" * 11 + b"\xfe"
    expect_invalid(tmp_path, header(b"neg", size=size) + END, "negative size", "neg")


@pytest.mark.parametrize("field", ["size", "uid", "gid", "mode"])
def test_non_numeric_fields(tmp_path, field):
    bad = {"size": b"0000000001x\0", "uid": b"00-0001\0", "gid": b"0+00001\0",
           "mode": b"0000999\0"}[field]
    expect_invalid(tmp_path, header(b"f", **{field: bad}) + END, "not a number")


def test_negative_pax_size(tmp_path):
    data = pax_member([(b"size", b"-5")]) + header(b"f") + END
    expect_invalid(tmp_path, data, "size")


@pytest.mark.parametrize("name", [b"../etc/passwd", b"a/../../b", b"./.."])
def test_names_escaping_the_root(tmp_path, name):
    error = expect_invalid(tmp_path, header(name) + END, "climbs")
    assert error.entry == name.decode()


def test_hardlink_target_escaping_the_root(tmp_path):
    data = header(b"h", b"1", linkname=b"../../x") + END
    expect_invalid(tmp_path, data, "climbs", "h")


def test_nul_in_pax_path(tmp_path):
    data = pax_member([(b"path", b"a\0b")]) + header(b"x") + END
    expect_invalid(tmp_path, data, "NUL")


def test_path_longer_than_path_max(tmp_path):
    name = "/".join(["n" * 200] * 21)           # 4220 bytes
    data = build_tar(tarfile.PAX_FORMAT, [(info(name), b"")])
    expect_invalid(tmp_path, data, "longer")


def test_component_longer_than_name_max(tmp_path):
    data = build_tar(tarfile.GNU_FORMAT, [(info("x" * 256), b"")])
    expect_invalid(tmp_path, data, "longer")


@pytest.mark.parametrize("cut", [100, 512 + 5, 1024 + 1, 1536 - 3])
def test_truncated(tmp_path, cut):
    data = header(b"a", size=octal(1000)) + pad(b"z" * 1000) + END
    expect_invalid(tmp_path, data[:cut], "truncated")


def test_truncated_after_extended_header(tmp_path):
    expect_invalid(tmp_path, pax_member([(b"path", b"x")]), "not followed")


def test_multivolume_refused(tmp_path):
    expect_invalid(tmp_path, header(b"part", b"M") + END, "multi-volume", "part")


def test_malformed_pax_record(tmp_path):
    data = header(b"h", b"x", size=octal(10)) + pad(b"99 a=b\nxyz") + header(b"f") + END
    expect_invalid(tmp_path, data, "malformed pax")


def test_huge_extended_header_refused(tmp_path):
    data = header(b"h", b"L", size=octal(1 << 40)) + END
    expect_invalid(tmp_path, data, "extended header")


# ---- sparse files

def _gnu_tar_sparse(tmp_path, args):
    if shutil.which("tar") is None and os.environ.get("CI") != "true":
        pytest.skip("GNU tar is not installed")      # under CI a missing tool fails
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(5 << 20)
        for offset, chunk in ((0, b"head"), (2 << 20, b"M" * 10000), ((5 << 20) - 3, b"end")):
            f.seek(offset)
            f.write(chunk)
    (src / "after").write_bytes(b"after")
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", *args, "-cf", str(out), "-C", str(src),
                    "sparse.bin", "after"], check=True)
    return out, sparse.read_bytes(), os.stat(sparse).st_blocks * 512 < (5 << 20)


@pytest.mark.parametrize("args", [
    ["--format=oldgnu"], ["--format=gnu"],
    ["--format=pax", "--sparse-version=0.0"],
    ["--format=pax", "--sparse-version=0.1"],
    ["--format=pax", "--sparse-version=1.0"],
], ids=["oldgnu", "gnu", "pax-0.0", "pax-0.1", "pax-1.0"])
def test_gnu_sparse_files(tmp_path, args):
    out, content, has_holes = _gnu_tar_sparse(tmp_path, args)
    entries = index_file(out)
    assert [e.path for e in entries] == ["/sparse.bin", "/after"]
    entry = entries[0]
    assert entry.kind == REGULAR and entry.size == len(content) == 5 << 20
    tar_bytes = out.read_bytes()
    assert read_content(tar_bytes, entry) == content
    assert read_content(tar_bytes, entries[1]) == b"after"
    if has_holes:
        assert isinstance(entry.data, tuple)
        assert sum(length for _, length, _ in entry.data) < len(content)


def test_gnu_old_sparse_with_extension_blocks(tmp_path):
    segments = [(i * 1024, 10) for i in range(30)]
    sparse = bytearray(24 * 4)
    for i, (offset, length) in enumerate(segments[:4]):
        sparse[24 * i:24 * i + 24] = octal(offset) + octal(length)
    real_size = 40 * 1024
    extra = bytes(sparse) + b"\x01" + octal(real_size) + bytes(5)
    blob = header(b"sp", b"S", size=octal(300), magic=b"ustar  \0",
                  extra=b"")
    block = bytearray(blob)
    block[386:386 + len(extra)] = extra
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    ext1 = bytearray(512)
    for i, (offset, length) in enumerate(segments[4:25]):
        ext1[24 * i:24 * i + 24] = octal(offset) + octal(length)
    ext1[504] = 1
    ext2 = bytearray(512)
    for i, (offset, length) in enumerate(segments[25:]):
        ext2[24 * i:24 * i + 24] = octal(offset) + octal(length)
    stored = bytes(range(30)) * 10
    data = bytes(block) + bytes(ext1) + bytes(ext2) + pad(stored) + END
    [entry] = index_bytes(tmp_path, data)
    assert entry.size == real_size
    content = read_content(data, entry)
    for i, (offset, length) in enumerate(segments):
        assert content[offset:offset + length] == stored[10 * i:10 * i + 10]
    assert content.count(0) == real_size - 300 + stored.count(0)


def test_sparse_map_beyond_real_size_refused(tmp_path):
    data = (pax_member([(b"GNU.sparse.size", b"10"), (b"GNU.sparse.map", b"5,20")])
            + header(b"s", size=octal(20)) + pad(b"x" * 20) + END)
    expect_invalid(tmp_path, data, "sparse map")


def test_mode_keeps_permission_bits_only(tmp_path):
    data = header(b"f", mode=b"0100644\0") + header(b"d", b"5", mode=b"0041777\0") + END
    f, d = index_bytes(tmp_path, data)
    assert f.mode == 0o644 and d.mode == 0o1777
    assert stat.S_IFMT(f.kind) == stat.S_IFREG
