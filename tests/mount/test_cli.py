"""``layerfs mount`` / ``layerfs umount`` as subprocesses, errors included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from layerfs import mount as layerfs_mount
from mount_helpers import ROOT, force_unmount, is_mounted, requires_fuse, run_cli, stack, wait_until

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
    # The image is the source findmnt shows (here a stack: first..last).
    assert f" fuse.layerfs {sample_layers[0]}..top.tar " in line


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


def test_device_option_is_refused(sample_layers, mountpoint):
    result = run_cli("mount", "-o", "ro,dev", *stack(sample_layers), mountpoint)
    assert_one_line_error(result, "'dev'", "nodev")
    assert not is_mounted(mountpoint)


def test_unknown_option_is_named(sample_layers, mountpoint):
    result = run_cli("mount", "-o", "ro,no_such_option=3", *stack(sample_layers), mountpoint)
    assert_one_line_error(result, "'no_such_option'")
    assert "libfuse status" not in result.stderr
    assert not is_mounted(mountpoint)


def test_suid_is_honoured_when_root_asks(sample_layers, mountpoint):
    # A container runtime's choice (docs/mount.md): set-id bits then work.
    run_cli("mount", "-o", "suid", *stack(sample_layers), mountpoint, check=True)
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        line = next(line for line in info if line.split()[4] == mountpoint)
    assert "nosuid" not in line.split()[5] and "nodev" in line.split()[5]


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


def test_mounts_lists_and_umount_all_unmounts_this_runtime_dirs_mounts(sample_layers, tmp_path):
    # The fixtures give this test its own runtime directory, so --all
    # reaches only the mounts made here.
    mountpoints = []
    for name in ("one", "two"):
        mountpoint = tmp_path / name
        mountpoint.mkdir()
        mountpoints.append(str(mountpoint))
    try:
        run_cli("mount", *stack(sample_layers), mountpoints[0], check=True)
        run_cli("mount", "--upper", str(tmp_path / "upper"), *stack(sample_layers), mountpoints[1],
                check=True)
        listed = run_cli("mounts", check=True).stdout.splitlines()
        rows = [line.split("\t") for line in listed]
        assert [row[0] for row in rows] == mountpoints
        assert all(row[1] == f"{sample_layers[0]}..top.tar" for row in rows)
        assert all(int(row[2]) == layerfs_mount.server_pid(row[0]) for row in rows)
        assert run_cli("umount", "--all", check=True).stderr == ""
        assert not any(is_mounted(path) for path in mountpoints)
        assert run_cli("mounts", check=True).stdout == ""
    finally:
        for path in mountpoints:
            force_unmount(path)


def test_umount_needs_a_mountpoint_or_all(mountpoint):
    result = run_cli("umount")
    assert result.returncode == 2 and "--all" in result.stderr
    assert run_cli("umount", "--all", mountpoint).returncode == 2


def test_log_file_receives_the_daemons_and_libfuses_log(sample_layers, mountpoint, tmp_path):
    log = tmp_path / "daemon.log"
    run_cli("mount", "--log", str(log), "--log-level", "debug", "-o", "debug",
            *stack(sample_layers), mountpoint, check=True)
    assert os.listdir(mountpoint)
    run_cli("umount", mountpoint, check=True)
    text = log.read_text()
    assert f"INFO layerfs.mount: serving {sample_layers[0]}..top.tar on {mountpoint}" in text
    # libfuse's trace of each request (-o debug) goes where the log goes.
    assert "opcode: READDIR" in text


def test_log_level_filters(sample_layers, mountpoint, tmp_path):
    log = tmp_path / "daemon.log"
    run_cli("mount", "--log", str(log), "--log-level", "warning", *stack(sample_layers), mountpoint,
            check=True)
    run_cli("umount", mountpoint, check=True)
    assert "serving" not in log.read_text()


def test_upper_at_or_inside_the_mount_point_is_refused(sample_layers, mountpoint, tmp_path):
    for upper in (mountpoint, f"{mountpoint}/upper"):
        result = run_cli("mount", "--upper", upper, *stack(sample_layers), mountpoint)
        assert_one_line_error(result, "inside")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run_cli("mount", "--upper", str(tmp_path / "file"), *stack(sample_layers),
                                  mountpoint), "file", "directory")
    assert not is_mounted(mountpoint)


def test_mount_shows_indexing_progress_on_a_terminal(sample_layers, mountpoint, tmp_path):
    import pty
    main, terminal = pty.openpty()
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        result = subprocess.run([sys.executable, "-m", "layerfs.cli", "mount", "--cache-dir",
                                 str(tmp_path / "cold-cache"), *stack(sample_layers), mountpoint],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=terminal, timeout=60)
        os.close(terminal)
        terminal = None
        shown = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:                  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(main)
    assert result.returncode == 0
    assert b"indexing [" in shown and b"100%" in shown
    assert is_mounted(mountpoint)
    run_cli("umount", mountpoint, check=True)
