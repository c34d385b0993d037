"""The on-disk upper directory: layout, markers, sidecar, reopen, repair."""

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

import layerfs
from layerfs.errors import InvalidLayerError, UpperError
from layerfs.hostdir import HostDir
from layerfs.sidecar import Sidecar
from layerfs.testing import layers as L
from layerfs.testing.view import diff_views, snapshot
from layerfs.testing.writers import write_image

IMAGE = [L.Layer([L.directory("d"), L.file("d/f", b"lower"), L.file("d/g", b"g"),
                  L.directory("e"), L.file("e/x", b"x"), L.file("top", b"t", uid=5, gid=6),
                  L.device("null", 1, 3)])]


def sidecar_records(upper) -> dict:
    """The records an upper's sidecar holds on disk (snapshot and journal)."""
    host = HostDir(str(upper))
    try:
        return Sidecar(host, writable=False).records
    finally:
        host.close()


@pytest.fixture
def image(tmp_path):
    return write_image(IMAGE, tmp_path / "image", kind="layers", compression="none")


def test_layout_whiteouts_and_opaque_directories(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.unlink("/d/f")
        fs.unlink("/e/x")
        fs.rmdir("/e")
        fs.mkdir("/e")                         # recreated over a deleted lower dir
        fs.write_bytes("/new", b"n")
    marker = json.loads((upper / "layerfs-upper.json").read_text())
    assert marker["format"] == 2 and marker["image"]["chain_id"].startswith("sha256:")
    assert sorted(os.listdir(upper)) == ["attrs.log", "diff", "layerfs-upper.json", "lock",
                                         "work"]
    assert sorted(os.listdir(upper / "diff")) == ["d", "e", "new"]
    assert os.listdir(upper / "diff" / "d") == [".wh.f"]
    assert os.listdir(upper / "diff" / "e") == [".wh..wh..opq"]
    assert os.listdir(upper / "work") == []


def test_metacopy_lives_in_the_sidecar(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.chmod("/d/f", 0o600)
    records = sidecar_records(upper)
    assert records["/d/f"]["metacopy"] is True and records["/d/f"]["mode"] == 0o600
    assert not (upper / "diff" / "d" / "f").exists()
    with layerfs.open(image, upper=upper) as fs:
        assert fs.stat("/d/f").st_mode & 0o7777 == 0o600
        assert fs.read_bytes("/d/f") == b"lower"
        fs.write_bytes("/d/f", b"data now")     # the data copy-up replaces the record
    assert "/d/f" not in sidecar_records(upper)


def test_repair_removes_whiteouts_beside_their_entries(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/d/f", b"upper")
        fs.mkdir("/n")
    # what a crash between two steps can leave
    (upper / "diff" / "d" / ".wh.f").write_bytes(b"")
    (upper / "diff" / ".wh.n").write_bytes(b"")
    (upper / "diff" / "e").mkdir()
    (upper / "diff" / ".wh.e").write_bytes(b"")
    (upper / "work" / "tmp1-0").write_bytes(b"half a copy-up")
    with layerfs.open(image, upper=upper) as fs:
        assert fs.read_bytes("/d/f") == b"upper"
        assert fs.listdir("/n") == [] and fs.listdir("/e") == []   # .wh.e hid lower e
    assert sorted(os.listdir(upper / "diff")) == ["d", "e", "n"]
    assert os.listdir(upper / "diff" / "e") == [".wh..wh..opq"]
    assert os.listdir(upper / "work") == []


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"/d/f": {"mode": "x"}}'])
def test_corrupt_sidecar_is_a_clear_error(image, tmp_path, content):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/d/f", b"x")
    (upper / "attrs.json").write_bytes(content)
    with pytest.raises(InvalidLayerError, match="sidecar"):
        layerfs.open(image, upper=upper)


def test_foreign_or_unknown_directories_are_refused(image, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something").write_bytes(b"")
    with pytest.raises(UpperError, match="not empty"):
        layerfs.open(image, upper=foreign)
    future = tmp_path / "future"
    future.mkdir()
    (future / "layerfs-upper.json").write_text('{"format": 99}')
    with pytest.raises(UpperError, match="format"):
        layerfs.open(image, upper=future)


def test_malformed_marker_in_diff_is_a_clear_error(image, tmp_path):
    upper = tmp_path / "upper"
    layerfs.open(image, upper=upper).close()
    (upper / "diff" / ".wh.").write_bytes(b"")
    with pytest.raises(InvalidLayerError, match="malformed"):
        layerfs.open(image, upper=upper)


def test_without_root_owner_and_devices_are_kept_in_the_sidecar(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.upper.is_root = False                 # act as an unprivileged user
        fs.write_bytes("/top", b"changed")
        fs.chmod("/null", 0o644)
        fs.chown("/d/g", 77, 88)
        before = snapshot(fs)
    assert stat.S_ISREG(os.lstat(upper / "diff" / "null").st_mode)
    with layerfs.open(image, upper=upper) as fs:
        assert not diff_views(before, snapshot(fs))
        assert (fs.stat("/top").st_uid, fs.stat("/top").st_gid) == (5, 6)
        assert stat.S_ISCHR(fs.lstat("/null").st_mode)
        assert fs.lstat("/null").st_rdev == os.makedev(1, 3)
        assert fs.stat("/d/g").st_uid == 77


def test_without_root_xattrs_outside_user_are_kept_in_the_sidecar(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.upper.is_root = False                 # act as an unprivileged user
        fs.write_bytes("/top", b"changed")
        fs.setxattr("/top", "trusted.overlay.x", b"t")
        fs.setxattr("/top", "user.kept", b"u")
    assert os.getxattr(upper / "diff" / "top", "user.kept") == b"u"
    assert "trusted.overlay.x" not in os.listxattr(upper / "diff" / "top")
    with layerfs.open(image, upper=upper) as fs:
        assert fs.getxattr("/top", "trusted.overlay.x") == b"t"
        assert fs.getxattr("/top", "user.kept") == b"u"


def test_directory_recreated_over_a_deleted_one_keeps_its_mtime(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.unlink("/e/x")
        fs.rmdir("/e")
        fs.mkdir("/e")                 # gets an opaque marker after its metadata
        mtime = fs.stat("/e").st_mtime_ns
    with layerfs.open(image, upper=upper) as fs:
        assert fs.stat("/e").st_mtime_ns == mtime


# -- the descriptor cache: a read never sees another file's bytes ------------------

def test_a_read_never_uses_a_descriptor_evicted_under_it(image, tmp_path, monkeypatch):
    """A read of X borrows X's cached descriptor; another thread's read of Y
    evicts it meanwhile (cache of one) and opens Y, which gets the lowest
    free number: the one X's descriptor had, if it was closed.  Injected
    deterministically between X's lookup and its pread."""
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/x", b"X" * 100)
        fs.write_bytes("/y", b"Y" * 100)
        store = fs.upper
        store.descriptors.size = 1
        x, y = fs.node("/x"), fs.node("/y")
        real_pread = os.pread
        injected = []

        def pread(fd, length, offset):
            if not injected:
                injected.append(True)
                assert store.read(y, 0, 100) == b"Y" * 100   # evicts x's descriptor
            return real_pread(fd, length, offset)

        monkeypatch.setattr(os, "pread", pread)
        assert store.read(x, 0, 100) == b"X" * 100
        monkeypatch.setattr(os, "pread", real_pread)
        assert injected
        assert store.read(x, 0, 100) == b"X" * 100 and store.read(y, 0, 100) == b"Y" * 100


def test_deleted_files_leave_no_cached_descriptor(image, tmp_path):
    with layerfs.open(image, upper=tmp_path / "upper") as fs:
        fs.write_bytes("/x", b"x")
        assert fs.read_bytes("/x") == b"x"
        ino = fs.node("/x").ino
        assert ino in fs.upper.descriptors._entries
        fs.unlink("/x")
        assert ino not in fs.upper.descriptors._entries


# -- the sidecar journal -------------------------------------------------------------

def test_a_metadata_change_appends_one_journal_line(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.chmod("/d/f", 0o600)
        size = (upper / "attrs.log").stat().st_size
        lines = (upper / "attrs.log").read_bytes().count(b"\n")
        fs.chmod("/d/g", 0o600)
        assert (upper / "attrs.log").read_bytes().count(b"\n") == lines + 1
        assert (upper / "attrs.log").stat().st_size - size < 300
        assert not (upper / "attrs.json").exists()


def test_the_journal_is_compacted_and_a_crash_in_between_loses_nothing(image, tmp_path,
                                                                       monkeypatch):
    from layerfs import sidecar
    monkeypatch.setattr(sidecar, "MIN_COMPACTION", 5)
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        for mode in (0o600, 0o640, 0o644, 0o604, 0o700, 0o711, 0o755):
            fs.chmod("/d/f", mode)
            fs.chmod("/top", mode)
        journal = (upper / "attrs.log").read_bytes()
        assert (upper / "attrs.json").exists() and journal.count(b"\n") <= 5
        before = snapshot(fs)
    # a compaction that crashed before emptying the journal: lines the
    # snapshot already holds are skipped by their sequence numbers
    records = json.loads((upper / "attrs.json").read_bytes())
    (upper / "attrs.log").write_bytes(b"".join(
        json.dumps({"seq": n, "op": "rename", "path": "/d/f", "to": "/d/g"}).encode() + b"\n"
        for n in range(1, records["seq"] + 1)) + journal)
    with layerfs.open(image, upper=upper) as fs:
        assert not diff_views(before, snapshot(fs))


def test_a_torn_last_journal_line_is_ignored_and_cut(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.chmod("/d/f", 0o600)
    with open(upper / "attrs.log", "ab") as stream:
        stream.write(b'{"op": "set", "path": "/d/g", "rec')       # a power loss
    with layerfs.open(image, upper=upper) as fs:
        assert fs.stat("/d/f").st_mode & 0o777 == 0o600
        fs.chmod("/d/g", 0o640)
    with layerfs.open(image, upper=upper) as fs:
        assert fs.stat("/d/g").st_mode & 0o777 == 0o640


def test_a_corrupt_journal_line_before_the_end_is_a_clear_error(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.chmod("/d/f", 0o600)
        fs.chmod("/d/g", 0o600)
    journal = (upper / "attrs.log").read_bytes()
    (upper / "attrs.log").write_bytes(b"garbage\n" + journal)
    with pytest.raises(InvalidLayerError, match="sidecar.*journal line 1"):
        layerfs.open(image, upper=upper)


# -- format 1 uppers are upgraded ---------------------------------------------------

def test_a_format_1_upper_is_read_and_upgraded(image, tmp_path):
    """An upper as format 1 wrote it (marker, diff/, attrs.json of records
    alone, no lock, no journal, no image record), written here by hand."""
    upper = tmp_path / "upper"
    (upper / "diff" / "d").mkdir(parents=True)
    (upper / "work").mkdir()
    (upper / "layerfs-upper.json").write_text('{"format": 1}')
    (upper / "diff" / "d" / ".wh.f").write_bytes(b"")
    (upper / "diff" / "new").write_bytes(b"new data")
    os.utime(upper / "diff" / "d", ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    (upper / "attrs.json").write_text(json.dumps({
        "/top": {"metacopy": True, "mode": 0o600, "uid": 5, "gid": 6, "atime_ns": 7,
                 "mtime_ns": 8, "xattrs": {}},
        "/": {"metacopy": True, "mode": 0o711, "uid": 0, "gid": 0, "atime_ns": 1,
              "mtime_ns": 2, "xattrs": {}}}))
    with layerfs.open(image, upper=upper, readonly=True) as fs:   # read, not upgraded
        assert not fs.exists("/d/f") and fs.read_bytes("/new") == b"new data"
    assert json.loads((upper / "layerfs-upper.json").read_text()) == {"format": 1}
    with layerfs.open(image, upper=upper) as fs:
        assert not fs.exists("/d/f") and fs.read_bytes("/d/g") == b"g"
        assert fs.read_bytes("/new") == b"new data"
        assert fs.stat("/top").st_mode & 0o7777 == 0o600
        assert fs.stat("/top").st_mtime_ns == 8 and fs.stat("/").st_mode & 0o777 == 0o711
        fs.chmod("/top", 0o640)
        before = snapshot(fs)
    marker = json.loads((upper / "layerfs-upper.json").read_text())
    assert marker["format"] == 2 and marker["image"]["chain_id"]
    with layerfs.open(image, upper=upper) as fs:
        assert not diff_views(before, snapshot(fs))


# -- the image an upper belongs to ---------------------------------------------------

def test_an_upper_of_another_image_is_refused(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/new", b"n")
    other = write_image([L.Layer([L.file("other", b"o")])], tmp_path / "other", kind="layers",
                        compression="none")
    for readonly in (False, True):
        with pytest.raises(UpperError, match="belongs to another image") as caught:
            layerfs.open(other, upper=upper, readonly=readonly)
        assert caught.value.errno == errno.EINVAL and str(upper) in str(caught.value)


# -- one writer, any number of readers -------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/new", b"n")
        with pytest.raises(UpperError) as caught:
            layerfs.open(image, upper=upper)
        assert caught.value.errno == errno.EBUSY
        assert f"pid {os.getpid()}" in str(caught.value) and str(upper) in str(caught.value)
        assert "\n" not in str(caught.value)
        with layerfs.open(image, upper=upper, readonly=True) as reader:   # beside it
            assert reader.read_bytes("/new") == b"n"
            assert [c.path for c in reader.diff()] == ["/new"]
            with pytest.raises(OSError) as refused:
                reader.write_bytes("/other", b"o")
            assert refused.value.errno == errno.EROFS
        fs.write_bytes("/after", b"a")
    with layerfs.open(image, upper=upper) as fs:     # released at close
        assert fs.read_bytes("/after") == b"a"


def test_the_lock_of_a_killed_writer_is_taken_over(image, tmp_path):
    upper = tmp_path / "upper"
    code = ("import sys, os, signal, layerfs\n"
            "fs = layerfs.open(sys.argv[1:-1], upper=sys.argv[-1])\n"
            "fs.write_bytes('/new', b'n')\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    writer = subprocess.Popen([sys.executable, "-c", code, *image, str(upper)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"ready\n"
        with pytest.raises(UpperError, match=f"pid {writer.pid}"):
            layerfs.open(image, upper=upper)
    finally:
        writer.kill()
        writer.wait()
    assert json.loads((upper / "lock").read_text())["pid"] == writer.pid   # left behind
    with layerfs.open(image, upper=upper) as fs:
        assert fs.read_bytes("/new") == b"n"
        assert json.loads((upper / "lock").read_text())["pid"] == os.getpid()


def test_reading_an_upper_creates_nothing(image, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(UpperError, match="no such upper") as caught:
        layerfs.open(image, upper=missing, readonly=True)
    assert caught.value.errno == errno.ENOENT and not missing.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_bytes(b"")
    with pytest.raises(UpperError, match="not a layerfs upper"):
        layerfs.open(image, upper=foreign, readonly=True)
    assert os.listdir(foreign) == ["x"]


def test_commit_needs_the_upper_opened_for_writing(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/new", b"n")
    from layerfs.commit import commit
    with layerfs.open(image, upper=upper, readonly=True) as fs:
        with pytest.raises(UpperError, match="opened read-only") as caught:
            commit(fs, tmp_path / "dest")
        assert caught.value.errno == errno.EBUSY


# -- ctime ---------------------------------------------------------------------------------

def test_ctime_changes_with_metadata_and_links_and_survives_a_reopen(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        lower_ctime = fs.stat("/d/g").st_ctime_ns
        fs.chmod("/d/g", 0o600)                       # a metacopy
        assert fs.stat("/d/g").st_ctime_ns > lower_ctime
        fs.write_bytes("/a", b"a")
        for change in (lambda: fs.link("/a", "/b"), lambda: fs.chmod("/a", 0o600),
                       lambda: fs.chown("/a", 7, 8), lambda: fs.truncate("/a", 0),
                       lambda: fs.setxattr("/a", "user.x", b"1"),
                       lambda: fs.rename("/b", "/c"), lambda: fs.unlink("/c")):
            before = fs.stat("/a").st_ctime_ns
            change()
            assert fs.stat("/a").st_ctime_ns > before
        fs.write_bytes("/x", b"x")
        fs.link("/x", "/y")
        fs.write_bytes("/z", b"z")
        before = fs.stat("/x").st_ctime_ns
        fs.rename("/z", "/y")                     # over a name of a file with another
        assert fs.stat("/x").st_ctime_ns > before and fs.stat("/x").st_nlink == 1
        fs.chmod("/", 0o700)
        fs.mkdir("/d/sub")
        times = {path: (st.st_ctime_ns, st.st_mtime_ns)
                 for path in ("/", "/a", "/d", "/d/g", "/d/sub", "/e/x", "/x", "/y")
                 for st in [fs.lstat(path)]}
    with layerfs.open(image, upper=upper) as fs:
        assert {path: (fs.lstat(path).st_ctime_ns, fs.lstat(path).st_mtime_ns)
                for path in times} == times


# -- long names ------------------------------------------------------------------------------

LONG_IMAGE = [L.Layer([L.directory("d"), *[L.file("d/" + "n" * size, b"%d" % size)
                                           for size in (250, 251, 252, 253, 255)]])]


@pytest.fixture
def long_image(tmp_path):
    return write_image(LONG_IMAGE, tmp_path / "long", kind="layers", compression="none")


def test_every_name_up_to_255_bytes_works_for_every_operation(long_image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(long_image, upper=upper) as fs:
        for size in (250, 251, 252, 253, 255):
            name = "n" * size
            fs.unlink(f"/d/{name}")                           # whiteout of a lower entry
            fs.write_bytes(f"/{name}", b"new")
            fs.rename(f"/{name}", f"/d/{name[:-1]}x")          # into a lower directory
            fs.link(f"/d/{name[:-1]}x", f"/{name}")
            fs.mkdir(f"/{'m' * size}")
            fs.symlink("target", f"/{'m' * size}/{'s' * size}")
        before = snapshot(fs)
    long_markers = [n for n in os.listdir(upper / "diff" / "d") if n.startswith(".wh..wh.long.")]
    assert len(long_markers) == 3                               # 252, 253 and 255 bytes
    with layerfs.open(long_image, upper=upper) as fs:
        assert not diff_views(before, snapshot(fs))
        assert not fs.exists("/d/" + "n" * 253) and fs.exists("/d/" + "n" * 252 + "x")
        fs.write_bytes("/d/" + "n" * 253, b"back")          # the whiteout goes again
        assert fs.read_bytes("/d/" + "n" * 253) == b"back"
    assert len([n for n in os.listdir(upper / "diff" / "d")
                if n.startswith(".wh..wh.long.")]) == 2


def test_long_whiteouts_are_committed_as_plain_whiteouts(long_image, tmp_path):
    import tarfile
    from layerfs.commit import commit
    upper = tmp_path / "upper"
    with layerfs.open(long_image, upper=upper) as fs:
        fs.unlink("/d/" + "n" * 253)
        result = commit(fs, tmp_path / "dest", compression=None)
    with tarfile.open(result.layer_path) as tar:
        names = tar.getnames()
    assert "d/.wh." + "n" * 253 in names and not any("long." in n for n in names)
    with layerfs.open(str(tmp_path / "dest")) as committed:
        assert not committed.exists("/d/" + "n" * 253)
        assert committed.read_bytes("/d/" + "n" * 252) == b"252"


def test_names_over_255_bytes_are_enametoolong_everywhere_and_change_nothing(long_image,
                                                                            tmp_path):
    upper = tmp_path / "upper"
    long = "/d/" + "x" * 256
    with layerfs.open(long_image, upper=upper) as fs:
        fs.write_bytes("/keep", b"k")
        before = snapshot(fs)
        disk = sorted(os.walk(upper / "diff"))
        for call in (lambda: fs.stat(long), lambda: fs.lstat(long + "/y"),
                     lambda: fs.open(long, "rb"), lambda: fs.open(long, "wb"),
                     lambda: fs.mkdir(long), lambda: fs.symlink("t", long),
                     lambda: fs.rename("/keep", long), lambda: fs.link("/keep", long),
                     lambda: fs.unlink(long), lambda: fs.chmod(long, 0o600),
                     lambda: fs.mknod(long)):
            assert errno_of(call) == errno.ENAMETOOLONG
        assert not fs.exists(long)
        assert not diff_views(before, snapshot(fs)) and sorted(os.walk(upper / "diff")) == disk


def errno_of(call) -> int:
    with pytest.raises(OSError) as caught:
        call()
    return caught.value.errno


def test_a_reader_rereads_when_the_writer_compacts_between_its_two_reads(image, tmp_path,
                                                                          monkeypatch):
    """The reader reads attrs.json, then attrs.log; the writer changes and
    compacts in between (injected), so the journal the reader finds starts
    after a gap: it must read again rather than miss the changes between."""
    from layerfs import sidecar
    monkeypatch.setattr(sidecar, "MIN_COMPACTION", 3)
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        for mode in (0o600, 0o640, 0o644, 0o604, 0o606):
            fs.chmod("/d/f", mode)                    # a snapshot of seq 4, a line 5
        assert (upper / "attrs.json").exists()
        real_read = Sidecar._read
        calls = []

        def read(self, path):
            data = real_read(self, path)
            if path == "/attrs.json" and not calls:
                calls.append(path)
                for mode in (0o700, 0o711, 0o750, 0o755):
                    fs.chmod("/top", mode)            # another compaction meanwhile
            return data

        monkeypatch.setattr(Sidecar, "_read", read)
        with layerfs.open(image, upper=upper, readonly=True) as reader:
            assert reader.stat("/top").st_mode & 0o777 == 0o755
            assert reader.stat("/d/f").st_mode & 0o777 == 0o606
        assert calls


def test_a_long_whiteout_that_does_not_hold_its_name_is_a_clear_error(long_image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(long_image, upper=upper) as fs:
        fs.unlink("/d/" + "n" * 253)
    marker = next((upper / "diff" / "d").glob(".wh..wh.long.*"))
    marker.write_bytes(b"n" * 252)               # another name than its hash says
    with pytest.raises(InvalidLayerError, match="does not hold the name"):
        layerfs.open(long_image, upper=upper)


def test_every_change_is_logged_by_the_store_at_debug_level(image, tmp_path, caplog):
    """One place to audit: each operation of the family says what it does."""
    import logging
    with layerfs.open(image, upper=tmp_path / "upper") as fs:
        with caplog.at_level(logging.DEBUG, logger="layerfs.upper"):
            fs.mkdir("/n")
            fs.write_bytes("/n/f", b"x")
            fs.rename("/d/f", "/n/g")
            fs.link("/n/g", "/n/h")
            fs.chmod("/top", 0o600)
            fs.unlink("/e/x")
            fs.rmdir("/e")
            fs.mkdir("/e")
    messages = [record.getMessage() for record in caplog.records]
    for expected in ("place /n ", "place /n/f ", "write 1 bytes", "copy-up /d/f",
                     "whiteout /d/f", "rename /d/f -> /n/g", "link /n/g -> /n/h",
                     "copy-up /top (metadata only)", "set metadata /top", "remove /e/x",
                     "whiteout /e/x", "remove /e", "opaque /work/"):
        assert any(message.startswith(expected) for message in messages), expected


def test_without_root_the_callers_ids_are_kept_in_the_sidecar(image, tmp_path):
    from layerfs.caller import Caller, acting_as
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.upper.is_root = False                 # act as an unprivileged daemon
        with acting_as(Caller(1234, 5678, umask=0)):
            fs.mkdir("/d/m", 0o777)
            fs.write_bytes("/d/m/f", b"")
            fs.symlink("f", "/d/m/s")
    assert os.stat(upper / "diff" / "d" / "m").st_uid == os.geteuid()   # the host's own
    with layerfs.open(image, upper=upper) as fs:
        for path, mode in (("/d/m", 0o777), ("/d/m/f", 0o666), ("/d/m/s", 0o777)):
            st = fs.lstat(path)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, mode), path


def test_an_upper_refused_for_another_image_is_left_untouched(image, tmp_path):
    upper = tmp_path / "upper"
    layerfs.open(image, upper=upper).close()
    other = write_image([L.Layer([L.file("other", b"o")])], tmp_path / "other", kind="layers",
                        compression="none")
    marker = json.loads((upper / "layerfs-upper.json").read_text())
    with pytest.raises(UpperError) as caught:
        layerfs.open(other, upper=upper)
    assert marker["image"]["chain_id"] in str(caught.value)
    assert json.loads((upper / "layerfs-upper.json").read_text()) == marker   # untouched


def test_an_initialisation_interrupted_before_the_marker_is_taken_up_again(image, tmp_path):
    upper = tmp_path / "upper"
    for name in ("diff", "work"):
        (upper / name).mkdir(parents=True)
    (upper / "lock").write_bytes(b"")
    (upper / "work" / ".layerfs-upper.json.1.tmp").write_bytes(b"{")
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/new", b"n")
    assert json.loads((upper / "layerfs-upper.json").read_text())["format"] == 2
    assert os.listdir(upper / "work") == []
    (upper / "diff" / "stray").mkdir()            # but not a diff/ that holds something
    (upper / "layerfs-upper.json").unlink()
    with pytest.raises(UpperError, match="not empty"):
        layerfs.open(image, upper=upper)
