"""What a second use of a lazily read registry image costs.

``python -m benchmarks.lazy_reopen``

Starts Debian's ``docker-registry`` on loopback behind a byte-counting
proxy (tests/registry/servers.py), pushes two images, and for each opens it,
``cat``s one file, closes it, then does the same in a new process with the
same cache directory.  Reports the blob bytes requested through the proxy
and the wall time of each ``cat`` command (process start included):

- ``gzip``: one 15 MB gzip layer of random files under an 8 MiB budget (its
  copy does not fit: gzip checkpoints, the blob re-read by ranges);
- ``estargz-bare``: an eStargz layer (3 MiB file and a small one) pushed
  without its TOC annotation, so the first open must verify the whole blob.

Run it with ``PYTHONPATH=<other checkout>`` to measure another version of
layerfs against the same fixtures.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "registry"))

from registry_helpers import Registry  # noqa: E402
from servers import CountingProxy  # noqa: E402


def _cat(ref: str, path: str, env: dict) -> tuple[float, bytes]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "layerfs.cli", "cat", ref, path],
                          capture_output=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode())
    return time.perf_counter() - start, done.stdout


def _gzip_image(registry, work: str) -> tuple[str, str, bytes]:
    import layerfs.testing.layers as L
    from layerfs.testing.writers import tar_bytes
    rng = random.Random(1)
    files = {f"g/f{i}": rng.randbytes(rng.choice([100, 5000, 300_000])) for i in range(150)}
    tar = tar_bytes(L.Layer([L.file(n, d) for n, d in files.items()]))
    registry.push_image("bench/gzip", "v1", [gzip.compress(tar, 1)],
                        layer_types=["application/vnd.oci.image.layer.v1.tar+gzip"],
                        diff_ids=["sha256:" + hashlib.sha256(tar).hexdigest()])
    small = [p for p, d in files.items() if len(d) == 5000]
    path = small[len(small) // 3]
    return "bench/gzip:v1", "/" + path, files[path]


def _bare_estargz_image(registry, work: str) -> tuple[str, str, bytes]:
    import layerfs
    from layerfs.commit import commit
    from layerfs.example import build_example
    base = build_example(os.path.join(work, "base"))
    with layerfs.open(base, upper=os.path.join(work, "up")) as fs:
        fs.write_bytes("/big", random.Random(9).randbytes(3 << 20))
        fs.write_bytes("/small", b"small\n")
        result = commit(fs, os.path.join(work, "out"), compression="estargz")
    registry.push_without_toc_annotations(result.dest, "bench/bare", "v1")
    return "bench/bare:v1", "/small", b"small\n"


def main() -> None:
    work = tempfile.mkdtemp(prefix="layerfs-bench-")
    registry = proxy = None
    try:
        registry = Registry(os.path.join(work, "registry"))
        proxy = CountingProxy(registry.url)
        for name, make, budget in (("gzip", _gzip_image, "8M"),
                                   ("estargz-bare", _bare_estargz_image, "1G")):
            repo, path, expected = make(registry, work)
            ref = f"docker://{proxy.host}/{repo}"
            env = dict(os.environ, LAYERFS_CACHE_DIR=os.path.join(work, "cache-" + name),
                       LAYERFS_CACHE_SIZE=budget)
            for round_ in ("first", "second"):
                proxy.reset()
                seconds, out = _cat(ref, path, env)
                assert out == expected
                print(f"{name:13} {round_:6} cat: {proxy.blob_bytes:>10} B requested, "
                      f"{proxy.blob_requests:3} requests, {seconds:.2f} s")
    finally:
        if proxy is not None:
            proxy.close()
        if registry is not None:
            registry.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
