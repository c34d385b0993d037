"""Test your own layer tools with layerfs's generators and reference model.

- :mod:`~layerfs.testing.layers`: the abstract description of a layer
  (:class:`Member`, :class:`Layer`) and small constructors;
- :mod:`~layerfs.testing.strategies`: hypothesis strategies
  (:func:`layer_stacks`, :func:`layers`, :func:`invalid_layer_stacks`);
- :mod:`~layerfs.testing.model`: the reference model, :func:`apply_stack`;
- :mod:`~layerfs.testing.writers`: :func:`write_layer`, :func:`write_image`;
- :mod:`~layerfs.testing.view`: :func:`snapshot` of a layerfs filesystem or a
  directory, :func:`diff_views`, :func:`assert_views_equal`;
- :mod:`~layerfs.testing.oracle`: kernel overlayfs as a second opinion;
- :mod:`~layerfs.testing.operations`: random sequences of write operations
  (:func:`~layerfs.testing.operations.operation_lists`) and :func:`apply`,
  to drive a writable tool and a reference the same way.

Importing this package needs neither hypothesis nor FUSE; the strategies are
imported (with hypothesis) on first use.  See docs/testing.md.
"""

from layerfs.testing.layers import (Layer, Member, device, directory, fifo, file, hardlink,
                                    opaque, symlink, whiteout)
from layerfs.testing.model import ModelError, ModelNode, apply_stack
from layerfs.testing.view import assert_views_equal, diff_views, snapshot
from layerfs.testing.writers import tar_bytes, write_image, write_layer

_STRATEGIES = ("layers", "layer_stacks", "invalid_layer_stacks", "paths", "spellings")
_LAZY_MODULES = ("strategies", "operations")

__all__ = ["Layer", "Member", "device", "directory", "fifo", "file", "hardlink", "opaque",
           "symlink", "whiteout", "ModelError", "ModelNode", "apply_stack",
           "assert_views_equal", "diff_views", "snapshot", "tar_bytes", "write_image",
           "write_layer", *_STRATEGIES]


def __getattr__(name):
    if name in _LAZY_MODULES:
        import importlib
        return importlib.import_module(f"layerfs.testing.{name}")
    if name in _STRATEGIES:
        from layerfs.testing import strategies
        return getattr(strategies, name)
    raise AttributeError(f"module 'layerfs.testing' has no attribute {name!r}")
