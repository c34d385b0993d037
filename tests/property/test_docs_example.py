"""The examples of docs/testing.md, executed as they are written there."""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "testing.md"
MARKER = "<!-- example: executed by tests/property/test_docs_example.py -->"


def python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_marked_example_is_the_first_block_after_the_marker():
    text = DOC.read_text(encoding="utf-8")
    assert MARKER in text
    after = text.split(MARKER, 1)[1]
    assert after.lstrip().startswith("```python")


def test_docs_example_runs_and_passes(tmp_path_factory):
    text = DOC.read_text(encoding="utf-8")
    code = python_blocks(text.split(MARKER, 1)[1])[0]
    namespace = {"__name__": "docs_testing_example"}
    exec(compile(code, f"{DOC}:example", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests, "the example defines no test"
    for test in tests:
        test(tmp_path_factory=tmp_path_factory)


def test_every_other_python_block_runs():
    text = DOC.read_text(encoding="utf-8")
    marked = python_blocks(text.split(MARKER, 1)[1])[0]
    for code in python_blocks(text):
        if code != marked:
            exec(compile(code, f"{DOC}:block", "exec"), {"__name__": "docs_block"})
