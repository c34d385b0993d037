"""README.md's Python example, executed as it is written, in a directory
where ``layerfs example image-layout`` has run (as the README says)."""

import pathlib
import re
import subprocess
import sys

import layerfs

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    after = text.split("executed as written by\n`tests/unit/test_readme.py`", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", after, flags=re.S)
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "layerfs.cli", "example", "image-layout"],
                   check=True, capture_output=True)
    exec(compile(blocks[0], f"{README}:python", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "'os-release'" in printed.splitlines()[0] and 'NAME="layerfs example"' in printed
    with layerfs.open("oci:out-layout:mine") as committed:
        assert committed.read_text("/etc/motd") == "hi\n"
        assert committed.listdir("/cache") == ["fresh"]
        assert not committed.exists("/var/cache")
