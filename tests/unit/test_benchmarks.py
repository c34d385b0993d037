"""Smoke tests of the benchmark corpus generator and runner (no timing asserted)."""

from __future__ import annotations

import json
import os
import tarfile

import pytest

import layerfs
from benchmarks import corpus, report, run


def view_of(sources) -> dict:
    with layerfs.open(sources, cache=False) as fs:
        out = {}
        for top, dirs, files in fs.walk("/"):
            for name in dirs + files:
                path = top.rstrip("/") + "/" + name
                st = fs.lstat(path)
                content = fs.read_bytes(path) if fs.is_file(path) and not fs.is_symlink(path) else None
                target = fs.readlink(path) if fs.is_symlink(path) else None
                out[path] = (st.st_mode, st.st_size, st.st_nlink, content, target)
        return out


def markers(stack: corpus.Stack) -> set:
    names = set()
    for path in stack.layer_files():
        with tarfile.open(path) as tar:
            names.update(os.path.basename(m.name) for m in tar if m.name.rsplit("/", 1)[-1].startswith(".wh."))
    return names


def test_same_view_over_any_number_of_layers(tmp_path):
    built = corpus.build(str(tmp_path), 600, (1, 4, 12), 1 << 16, seed=5)
    one = view_of(built.stacks[1].layer_files())
    listing = built.paths()
    assert sorted(one) == sorted(listing["all"])
    for depth in (4, 12):
        for compression in corpus.COMPRESSIONS:
            assert view_of(built.stacks[depth].layer_files(compression)) == one
        assert view_of(built.stacks[depth].oci("tar.zst")) == one


def test_history_is_present_only_with_several_layers(tmp_path):
    built = corpus.build(str(tmp_path), 600, (1, 12), 1 << 16, seed=5)
    assert markers(built.stacks[1]) == set()
    found = markers(built.stacks[12])
    assert corpus.OPAQUE_MARKER in found
    assert any(name.startswith(".wh.junk") for name in found)


def test_generation_is_deterministic(tmp_path):
    first = corpus.build(str(tmp_path / "a"), 300, (3,), 1 << 16, seed=9)
    second = corpus.build(str(tmp_path / "b"), 300, (3,), 1 << 16, seed=9)
    for a, b in zip(first.stacks[3].layer_files("tar.gz"), second.stacks[3].layer_files("tar.gz")):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()


def test_large_file_layer(tmp_path):
    built = corpus.build(str(tmp_path), 50, (1,), 3 << 20, seed=2)
    with layerfs.open(built.large.oci("tar.zst"), cache=False) as fs:
        assert fs.stat("/large.bin").st_size == 3 << 20
        assert len(fs.read_bytes("/large.bin")) == 3 << 20


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="the runner drops the page cache: needs root")
def test_runner_in_process_on_a_tiny_corpus(tmp_path, capsys):
    results_path = tmp_path / "results.json"
    code = run.main(["--quick", "--no-mount", "--files", "300", "--reps", "1", "--large-mib", "1",
                     "--corpus-dir", str(tmp_path / "corpus"), "--results", str(results_path)])
    assert code == 0
    results = json.loads(results_path.read_text())
    rates = results["inprocess"]["rates"]
    for depth in (1, 10, 50):
        assert rates[f"{depth}/stat_hot"] > 0
        assert results["inprocess"]["open"][f"{depth}/tar.gz"]["entries"] >= 300
    assert rates["dict_floor"] > 0
    verdicts = {t["target"]: t["met"] for t in results["targets"]}
    assert any("dict loop" in name for name in verdicts)
    printed = capsys.readouterr().out
    assert "Targets" in printed and "stat/dict" in printed
    assert "Targets" in report.render(results)


def test_report_combines_runs():
    inprocess = {"config": {"files": 10}, "inprocess": {"rates": {"dict_floor": 3.0}},
                 "mount": {}, "skipped": {"a": "why"}}
    mounted = {"config": {"files": 10, "mount_only": True}, "mount": {"tree-1": {}},
               "skipped": {"b": "why not"}}
    merged = report.merge([inprocess, mounted])
    assert merged["inprocess"]["rates"]["dict_floor"] == 3.0
    assert merged["mount"] == {"tree-1": {}}
    assert merged["skipped"] == {"a": "why", "b": "why not"}
    assert merged["config"] == {"files": 10, "mount_only": True}


def test_the_upper_benchmark_runs_and_reports_its_sidecar():
    from benchmarks import upper
    results = upper.measure([50], rounds=2)
    assert len(results[50]["per_chmod_us_by_round"]) == 2
    assert results[50]["sidecar_bytes"] > 50 * 50          # a record per file, at least
    assert set(upper.operations(20)) == {"create", "chmod upper file", "chmod lower file",
                                         "rename upper file", "unlink lower file"}


def test_cache_benchmark_runs_and_reports(tmp_path):
    """The cache benchmark on tiny corpora (no timing asserted)."""
    from benchmarks import cache as cache_benchmark
    out = tmp_path / "cache.json"
    assert cache_benchmark.main(["--mib", "1", "--files", "200", "--reps", "1",
                                 "--corpus-dir", str(tmp_path / "corpus"),
                                 "--results", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["corpus"] for r in results] == ["mixed.gzip", "mixed.zstd", "mixed.zstdf",
                                              "tree.gzip", "tree.zstd", "tree.zstdf"]
    for r in results:
        after = r["after"]
        assert after["tenth"]["cache_bytes"] <= r["uncompressed"] // 10 + (64 << 10)
        assert after["unbounded"]["storage"] == "copy"
        assert after["scan_ratio"] > 0 and after["fuse_ratio"] > 0


def test_toc_benchmark_counts_footer_and_toc_only(tmp_path):
    """benchmarks/toc.py on a 1 MB corpus: the TOC formats list from far
    fewer bytes than the gzip blob (no timing asserted)."""
    from benchmarks import toc as toc_bench
    out = tmp_path / "toc.json"
    assert toc_bench.main(["--max-mb", "1", "--reps", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"gzip", "estargz", "zstd:chunked"}
    for name in ("estargz", "zstd:chunked"):
        assert results[name]["ls_reads"] <= 2
        assert results[name]["ls_bytes"] < results["gzip"]["ls_bytes"] / 4
        assert results[name]["cat_bytes"] > results[name]["ls_bytes"]
