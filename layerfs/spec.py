"""layerfs as an fsspec filesystem: files inside an image for pandas, dask
and everything else that reads through fsspec, without extracting them.

Registered under the protocol ``layerfs`` (the ``fsspec.specs`` entry
point), read-only::

    fsspec.filesystem("layerfs", image="oci:image-layout:tag")
    fsspec.open("layerfs:///etc/os-release", image="docker://debian:12").open()

*image* is written in the grammar of :mod:`layerfs.reference`; ``layers``
(a list of layer files, base first) may stand instead.  fsspec's derived
operations (``find``, ``glob``, ``walk``, ``cat``, ``du``...) are built on
:meth:`LayerFileSystem.ls` and :meth:`LayerFileSystem.info`, which answer
from the image's merged view.
"""

from __future__ import annotations

import errno
import stat as _stat
from typing import Optional

import fsspec

import layerfs
from .entry import kind_name
from .errors import path_error, ReadOnlyError


class LayerFileSystem(fsspec.AbstractFileSystem):
    """One image, read-only, as an fsspec filesystem."""

    protocol = "layerfs"
    root_marker = "/"

    def __init__(self, image=None, *, layers=None, tag: Optional[str] = None,
                 platform: Optional[str] = None, cache=None, **storage_options):
        super().__init__(**storage_options)
        if (image is None) == (layers is None):
            raise ValueError("layerfs: give image= (a reference) or layers= (layer files)")
        self.view = layerfs.open(image if layers is None else list(layers), tag=tag,
                                 platform=platform, cache=cache)

    @classmethod
    def _strip_protocol(cls, path):
        path = super()._strip_protocol(path)
        return "/" + path.strip("/") if path not in ("", "/") else "/"

    def info(self, path, **kwargs) -> dict:
        path = self._strip_protocol(path)
        return self._details(path, self.view.lstat(path))

    def _details(self, path: str, st) -> dict:
        kind = "directory" if _stat.S_ISDIR(st.st_mode) else (
            "file" if _stat.S_ISREG(st.st_mode) else "other")
        details = {"name": path, "size": st.st_size if kind == "file" else 0, "type": kind,
                   "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                   "mtime": st.st_mtime, "ino": st.st_ino, "nlink": st.st_nlink,
                   "kind": kind_name(st.st_mode)}
        if _stat.S_ISLNK(st.st_mode):
            details["destination"] = self.view.readlink(path)
            details["islink"] = True
            try:      # fsspec's walk descends into what a link points at, as ls -L would
                target = self.view.stat(path)
            except OSError:
                return details
            if _stat.S_ISDIR(target.st_mode):
                details["type"] = "directory"
            elif _stat.S_ISREG(target.st_mode):
                details.update(type="file", size=target.st_size)
        return details

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        if not self.view.is_dir(path):
            entry = self.info(path)
            return [entry] if detail else [entry["name"]]
        prefix = path.rstrip("/")
        names = sorted(self.view.listdir(path))
        if not detail:
            return [f"{prefix}/{name}" for name in names]
        return [self._details(f"{prefix}/{name}", self.view.lstat(f"{prefix}/{name}"))
                for name in names]

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs):
        path = self._strip_protocol(path)
        if "r" not in mode or "+" in mode:
            raise ReadOnlyError(path)
        return self.view.open(path, "rb")

    def cat_file(self, path, start=None, end=None, **kwargs) -> bytes:
        path = self._strip_protocol(path)
        with self.view.open(path, "rb") as stream:
            size = self.view.stat(path).st_size
            start = 0 if start is None else (start if start >= 0 else max(0, size + start))
            end = size if end is None else (end if end >= 0 else max(0, size + end))
            stream.seek(start)
            return stream.read(max(0, end - start))

    def _refuse(self, path, *args, **kwargs):
        raise path_error(errno.EROFS, self._strip_protocol(path))

    mkdir = makedirs = rm_file = rmdir = touch = _refuse

    def close(self) -> None:
        self.view.close()
