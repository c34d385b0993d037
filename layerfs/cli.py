"""The ``layerfs`` command.  The only place that prints errors.

IMAGE, wherever a command takes it, is an OCI image layout (directory or
tar), a ``docker save`` archive, or several layer files, base first, given as
consecutive arguments: ``layerfs cat base.tar app.tar.zst /etc/os-release``.
Every error is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import stat as _stat
import sys
from typing import Optional, Sequence

import attrs

from . import fs as layerfs_fs
from .entry import kind_name
from .errors import ImageError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70


class ProgressBar:
    """A one-line progress bar on a terminal's stderr; silent elsewhere."""

    def __init__(self, label: str, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self._shown = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        percent = min(100, done * 100 // total)
        if percent == self._shown:
            return
        self._shown = percent
        filled = percent // 4
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (25 - filled)}] "
                          f"{percent:3d}% {human_size(done)}/{human_size(total)}")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._shown >= 0:
            self.stream.write("\r\033[K")
            self.stream.flush()


def human_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def image_source(arguments: Sequence[str]):
    """One IMAGE argument as is; several as a list of layer files."""
    return arguments[0] if len(arguments) == 1 else list(arguments)


def open_image_fs(args, arguments: Sequence[str]):
    progress = ProgressBar("indexing")
    try:
        return layerfs_fs.open(image_source(arguments), tag=args.tag,
                               platform=args.platform, cache=cache_from(args),
                               progress=progress)
    finally:
        progress.finish()


def cache_from(args):
    if args.cache_dir is None:
        return None
    from .layer import IndexCache
    return IndexCache(args.cache_dir)


def split_ls_arguments(arguments: list[str]) -> tuple[list[str], str]:
    """``ls IMAGE... [PATH]``: with several arguments, the last one is the
    PATH inside the image unless it names an existing file on the host
    (a layer file)."""
    if len(arguments) > 1 and not os.path.isfile(arguments[-1]):
        return arguments[:-1], arguments[-1]
    return arguments, "/"


# -- commands ----------------------------------------------------------

def cmd_ls(args) -> int:
    images, path = split_ls_arguments(args.image)
    with open_image_fs(args, images) as fs:
        node = fs.node(path)
        if node.children is None:
            print_entry(fs, path, os.path.basename(path), args.long)
            return 0
        list_directory(fs, path, args.long, args.recursive, first=True)
    return 0


def list_directory(fs, path: str, long: bool, recursive: bool, first: bool) -> None:
    if recursive:
        if not first:
            print()
        print(f"{path}:")
    names = sorted(fs.listdir(path))
    prefix = path.rstrip("/")
    for name in names:
        print_entry(fs, f"{prefix}/{name}", name, long)
    if recursive:
        for name in names:
            child = f"{prefix}/{name}"
            if fs.lstat(child).st_mode & 0o170000 == _stat.S_IFDIR:
                list_directory(fs, child, long, recursive, first=False)


def print_entry(fs, path: str, name: str, long: bool) -> None:
    if not long:
        print(name)
        return
    st = fs.lstat(path)
    when = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
    size = (f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
            if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode) else str(st.st_size))
    line = (f"{_stat.filemode(st.st_mode)} {st.st_nlink:>3} {st.st_uid:>5} {st.st_gid:>5} "
            f"{size:>10} {when:%Y-%m-%d %H:%M} {name}")
    if _stat.S_ISLNK(st.st_mode):
        line += f" -> {fs.readlink(path)}"
    print(line)


def cmd_cat(args) -> int:
    with open_image_fs(args, args.image) as fs:
        out = sys.stdout.buffer
        for path in args.path:
            with fs.open(path, "rb") as source:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
        out.flush()
    return 0


def cmd_stat(args) -> int:
    with open_image_fs(args, args.image) as fs:
        st = fs.stat(args.path, follow_symlinks=args.follow)
        record = {
            "path": args.path, "type": kind_name(st.st_mode),
            "mode": f"{_stat.S_IMODE(st.st_mode):04o}", "size": st.st_size,
            "uid": st.st_uid, "gid": st.st_gid, "inode": st.st_ino,
            "links": st.st_nlink, "mtime_ns": st.st_mtime_ns,
        }
        if _stat.S_ISLNK(st.st_mode):
            record["target"] = fs.readlink(args.path)
        if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode):
            record["device"] = f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
        xattrs = fs.listxattr(args.path, follow_symlinks=args.follow)
        if xattrs:
            record["xattrs"] = sorted(xattrs)
        if args.json:
            print(json.dumps(record, indent=2))
        else:
            for key, value in record.items():
                print(f"{key + ':':<10}{value}")
    return 0


def cmd_inspect(args) -> int:
    with open_image_fs(args, args.image) as fs:
        report = inspect_report(fs)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    image = report["image"]
    print(f"source:   {image['source']} ({image['kind']})")
    for key in ("ref", "platform", "manifest_digest", "config_digest", "chain_id"):
        if image.get(key):
            print(f"{key + ':':<10}{image[key]}")
    for number, layer in enumerate(report["layers"]):
        print(f"\nlayer {number}: {layer['digest']}")
        print(f"  media type: {layer['media_type'] or '-'} ({layer['compression']})")
        print(f"  size:       {human_size(layer['size'])} "
              f"({human_size(layer['uncompressed_size'])} uncompressed)")
        print(f"  diff_id:    {layer['diff_id']}")
        print(f"  entries:    {layer['entries']}: {len(layer['added'])} added, "
              f"{len(layer['changed'])} changed, {len(layer['deleted'])} deleted")
        if args.verbose:
            for label in ("added", "changed", "deleted"):
                for path in layer[label]:
                    print(f"    {label[0].upper()} {path}")
    return 0


def inspect_report(fs) -> dict:
    image = fs.image
    layers = []
    for layer, changes in zip(fs.layers, fs.layer_changes()):
        layers.append({
            "digest": layer.digest, "diff_id": layer.diff_id,
            "media_type": layer.media_type, "compression": layer.compression,
            "size": layer.size, "uncompressed_size": layer.uncompressed_size,
            "entries": layer.entry_count, "added": changes.added,
            "changed": changes.changed, "deleted": changes.deleted,
        })
    return {
        "image": {
            "source": image.source, "kind": image.kind, "ref": image.ref,
            "platform": image.platform, "manifest_digest": image.manifest_digest,
            "config_digest": image.config_digest, "chain_id": image.chain_id(),
        },
        "config": image.config,
        "layers": layers,
    }


def cmd_export(args) -> int:
    with open_image_fs(args, args.image) as fs:
        progress = ProgressBar("exporting")
        try:
            fs.export(args.out, compression=args.compression, progress=progress)
        finally:
            progress.finish()
    return 0


def open_with_upper(args, readonly: bool = False):
    """The image with the existing upper ``args.upper``; never creates it.
    *readonly*: read it as it is, beside a writer (a mount) if there is one."""
    from .upperformat import check_upper
    check_upper(os.path.abspath(args.upper))
    progress = ProgressBar("indexing")
    try:
        return layerfs_fs.open(image_source(args.image), upper=args.upper, tag=args.tag,
                               platform=args.platform, cache=cache_from(args),
                               progress=progress, readonly=readonly)
    finally:
        progress.finish()


def cmd_diff(args) -> int:
    with open_with_upper(args, readonly=True) as fs:
        changes = fs.diff()
    if args.json:
        print(json.dumps([attrs.asdict(change) for change in changes], indent=2))
        return 0
    letters = {"added": "A", "modified": "C", "deleted": "D"}
    for change in changes:
        print(f"{letters[change.change]} {change.path}")
    return 0


def cmd_commit(args) -> int:
    from .commit import commit
    from .errors import UpperError
    try:
        fs = open_with_upper(args)
    except UpperError as error:
        if error.errno != errno.EBUSY:
            raise
        # Policy: commit holds the writer's lock (docs/upper-format.md).
        raise UpperError(error.errno, f"{error}; unmount it before committing") from None
    with fs:
        progress = ProgressBar("committing")
        try:
            compression = None if args.compression == "none" else args.compression
            result = commit(fs, args.dest, compression=compression, tag=args.tag_new,
                            message=args.message, progress=progress)
        finally:
            progress.finish()
    print(result.manifest_digest)
    return 0


def cmd_example(args) -> int:
    from .example import build_example
    print(build_example(args.dest))
    return 0


def cmd_mount(args) -> int:
    from .mount import mount
    mount(image_source(args.image), args.mountpoint, upper=args.upper,
          foreground=args.foreground, options=args.options, tag=args.tag,
          platform=args.platform, cache_dir=args.cache_dir)
    return 0


def cmd_umount(args) -> int:
    from .mount import umount
    umount(args.mountpoint)
    return 0


# -- argument parsing and the error boundary ----------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfs",
        description="Read container images as one filesystem, without extracting them.",
        epilog="IMAGE is an OCI image layout (directory or tar), a docker-save "
               "archive, or several layer files, base first.")
    parser.add_argument("--version", action="version", version=f"layerfs {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, function, help_text, tag_option="--tag"):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(function=function)
        sub.add_argument(tag_option, dest="tag", metavar="T",
                         help="choose the image's manifest with this tag")
        sub.add_argument("--platform", help="choose the manifest for OS/ARCH[/VARIANT] "
                                            "(default: this machine's)")
        sub.add_argument("--cache-dir", help="index cache directory (default: "
                                             "$LAYERFS_CACHE_DIR or ~/.cache/layerfs)")
        return sub

    sub = command("ls", cmd_ls, "list a directory of the image")
    sub.add_argument("-l", dest="long", action="store_true", help="long listing")
    sub.add_argument("-R", dest="recursive", action="store_true", help="recurse")
    sub.add_argument("image", nargs="+", metavar="IMAGE [PATH]")

    sub = command("cat", cmd_cat, "print a file of the image")
    sub.add_argument("image", nargs="+", metavar="IMAGE")
    sub.add_argument("path", nargs=1, metavar="PATH")

    sub = command("stat", cmd_stat, "show a path's metadata")
    sub.add_argument("-L", dest="follow", action="store_true",
                     help="follow a symlink in the last component")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("image", nargs="+", metavar="IMAGE")
    sub.add_argument("path", metavar="PATH")

    sub = command("inspect", cmd_inspect, "describe the image and what each layer changes")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("-v", "--verbose", action="store_true",
                     help="list every added, changed and deleted path")
    sub.add_argument("image", nargs="+", metavar="IMAGE")

    sub = command("export", cmd_export, "write the flattened image as one tar")
    sub.add_argument("--compression", choices=["gzip", "zstd"])
    sub.add_argument("image", nargs="+", metavar="IMAGE")
    sub.add_argument("out", metavar="OUT.tar")

    sub = command("diff", cmd_diff, "list what an upper directory changes in the image")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("image", nargs="+", metavar="IMAGE")
    sub.add_argument("upper", metavar="UPPER")

    sub = command("commit", cmd_commit, "write an upper directory as a new layer and image "
                                        "(an OCI layout at DEST)", tag_option="--from-tag")
    sub.add_argument("--tag", dest="tag_new", metavar="T", help="tag of the new image")
    sub.add_argument("--compression", choices=["zstd", "gzip", "none"], default="zstd",
                     type=str.lower)
    sub.add_argument("-m", "--message", help="a comment for the image history")
    sub.add_argument("image", nargs="+", metavar="IMAGE")
    sub.add_argument("upper", metavar="UPPER")
    sub.add_argument("dest", metavar="DEST")

    sub = commands.add_parser("example", help="write a small example image (an OCI layout)",
                              description="write a small example image (an OCI layout)")
    sub.set_defaults(function=cmd_example)
    sub.add_argument("dest", metavar="DIR")

    sub = command("mount", cmd_mount, "mount the image with FUSE (read-only, or "
                                      "copy-on-write with --upper)")
    sub.add_argument("-f", "--foreground", action="store_true",
                     help="serve in the foreground until unmounted or interrupted")
    sub.add_argument("-o", dest="options", action="append", default=[],
                     metavar="OPTION[,OPTION...]", help="FUSE mount options (allow_other, ...)")
    sub.add_argument("--upper", metavar="DIR", help="keep changes in DIR (copy-on-write)")
    sub.add_argument("image", nargs="+", metavar="IMAGE")
    sub.add_argument("mountpoint", metavar="MOUNTPOINT")

    sub = commands.add_parser("umount", help="unmount a layerfs mount",
                              description="unmount a layerfs mount")
    sub.set_defaults(function=cmd_umount)
    sub.add_argument("mountpoint", metavar="MOUNTPOINT")
    return parser


def version() -> str:
    from . import __version__
    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.function(args)
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``layerfs cat ... | head``): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ImageError) as error:
        print(f"layerfs: {describe_error(error)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # the one place an unexpected error is caught
        print(f"layerfs: internal error: {type(error).__name__}: {error} "
              f"(please report it)", file=sys.stderr)
        if os.environ.get("LAYERFS_DEBUG"):
            raise
        return EXIT_INTERNAL


def describe_error(error: OSError) -> str:
    """``[Errno 2] No such file or directory: '/x'`` -> ``/x: No such file
    or directory``; layerfs's own errors are already one clear line."""
    if isinstance(error, ImageError) or error.strerror is None:
        return str(error)
    where = error.filename
    return f"{where}: {error.strerror}" if where else error.strerror


if __name__ == "__main__":
    sys.exit(main())
