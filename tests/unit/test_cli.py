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


def test_inspect_json_lists_layer_changes_with_paths(image):
    report = json.loads(run("inspect", "--json", "--paths", image).stdout)
    assert report["image"]["kind"] == "oci-layout"
    assert [layer["compression"] for layer in report["layers"]] == ["none", "none", "gzip"]
    assert report["layers"][1]["deleted"] == ["/etc/old.conf", "/var/cache/stale-1",
                                              "/var/cache/stale-2"]
    counted = json.loads(run("inspect", "--json", image).stdout)
    assert counted["layers"][1]["deleted"] == 3


def one_file_layers(tmp_path, contents=(b"one", b"two")):
    layers = []
    for number, content in enumerate(contents):
        path = tmp_path / f"layer{number}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("f")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        layers.append(path)
    return layers


def stack(layers):
    return [word for layer in layers for word in ("--layer", str(layer))]


def test_a_stack_of_layer_files_is_written_with_layer_options(tmp_path):
    layers = one_file_layers(tmp_path)
    assert run("cat", *stack(layers), "/f").stdout == "two"
    assert run("cat", *stack(reversed(layers)), "/f").stdout == "one"
    assert run("ls", *stack(layers)).stdout.split() == ["f"]
    assert run("ls", "-l", *stack(layers), "/").stdout.split()[-1] == "f"


@pytest.mark.parametrize("command, words", [
    (["cat", "L0", "L1", "/f"], ["layerfs cat --layer L0 --layer L1 /f"]),
    (["ls", "L0", "L1", "/"], ["layerfs ls --layer L0 --layer L1 /"]),
    (["stat", "L0", "L1", "/f"], ["layerfs stat --layer L0 --layer L1 /f"]),
    (["export", "L0", "L1", "OUT"], ["layerfs export --layer L0 --layer L1 OUT"]),
])
def test_the_old_consecutive_layer_form_is_refused_with_the_new_spelling(tmp_path, command,
                                                                          words):
    layers = one_file_layers(tmp_path)
    names = {"L0": str(layers[0]), "L1": str(layers[1]), "OUT": str(tmp_path / "out.tar")}
    result = run(*[names.get(word, word) for word in command], check=False)
    assert_one_line_error(result, *[" ".join(names.get(w, w) for w in word.split())
                                    for word in words])
    assert result.returncode == 2
    assert not (tmp_path / "out.tar").exists()


def test_old_form_ls_of_two_layers_hints_at_the_new_spelling(tmp_path):
    """``ls a.tar /x/b.tar`` is IMAGE and PATH by position; the PATH is not
    in the image, and its name ending in .tar earns the hint."""
    layers = [str(path) for path in one_file_layers(tmp_path)]
    result = run("ls", *layers, check=False)
    assert_one_line_error(result, layers[1], "No such file",
                          f"layerfs ls --layer {layers[0]} --layer {layers[1]}")
    relative = run("ls", *[os.path.basename(p) for p in layers], check=False)
    assert relative.returncode == 2 and "must start with /" in relative.stderr


def test_a_path_argument_is_never_read_from_the_host(image):
    """/etc/os-release exists on the host, and used to be taken for a layer
    file; position alone decides that it is the PATH inside the image."""
    assert os.path.exists("/etc/os-release")
    line = run("ls", "-l", image, "/etc/os-release").stdout
    assert line.split()[-1] == "os-release" and " 34 " in line
    assert run("cat", image, "/etc/os-release").stdout.startswith("NAME=")
    assert run("ls", image, "-l", "/etc").stdout.split("\n")[0].endswith("motd")


def test_transport_prefixes_name_the_local_forms(image, tmp_path):
    assert run("cat", f"oci:{image}", "/etc/motd").stdout.startswith("Welcome")
    assert run("cat", f"oci:{image}:example", "/etc/motd").stdout.startswith("Welcome")
    assert run("cat", "--tag", "example", f"oci:{image}", "/etc/motd").stdout.startswith(
        "Welcome")
    digest = json.loads(run("inspect", "--json", image).stdout)["image"]["manifest_digest"]
    assert run("cat", f"oci:{image}:{digest}", "/etc/motd").stdout.startswith("Welcome")
    assert run("cat", f"oci:{image}:@{digest}", "/etc/motd").stdout.startswith("Welcome")
    assert_one_line_error(run("cat", f"oci:{image}:nosuch", "/etc/motd", check=False),
                          "no image tagged 'nosuch'", "example")
    layer = one_file_layers(tmp_path, [b"x"])[0]
    assert_one_line_error(run("ls", f"oci:{layer}", check=False), str(layer),
                          "not an OCI image layout directory")
    assert_one_line_error(run("ls", f"oci-archive:{layer}", check=False), "not an OCI archive")
    assert_one_line_error(run("ls", f"docker-archive:{layer}", check=False),
                          "not a docker archive")
    assert_one_line_error(run("ls", f"docker-archive:{image}", check=False),
                          "not an archive file")


@pytest.mark.parametrize("command, words", [
    (["cat", "--tag", "x", "oci:IMAGE:example", "/etc/motd"], ["not both"]),
    (["cat", "--tag", "x", "--layer", "IMAGE", "/etc/motd"], ["--layer stack"]),
    (["cat", "--tag", "x", "docker://example.com/a/b:1", "/etc/motd"], ["docker://"]),
    (["cat", "IMAGE"], ["PATH is missing"]),
    (["cat", "/etc/motd"], ["PATH is missing"]),
    (["ls"], ["IMAGE is missing"]),
    (["cat", "docker://Upper/Case", "/f"], ["docker://Upper/Case", "repository name"]),
    (["cat", "oci:", "/f"], ["no path"]),
    (["cat", "IMAGE", "etc/motd"], ["must start with /"]),
])
def test_usage_errors_are_one_line_with_status_2(image, command, words):
    result = run(*[a.replace("IMAGE", image) for a in command], check=False)
    assert_one_line_error(result, *words)
    assert result.returncode == 2


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
    assert run("diff", f"oci:{image}:example", upper).stdout.startswith("D /README")
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


def test_a_gzipped_docker_save_archive_opens_as_its_image(image, tmp_path):
    import gzip
    import layerfs
    from layerfs.imagewrite import write_docker_archive
    with layerfs.open(image) as fs:
        write_docker_archive(tmp_path / "saved.tar", fs.image.layer_sources, ["example:v1"],
                             config=fs.image.config)
    packed = tmp_path / "saved.tar.gz"
    packed.write_bytes(gzip.compress((tmp_path / "saved.tar").read_bytes()))
    assert run("cat", packed, "/etc/motd").stdout.startswith("Welcome")
    assert run("cat", f"docker-archive:{packed}:example:v1", "/etc/motd").stdout.startswith(
        "Welcome")
    assert run("tags", packed).stdout.startswith("example:v1\tlinux/")
    assert json.loads(run("inspect", "--json", packed).stdout)["image"]["kind"] == (
        "docker-archive")


def test_tags_lists_the_images_of_a_layout(image):
    name, platform, digest = run("tags", image).stdout.strip().split("\t")
    assert name == "example" and platform.startswith("linux/") and digest.startswith("sha256:")


def test_usage_errors_of_commands_in_other_modules_are_usage_errors(tmp_path):
    """``python -m layerfs.cli`` runs the file as ``__main__``, a second copy
    of the module: a usage error raised by the cache or registry commands
    (defined elsewhere) must still be one line and status 2, not an
    internal error."""
    for arguments in (["cache", "--cache-dir", tmp_path, "prune", "--keep", "bogus"],
                      ["copy", "docker://127.0.0.1:9/x:1", "not-oci"]):
        result = run(*arguments, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "please report" not in result.stderr
