"""The mount's pure rules (options, sources, checks), without FUSE."""

from __future__ import annotations

import errno

import pytest

from layerfs import mount as layerfs_mount
from layerfs.errors import MountError


def test_options_are_parsed_and_forced():
    parsed = layerfs_mount.parse_options(["ro,allow_other", "attr_timeout=5", ""])
    assert parsed == {"ro": True, "allow_other": True, "attr_timeout": "5"}
    options = layerfs_mount.mount_options(readonly=False, user_options={"nodev": False})
    assert options["nodev"] is True and options["nosuid"] is True
    assert options["subtype"] == "layerfs" and options["default_permissions"] is True


def test_caching_depends_on_writability():
    readonly = layerfs_mount.mount_options(True, {})
    writable = layerfs_mount.mount_options(False, {})
    assert readonly["kernel_cache"] and readonly["ro"]
    assert int(readonly["attr_timeout"]) > 0
    assert "kernel_cache" not in writable and "ro" not in writable
    for key in ("entry_timeout", "attr_timeout", "negative_timeout"):
        assert writable[key] == "0"
    assert layerfs_mount.mount_options(True, {"attr_timeout": "1"})["attr_timeout"] == "1"


@pytest.mark.parametrize("option", ["dev", "rw,dev"])
def test_dev_is_always_refused(option):
    for euid in (0, 1000):
        with pytest.raises(MountError) as caught:
            layerfs_mount.parse_options([option], euid=euid)
        assert caught.value.errno == errno.EINVAL
        assert "'dev'" in str(caught.value)


def test_suid_only_when_root_asks():
    with pytest.raises(MountError) as caught:
        layerfs_mount.parse_options(["suid"], euid=1000)
    assert caught.value.errno == errno.EPERM and "root" in str(caught.value)
    parsed = layerfs_mount.parse_options(["suid"], euid=0)
    options = layerfs_mount.mount_options(False, parsed)
    assert options["suid"] is True and "nosuid" not in options and options["nodev"] is True


@pytest.mark.parametrize("option, name", [("allow_other,bogus", "bogus"),
                                          ("big_writes", "big_writes"),
                                          ("hard_remove=1", "hard_remove")])
def test_unknown_options_are_named(option, name):
    with pytest.raises(MountError) as caught:
        layerfs_mount.parse_options([option], euid=0)
    assert caught.value.errno == errno.EINVAL
    assert f"'{name}'" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_nonempty_and_x_options_are_accepted():
    assert layerfs_mount.parse_options(["nonempty,x-systemd.automount"], euid=0) == \
        {"nonempty": True, "x-systemd.automount": True}


def test_the_source_names_the_image():
    assert layerfs_mount.source_name("/images/app") == "/images/app"
    assert layerfs_mount.source_name(["/l/base.tar", "/l/top.tar"]) == "/l/base.tar..top.tar"
    assert layerfs_mount.source_name("/a,b\\c") == "/a\\,b\\\\c"


def test_mountinfo_escapes():
    assert layerfs_mount.unescape_mountinfo(r"/mnt/a\040b\134c") == "/mnt/a b\\c"


def test_missing_device_is_a_mount_error(tmp_path):
    with pytest.raises(MountError) as caught:
        layerfs_mount.check_device(str(tmp_path / "fuse"))
    assert caught.value.errno == errno.ENODEV
    assert "fuse" in str(caught.value)


def test_an_upper_inside_or_at_the_mount_point_is_refused(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for upper in (mnt, mnt / "upper", mnt / "a" / "b"):
        with pytest.raises(MountError) as caught:
            layerfs_mount.check_upper(str(upper), str(mnt))
        assert caught.value.errno == errno.EINVAL
        assert "inside" in str(caught.value)
    layerfs_mount.check_upper(str(tmp_path / "mnt-upper"), str(mnt))   # a sibling is fine


def test_a_file_as_upper_is_refused(tmp_path):
    upper = tmp_path / "upper"
    upper.write_text("not a directory")
    with pytest.raises(MountError) as caught:
        layerfs_mount.check_upper(str(upper), str(tmp_path / "mnt"))
    assert caught.value.errno == errno.ENOTDIR
    assert str(upper) in str(caught.value)
