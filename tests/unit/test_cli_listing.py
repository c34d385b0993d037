"""``ls`` and ``stat`` as their coreutils namesakes: combined short options,
human sizes, dot names, recursion, JSON and formats, as a user types them."""

import io
import json
import subprocess
import sys
import tarfile

import pytest

from layerfs.cli import short_size


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """/d holding a dot file, a 1,536-byte file and a 3 MiB one; /d/sub/x."""
    path = tmp_path_factory.mktemp("listing") / "layer.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["d", "d/sub"]:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, size in [("d/.hidden", 1), ("d/small", 1536), ("d/big", 3 << 20),
                           ("d/sub/x", 5)]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = size, 1_700_000_000
            tar.addfile(info, io.BytesIO(b"x" * size))
    return path


def test_ls_hides_dot_names_unless_all(layer):
    assert run("ls", "--layer", layer, "/d").stdout.split() == ["big", "small", "sub"]
    assert run("ls", "-a", "--layer", layer, "/d").stdout.split() == [
        ".", "..", ".hidden", "big", "small", "sub"]


def test_ls_combined_short_options(layer):
    lines = run("ls", "-lah", "--layer", layer, "/d").stdout.splitlines()
    assert [line.split()[-1] for line in lines] == [".", "..", ".hidden", "big", "small", "sub"]
    sizes = {line.split()[-1]: line.split()[4] for line in lines}
    assert (sizes["big"], sizes["small"], sizes[".hidden"]) == ("3.0M", "1.5K", "1")
    plain = run("ls", "-la", "--layer", layer, "/d").stdout
    assert " 3145728 " in plain and " 1536 " in plain


def test_ls_recursive(layer):
    assert run("ls", "-R", "--layer", layer, "/d").stdout == (
        "/d:\nbig\nsmall\nsub\n\n/d/sub:\nx\n")


def test_ls_json(layer):
    records = json.loads(run("ls", "--json", "-R", "--layer", layer, "/d").stdout)
    assert [(r["path"], r["type"], r["size"]) for r in records] == [
        ("/d/big", "file", 3 << 20), ("/d/small", "file", 1536), ("/d/sub", "directory", 0),
        ("/d/sub/x", "file", 5)]
    assert records[0]["mtime"] == "2023-11-14 22:13:20.000000000 +0000"


def test_ls_help_is_long_only_since_h_means_human(layer):
    page = " ".join(run("ls", "--help").stdout.split())
    assert "-h, --human-readable" in page and "--help show this help" in page
    assert "[PATH]: a path inside the image, absolute (default: /)" in page


@pytest.mark.parametrize("count, shown", [
    (0, "0"), (1023, "1023"), (1024, "1.0K"), (1025, "1.1K"), (10 * 1024, "10K"),
    (10 * 1024 + 1, "11K"), (3 << 20, "3.0M"), (5 << 30, "5.0G")])
def test_short_size_rounds_up_as_ls(count, shown):
    assert short_size(count) == shown


def test_stat_shows_dates_json_and_formats(layer):
    text = run("stat", "--layer", layer, "/d/small").stdout
    assert "mtime:    2023-11-14 22:13:20.000000000 +0000" in text
    record = json.loads(run("stat", "--json", "--layer", layer, "/d/small").stdout)
    assert (record["size"], record["mode"], record["type"]) == (1536, "0644", "file")
    formatted = run("stat", "-c", "%n %s %a %A %F %u:%g %h %Y %%", "--layer", layer,
                    "/d/small").stdout
    assert formatted == "/d/small 1536 644 -rw-r--r-- file 0:0 1 1700000000 %\n"


def test_stat_refuses_an_unknown_directive_in_one_line(layer):
    result = run("stat", "--format", "%Q", "--layer", layer, "/d", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("layerfs: stat: unknown directive %Q")


def test_every_help_page_describes_its_positional_arguments():
    for command in ["ls", "cat", "stat", "inspect", "export", "diff", "commit", "mount"]:
        page = " ".join(run(command, "--help").stdout.split())
        assert "IMAGE: the image" in page, command
