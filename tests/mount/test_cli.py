"""``layerfs mount`` / ``layerfs umount`` as subprocesses, errors included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mount_helpers import stack, ROOT, is_mounted, requires_fuse, run_cli, wait_until

pytestmark = [pytest.mark.mount, requires_fuse]


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("layerfs: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_mount_then_umount(sample_layers, mountpoint):
    result = run_cli("mount", *stack(sample_layers), mountpoint)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert is_mounted(mountpoint)       # ready when the command returns
    with open(f"{mountpoint}/etc/passwd", "rb") as handle:
        assert handle.read().startswith(b"root:")
    result = run_cli("umount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mountpoint)
    assert os.listdir(mountpoint) == []


def test_mount_passes_options_through(sample_layers, mountpoint):
    result = run_cli("mount", "-o", "allow_other", "-o", "attr_timeout=5",
                     *stack(sample_layers), mountpoint)
    assert result.returncode == 0, result.stderr
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        line = next(line for line in info if line.split()[4] == mountpoint)
    assert "allow_other" in line and "nodev" in line and "nosuid" in line
    assert " fuse.layerfs layerfs " in line


def test_relative_paths_are_resolved_before_detaching(sample_layers, mountpoint, tmp_path):
    names = [os.path.relpath(path, tmp_path) for path in sample_layers]
    result = run_cli("mount", *stack(names), os.path.relpath(mountpoint, tmp_path),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(f"{mountpoint}/bin/tool")


def test_missing_mountpoint(sample_layers, tmp_path):
    result = run_cli("mount", *stack(sample_layers), str(tmp_path / "nowhere"))
    assert_one_line_error(result, "does not exist")


def test_mountpoint_that_is_a_file(sample_layers, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli("mount", *stack(sample_layers), str(tmp_path / "file"))
    assert_one_line_error(result, "not a directory")


def test_busy_mountpoint(sample_layers, mounted):
    result = run_cli("mount", *stack(sample_layers), mounted)
    assert_one_line_error(result, "already a mount point")
    assert is_mounted(mounted)


def test_non_empty_mountpoint_needs_nonempty(sample_layers, mountpoint):
    with open(f"{mountpoint}/keep", "w") as handle:
        handle.write("x")
    result = run_cli("mount", *stack(sample_layers), mountpoint)
    assert_one_line_error(result, "not empty", "nonempty")
    assert not is_mounted(mountpoint)
    result = run_cli("mount", "-o", "nonempty", *stack(sample_layers), mountpoint)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(mountpoint))[:2] == ["absolute", "attrs"]
    run_cli("umount", mountpoint, check=True)
    assert os.listdir(mountpoint) == ["keep"]


def test_bad_image(mountpoint, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar")
    result = run_cli("mount", *stack([bad, bad]), mountpoint)
    assert_one_line_error(result, "bad.tar")
    assert not is_mounted(mountpoint)


def test_missing_image(mountpoint, tmp_path):
    result = run_cli("mount", str(tmp_path / "none.tar"), mountpoint)
    assert_one_line_error(result, "none.tar")
    assert not is_mounted(mountpoint)


def test_device_and_setuid_options_are_refused(sample_layers, mountpoint):
    for option in ("dev", "suid"):
        result = run_cli("mount", "-o", f"ro,{option}", *stack(sample_layers), mountpoint)
        assert_one_line_error(result, option, "nodev,nosuid")
        assert not is_mounted(mountpoint)


def test_umount_of_something_not_mounted(mountpoint):
    assert_one_line_error(run_cli("umount", mountpoint), "not a mount point")


def test_umount_of_a_busy_mount(sample_layers, mountpoint):
    run_cli("mount", *stack(sample_layers), mountpoint, check=True)
    holder = os.open(f"{mountpoint}/etc/passwd", os.O_RDONLY)
    try:
        assert_one_line_error(run_cli("umount", mountpoint), "busy")
        assert is_mounted(mountpoint)
    finally:
        os.close(holder)
    run_cli("umount", mountpoint, check=True)
    assert not is_mounted(mountpoint)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_foreground_mount_stops_cleanly_on_signals(sample_layers, mountpoint, signal_number):
    env = dict(os.environ, PYTHONPATH=ROOT)
    server = subprocess.Popen([sys.executable, "-m", "layerfs.cli", "mount", "-f",
                               *stack(sample_layers), mountpoint], env=env,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: is_mounted(mountpoint) or server.poll() is not None)
        assert is_mounted(mountpoint), server.communicate()[1]
        assert os.path.isfile(f"{mountpoint}/etc/passwd")
        server.send_signal(signal_number)
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert not is_mounted(mountpoint)


def test_importing_layerfs_does_not_load_fuse():
    code = ("import sys, layerfs, layerfs.cli; "
            "assert 'fuse' not in sys.modules and 'layerfs.fuse' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                   check=True)
