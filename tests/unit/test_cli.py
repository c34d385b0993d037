"""The command line, run as a user would: output, exit status, one-line errors."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from layerfs.example import build_example


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_example(str(tmp_path_factory.mktemp("cli") / "image"))


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_ls_plain_long_and_recursive(image):
    assert run("ls", image).stdout.split() == ["README", "bin", "etc", "usr", "var"]
    long = run("ls", "-l", image, "/").stdout
    assert "bin -> usr/bin" in long and long.startswith("-rw-r--r--")
    recursive = run("ls", "-R", image).stdout
    assert "/var/cache:\nfresh" in recursive


def test_cat_and_stat(image):
    assert run("cat", image, "/bin/hello").stdout.endswith("echo hello from layerfs\n")
    record = json.loads(run("stat", "--json", image, "/usr/bin/hi").stdout)
    assert record["type"] == "file" and record["links"] == 2 and record["mode"] == "0755"


def test_inspect_json_lists_layer_changes(image):
    report = json.loads(run("inspect", "--json", image).stdout)
    assert report["image"]["kind"] == "oci-layout"
    assert [layer["compression"] for layer in report["layers"]] == ["none", "none", "zstd"]
    assert report["layers"][1]["deleted"] == ["/etc/old.conf", "/var/cache/stale-1",
                                              "/var/cache/stale-2"]


def test_a_list_of_layer_files_is_an_image(tmp_path):
    layers = []
    for number, content in enumerate([b"one", b"two"]):
        path = tmp_path / f"layer{number}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("f")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        layers.append(path)
    assert run("cat", *layers, "/f").stdout == "two"
    assert run("ls", *layers).stdout.split() == ["f"]
    assert run("ls", *layers, "/").stdout.split() == ["f"]


def test_export_diff_and_commit(image, tmp_path):
    run("export", image, tmp_path / "flat.tar")
    with tarfile.open(tmp_path / "flat.tar") as tar:
        assert "etc/motd" in tar.getnames()
    upper = tmp_path / "up"
    import layerfs
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/etc/motd", b"new")
        fs.unlink("/README")
    assert run("diff", image, upper).stdout.splitlines() == ["D /README", "C /etc", "C /etc/motd"]
    digest = run("commit", "--tag", "v2", image, upper, tmp_path / "out").stdout.strip()
    assert digest.startswith("sha256:")
    assert run("cat", "--tag", "v2", tmp_path / "out", "/etc/motd").stdout == "new"


@pytest.mark.parametrize("args, words", [
    (["cat", "IMAGE", "/nothing"], ["/nothing", "No such file"]),
    (["cat", "IMAGE", "/etc"], ["Is a directory"]),
    (["ls", "/no/such/image"], ["/no/such/image"]),
    (["stat", "IMAGE", "/etc/motd/x"], ["Not a directory"]),
])
def test_errors_are_one_line(image, args, words):
    args = [image if a == "IMAGE" else a for a in args]
    assert_one_line_error(run(*args, check=False), *words)


def test_bad_layer_names_layer_and_entry(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("../../etc/passwd")
        tar.addfile(info, io.BytesIO(b""))
    result = run("ls", path, check=False)
    assert_one_line_error(result, str(path), "../../etc/passwd")


def test_corrupt_gzip_is_one_line(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))
    assert_one_line_error(run("ls", path, check=False), str(path))


def test_a_single_layer_file_is_an_image(tmp_path):
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("only")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    assert run("cat", path, "/only").stdout == "ok"


def test_diff_and_commit_of_a_missing_or_foreign_upper_create_nothing(image, tmp_path):
    missing = tmp_path / "missing"
    for command in (["diff", image, missing], ["commit", image, missing, tmp_path / "out"]):
        assert_one_line_error(run(*command, check=False), str(missing), "no such upper")
    assert not missing.exists() and not (tmp_path / "out").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    assert_one_line_error(run("diff", image, foreign, check=False), "not a layerfs upper")
    assert os.listdir(foreign) == []


def test_diff_works_beside_a_writer_and_commit_is_refused_naming_it(image, tmp_path):
    import layerfs
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/new", b"n")
        assert run("diff", image, upper).stdout.splitlines() == ["A /new"]
        result = run("commit", image, upper, tmp_path / "out", check=False)
        assert_one_line_error(result, str(upper), f"pid {os.getpid()}", "unmount it")
    assert run("commit", image, upper, tmp_path / "out").stdout.startswith("sha256:")
