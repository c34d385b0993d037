"""layerfs.testing is importable without hypothesis or FUSE being loaded,
and the rest of layerfs never imports hypothesis."""

import subprocess
import sys


def loaded_after(statement: str) -> set:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return set(done.stdout.split())


def test_core_never_imports_hypothesis():
    modules = loaded_after("import layerfs, layerfs.fs, layerfs.union, layerfs.image")
    assert "hypothesis" not in modules


def test_testing_package_needs_neither_hypothesis_nor_fuse():
    modules = loaded_after("import layerfs.testing, layerfs.testing.oracle")
    assert "hypothesis" not in modules
    assert "fuse" not in modules


def test_strategies_are_reachable_from_the_package():
    modules = loaded_after("import layerfs.testing as t; t.layer_stacks")
    assert "hypothesis" in modules
