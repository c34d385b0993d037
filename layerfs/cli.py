"""The ``layerfs`` command.  The only place that prints errors.

IMAGE, wherever a command takes it, is one argument in the grammar of
:mod:`layerfs.reference`: a transport prefix decides (``docker://REF``,
``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker-archive:FILE``), and
a bare argument is a path to a layout, an archive or a single layer.  A stack
of layer files is a repeated ``--layer FILE`` (base first) in place of IMAGE:
``layerfs cat --layer base.tar --layer app.tar.zst /etc/os-release``.  Which
argument means what is decided by position and prefix alone, never by what
exists on the host.  Every error is one line on stderr and a non-zero exit
status (2 for a usage error).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import math
import shlex
import os
import stat as _stat
import sys
from typing import Optional, Sequence

import attrs

from . import fs as layerfs_fs
from .entry import kind_name
from .errors import ImageError, InvalidReferenceError
from .reference import Reference, layer_stack, parse_reference

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


class UsageError(Exception):
    """A command line that does not say what to do; printed as one line."""


@attrs.frozen
class Operands:
    """A command's positional arguments once IMAGE (or the ``--layer``
    stack) is taken out: ``image`` is a :class:`Reference`, ``rest`` the
    arguments after it, in order."""
    image: Reference
    rest: list


def take_image(args, names: Sequence[str], optional: int = 0) -> Operands:
    """The IMAGE argument (or the ``--layer`` stack) and the *names* that
    follow it, the last *optional* of which may be left out.  The shared
    grammar of every command: position and prefix decide, never the host."""
    operands = list(args.operands)
    layers = args.layers or []
    wanted_max, wanted_min = len(names), len(names) - optional
    if layers:
        ref = layer_stack(layers)
        rest = operands
        if len(rest) > wanted_max:
            raise UsageError(f"{args.command}: too many arguments ({' '.join(rest)}): "
                             "with --layer, give no IMAGE")
    else:
        if not operands:
            raise UsageError(f"{args.command}: IMAGE is missing (or --layer FILE, "
                             "repeated, base first)")
        if len(operands) - 1 > wanted_max:
            _refuse_old_stack(args.command, operands, len(operands) - wanted_max)
        try:
            ref = parse_reference(operands[0])
        except InvalidReferenceError as error:
            raise UsageError(f"{args.command}: {error}") from None
        rest = operands[1:]
    if len(rest) < wanted_min:
        missing = " ".join(names[len(rest):wanted_min])
        raise UsageError(f"{args.command}: {missing} is missing")
    for name, value in zip(names, rest):
        if name == "PATH" and not value.startswith("/"):
            hint = ""
            if not layers:
                hint = ("; if these are layer files to stack, write: "
                        + _stack_spelling(args.command, operands, len(operands)))
            raise UsageError(f"{args.command}: PATH inside the image must start with "
                             f"/: {value!r}{hint}")
    tag = getattr(args, "tag", None)
    if tag is not None:
        if ref.transport in ("docker", "layers"):
            raise UsageError(f"{args.command}: --tag chooses among the images of a "
                             f"layout or archive; {_what(ref)} takes none")
        if ref.tag is not None or ref.digest is not None:
            raise UsageError(f"{args.command}: {ref} already names a tag; give it "
                             "either there or with --tag, not both")
        ref = ref.with_selector(tag)
    return Operands(ref, rest)


_LAYER_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".gz", ".zst")


def _what(ref: Reference) -> str:
    if ref.transport == "layers":
        return "a --layer stack"
    return f"{ref} (a registry reference: write docker://REPO:TAG or @DIGEST)"


def _refuse_old_stack(command: str, operands: list, layer_count: int) -> None:
    raise UsageError(
        f"{command}: too many arguments: IMAGE is one argument; to stack layer "
        f"files, write --layer FILE for each, base first: "
        f"{_stack_spelling(command, operands, layer_count)}")


def _stack_spelling(command: str, operands: list, layer_count: int) -> str:
    layers = " ".join(f"--layer {name}" for name in operands[:layer_count])
    rest = " ".join(operands[layer_count:])
    return f"layerfs {command} {layers}{' ' + rest if rest else ''}"


def open_image_fs(args, image: Reference, upper=None):
    progress = ProgressBar("fetching" if image.is_remote else "indexing")
    try:
        return layerfs_fs.open(image, upper=upper, platform=args.platform,
                               cache=cache_from(args), progress=progress,
                               registry=registry_options(args))
    finally:
        progress.finish()


def registry_options(args):
    from .registry import Options
    return Options(authfile=getattr(args, "authfile", None),
                   tls_verify=getattr(args, "tls_verify", True),
                   offline=getattr(args, "offline", False),
                   cert_dir=getattr(args, "cert_dir", None),
                   registries_conf=getattr(args, "registries_conf", None),
                   **({"lazy": False} if getattr(args, "whole_blobs", False) else {}))


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def cache_from(args):
    """The cache of ``--cache-dir`` / ``--cache-size``; with
    ``--max-layer-size``, the limit for every layer this run opens."""
    from .cache import parse_size
    from .compression import MAX_SIZE_ENV
    sizes = {}
    for option in ("cache_size", "max_layer_size"):
        text = getattr(args, option, None)
        if text is not None:
            try:
                sizes[option] = parse_size(text)
            except ValueError as error:
                raise UsageError(f"--{option.replace('_', '-')}: {error}") from None
    if "max_layer_size" in sizes:
        os.environ[MAX_SIZE_ENV] = str(sizes["max_layer_size"])
    if args.cache_dir is None and "cache_size" not in sizes:
        return None
    from .cache import IndexCache
    return IndexCache(args.cache_dir, size=sizes.get("cache_size"))


# -- commands ----------------------------------------------------------

def cmd_ls(args) -> int:
    operands = take_image(args, ["PATH"], optional=1)
    path = operands.rest[0] if operands.rest else "/"
    with open_image_fs(args, operands.image) as fs:
        try:
            node = fs.node(path)
        except FileNotFoundError:
            if not path.endswith(_LAYER_SUFFIXES) or args.layers:
                raise
            # ``ls a.tar /x/b.tar`` is ambiguous in text; only a name that
            # looks like a layer file earns the hint (the host is not asked).
            raise OSError(errno.ENOENT, "No such file or directory in the image; if "
                          "these are layer files to stack, write: " + _stack_spelling(
                              "ls", list(args.operands), len(args.operands)), path) from None
        if args.json:
            print(json.dumps(list_records(fs, path, node, args), indent=2))
        elif node.children is None:
            print_entry(fs, path, os.path.basename(path), args)
        else:
            list_directory(fs, path, args, first=True)
    return 0


def listed_names(fs, path: str, show_all: bool) -> list[str]:
    """A directory's names as ``ls`` shows them: sorted, dot names only
    with ``-a`` (which also shows ``.`` and ``..``)."""
    names = sorted(fs.listdir(path))
    return [".", ".."] + names if show_all else [n for n in names if not n.startswith(".")]


def child_path(path: str, name: str) -> str:
    if name == ".":
        return path
    if name == "..":
        return os.path.dirname(path.rstrip("/")) or "/"
    return f"{path.rstrip('/')}/{name}"


def list_directory(fs, path: str, args, first: bool) -> None:
    if args.recursive:
        if not first:
            print()
        print(f"{path}:")
    names = listed_names(fs, path, args.all)
    for name in names:
        print_entry(fs, child_path(path, name), name, args)
    if args.recursive:
        for name in names:
            child = child_path(path, name)
            if name not in (".", "..") and _stat.S_ISDIR(fs.lstat(child).st_mode):
                list_directory(fs, child, args, first=False)


def list_records(fs, path: str, node, args) -> list[dict]:
    """``ls --json``: one record a listed entry (the ``stat --json`` fields);
    with ``-R``, every entry beneath PATH."""
    if node.children is None:
        return [stat_record(fs, path, follow=False)]
    records = []
    for name in listed_names(fs, path, args.all):
        child = child_path(path, name)
        records.append(dict(stat_record(fs, child, follow=False), name=name))
        if (args.recursive and name not in (".", "..")
                and _stat.S_ISDIR(fs.lstat(child).st_mode)):
            records.extend(list_records(fs, child, fs.node(child), args))
    return records


def print_entry(fs, path: str, name: str, args) -> None:
    if not args.long:
        print(name)
        return
    st = fs.lstat(path)
    when = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
    if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode):
        size = f"{os.major(st.st_rdev)}, {os.minor(st.st_rdev)}"
    else:
        size = short_size(st.st_size) if args.human else str(st.st_size)
    line = (f"{_stat.filemode(st.st_mode)} {st.st_nlink:>3} {st.st_uid:>5} {st.st_gid:>5} "
            f"{size:>10} {when:%Y-%m-%d %H:%M} {name}")
    if _stat.S_ISLNK(st.st_mode):
        line += f" -> {fs.readlink(path)}"
    print(line)


def short_size(count: int) -> str:
    """Sizes as ``ls -lh`` prints them: 999, 1.0K, 12K, 3.4M (powers of 1024,
    rounded up, one decimal below 10)."""
    value = float(count)
    for unit in ("", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            break
        value /= 1024
    if not unit:
        return str(count)
    if value < 10:
        return f"{math.ceil(value * 10) / 10:.1f}{unit}"
    return f"{math.ceil(value):.0f}{unit}"


def cmd_cat(args) -> int:
    operands = take_image(args, ["PATH"])
    with open_image_fs(args, operands.image) as fs:
        out = sys.stdout.buffer
        for path in operands.rest:
            with fs.open(path, "rb") as source:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
        out.flush()
    return 0


def stat_record(fs, path: str, follow: bool) -> dict:
    """What ``stat --json`` prints for *path*: numbers as numbers, times in
    nanoseconds and as RFC 3339 dates."""
    st = fs.stat(path, follow_symlinks=follow)
    record = {
        "path": path, "type": kind_name(st.st_mode),
        "mode": f"{_stat.S_IMODE(st.st_mode):04o}", "size": st.st_size,
        "uid": st.st_uid, "gid": st.st_gid, "inode": st.st_ino,
        "links": st.st_nlink, "mtime_ns": st.st_mtime_ns, "mtime": iso_date(st.st_mtime_ns),
    }
    if _stat.S_ISLNK(st.st_mode):
        record["target"] = fs.readlink(path)
    if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode):
        record["device"] = f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
    xattrs = fs.listxattr(path, follow_symlinks=follow)
    if xattrs:
        record["xattrs"] = sorted(xattrs)
    return record


def iso_date(ns: int) -> str:
    """``2023-11-14 22:13:20.000000001 +0000``, as coreutils ``stat`` prints
    a time (in UTC: an image has no time zone)."""
    seconds, fraction = divmod(ns, 10**9)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{moment:%Y-%m-%d %H:%M:%S}.{fraction:09d} +0000"


# ``stat --format`` directives, as coreutils ``stat -c`` spells them.
STAT_FORMAT = {
    "n": lambda r, st: r["path"], "s": lambda r, st: str(st.st_size),
    "a": lambda r, st: f"{_stat.S_IMODE(st.st_mode):o}",
    "A": lambda r, st: _stat.filemode(st.st_mode), "F": lambda r, st: r["type"],
    "u": lambda r, st: str(st.st_uid), "g": lambda r, st: str(st.st_gid),
    "i": lambda r, st: str(st.st_ino), "h": lambda r, st: str(st.st_nlink),
    "y": lambda r, st: r["mtime"], "Y": lambda r, st: str(st.st_mtime_ns // 10**9),
    "N": lambda r, st: (f"'{r['path']}' -> '{r['target']}'" if "target" in r
                        else f"'{r['path']}'"),
    "%": lambda r, st: "%",
}


def format_stat(template: str, record: dict, st: os.stat_result) -> str:
    out, i = [], 0
    while i < len(template):
        char = template[i]
        if char == "%" and i + 1 < len(template):
            directive = template[i + 1]
            if directive not in STAT_FORMAT:
                raise UsageError(f"stat: unknown directive %{directive} in --format "
                                 f"(known: {' '.join('%' + d for d in STAT_FORMAT)})")
            out.append(STAT_FORMAT[directive](record, st))
            i += 2
        elif char == "\\" and template[i + 1:i + 2] in ("n", "t"):
            out.append("\n" if template[i + 1] == "n" else "\t")
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def cmd_stat(args) -> int:
    operands = take_image(args, ["PATH"])
    with open_image_fs(args, operands.image) as fs:
        path = operands.rest[0]
        record = stat_record(fs, path, args.follow)
        if args.json:
            print(json.dumps(record, indent=2))
        elif args.format is not None:
            print(format_stat(args.format, record, fs.stat(path, follow_symlinks=args.follow)))
        else:
            for key, value in record.items():
                print(f"{key + ':':<10}{value}")
    return 0


def cmd_inspect(args) -> int:
    operands = take_image(args, [])
    if operands.image.is_remote and not args.verbose:
        return inspect_remote(args, operands.image)
    with open_image_fs(args, operands.image) as fs:
        report = inspect_report(fs)
        settings = fs.image.settings
    if args.json:
        if not args.paths:
            for layer in report["layers"]:
                for label in ("added", "changed", "deleted"):
                    layer[label] = len(layer[label])
        print(json.dumps(report, indent=2))
        return 0
    image = report["image"]
    print_field("source", f"{image['source']} ({image['kind']})")
    for key in ("ref", "platform", "manifest_digest", "config_digest", "chain_id"):
        if image.get(key):
            print_field(key, image[key])
    print_settings(settings)
    for number, layer in enumerate(report["layers"]):
        print(f"\nlayer {number}: {layer['digest']}")
        print(f"  media type: {layer['media_type'] or '-'} ({layer['compression']}"
              f"{', ' + layer['toc'] if layer.get('toc') else ''})")
        unpacked = layer["uncompressed_size"]     # None: a TOC layer, never decompressed
        print(f"  size:       {human_size(layer['size'])} "
              f"({human_size(unpacked) if unpacked is not None else 'unknown'} uncompressed)")
        print(f"  diff_id:    {layer['diff_id']}")
        print(f"  entries:    {layer['entries']}: {len(layer['added'])} added, "
              f"{len(layer['changed'])} changed, {len(layer['deleted'])} deleted")
        made_by = layer["history"] or {}
        if made_by.get("created"):
            print(f"  created:    {made_by['created']}")
        if made_by.get("created_by"):
            print(f"  created by: {one_line(made_by['created_by'])}")
        if args.verbose or args.paths:
            for label in ("added", "changed", "deleted"):
                for path in layer[label]:
                    print(f"    {label[0].upper()} {path}")
    return 0


def print_settings(settings: dict) -> None:
    """What a container of the image runs with, as ``docker inspect`` users
    look for it: command, user, directory, environment, ports, labels."""
    for key in ("Entrypoint", "Cmd"):
        if isinstance(settings.get(key), list):
            print_field(key, shlex.join(str(part) for part in settings[key]))
    for key in ("WorkingDir", "User", "StopSignal"):
        if settings.get(key):
            print_field(key, settings[key])
    env = settings.get("Env")
    if isinstance(env, list) and env:
        print("Env:")
        for item in env:
            print(f"  {item}")
    ports = settings.get("ExposedPorts")
    if isinstance(ports, dict) and ports:
        print_field("ExposedPorts", " ".join(sorted(ports)))
    labels = settings.get("Labels")
    if isinstance(labels, dict) and labels:
        print("Labels:")
        width = max(len(str(name)) for name in labels)
        for name, value in sorted((str(k), str(v)) for k, v in labels.items()):
            print(f"  {name:<{width}}  {value}")


def print_field(key: str, value) -> None:
    """One ``key: value`` line of ``inspect``, values in one column."""
    print(f"{key + ':':<17}{value}")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def inspect_remote(args, ref: Reference) -> int:
    """A registry image's reference, digests, platforms and config, from
    its manifest and config alone: no layer is fetched (``-v`` does)."""
    from .image import open_image
    image = open_image(ref, platform=args.platform, cache=cache_from(args),
                       registry=registry_options(args), read_layers=False)
    report = {
        "reference": str(ref), "resolved_digest": image.resolved_digest,
        "manifest_digest": image.manifest_digest, "platform": image.platform,
        "platforms": [{"platform": platform, "digest": digest}
                      for _, platform, digest in image.offered],
        "config_digest": image.config_digest, "chain_id": image_chain_id(image),
        "layers": [{"digest": d.get("digest"), "size": d.get("size"),
                    "media_type": d.get("mediaType")}
                   for d in image.manifest.get("layers", [])],
        "config": image.config,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"reference: {report['reference']}")
    print(f"resolved:  {report['resolved_digest']}")
    print(f"manifest:  {report['manifest_digest']} ({report['platform'] or '-'})")
    if len(report["platforms"]) > 1:
        print("platforms: " + ", ".join(f"{p['platform']}" for p in report["platforms"]))
    print(f"config:    {report['config_digest']}")
    print_settings(image.settings)
    for number, layer in enumerate(report["layers"]):
        size = human_size(layer["size"]) if isinstance(layer["size"], int) else "?"
        print(f"layer {number}:   {layer['digest']} {size} {layer['media_type'] or '-'}")
    return 0


def image_chain_id(image) -> str | None:
    from .image import chain_id
    diff_ids = (image.config.get("rootfs") or {}).get("diff_ids")
    return chain_id(diff_ids) if isinstance(diff_ids, list) else None


def inspect_report(fs) -> dict:
    image = fs.image
    layers = []
    for layer, changes, made_by in zip(fs.layers, fs.layer_changes(),
                                       image.layer_history()):
        layers.append({
            "digest": layer.digest, "diff_id": layer.diff_id,
            "media_type": layer.media_type, "compression": layer.compression,
            "size": layer.size, "uncompressed_size": layer.uncompressed_size,
            "toc": getattr(layer, "toc_format", None),
            "entries": layer.entry_count, "added": changes.added,
            "changed": changes.changed, "deleted": changes.deleted,
            "history": made_by,
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


EXPORT_EXTENSIONS = {".tar": "none", ".tar.gz": "gzip", ".tgz": "gzip",
                     ".tar.zst": "zstd", ".tar.zstd": "zstd", ".tzst": "zstd"}


def export_compression(out: str, chosen: Optional[str]) -> Optional[str]:
    """``--compression`` where given, else what OUT's extension says (none
    for ``-`` and for other names)."""
    if chosen is None:
        lowered = out.lower()
        chosen = next((kind for ext, kind in EXPORT_EXTENSIONS.items()
                       if lowered.endswith(ext)), "none")
    return None if chosen == "none" else chosen


def cmd_export(args) -> int:
    operands = take_image(args, ["OUT"])
    out = operands.rest[0]
    compression = export_compression(out, args.compression)
    if out == "-" and sys.stdout.isatty():
        raise UsageError("export: refusing to write a tar to a terminal; redirect it "
                         "or give a file name")
    with open_image_fs(args, operands.image) as fs:
        progress = ProgressBar("exporting")
        try:
            fs.export(sys.stdout.buffer if out == "-" else out, compression=compression,
                      progress=progress)
        finally:
            progress.finish()
        if out == "-":
            sys.stdout.buffer.flush()
    return 0


def open_upper_fs(args, image: Reference, upper: str, readonly: bool = False):
    """The image with the existing upper *upper*; never creates it.
    *readonly*: read it as it is, beside a writer (a mount) if there is one."""
    from .upperformat import check_upper
    check_upper(os.path.abspath(upper))
    progress = ProgressBar("indexing")
    try:
        return layerfs_fs.open(image, upper=upper, platform=args.platform,
                               cache=cache_from(args), progress=progress, readonly=readonly)
    finally:
        progress.finish()


def cmd_diff(args) -> int:
    operands = take_image(args, ["UPPER"])
    with open_upper_fs(args, operands.image, operands.rest[0], readonly=True) as fs:
        print_changes(fs.diff(), args.json)
    return 0


def print_changes(changes, as_json: bool) -> None:
    """``diff``'s output: a JSON list, or one ``A|C|D PATH`` line per change."""
    if as_json:
        print(json.dumps([attrs.asdict(change) for change in changes], indent=2))
        return
    letters = {"added": "A", "modified": "C", "deleted": "D"}
    for change in changes:
        print(f"{letters[change.change]} {change.path}")


def cmd_commit(args) -> int:
    operands = take_image(args, ["UPPER", "DEST"])
    upper, dest = operands.rest
    return commit_writable(lambda: open_upper_fs(args, operands.image, upper), dest, args,
                           tag=args.tag_new)


def commit_writable(open_writable, dest: str, args, tag: Optional[str]) -> int:
    """Commit the filesystem *open_writable()* opens (for writing: commit
    holds the writer's lock, docs/upper-format.md) to *dest*; print the
    new manifest's digest."""
    from .commit import commit
    from .errors import UpperError
    try:
        fs = open_writable()
    except UpperError as error:
        if error.errno != errno.EBUSY:
            raise
        raise UpperError(error.errno, f"{error}; unmount it before committing") from None
    with fs:
        progress = ProgressBar("committing")
        try:
            compression = None if args.compression == "none" else args.compression
            result = commit(fs, dest, compression=compression, tag=tag,
                            message=args.message, progress=progress)
        finally:
            progress.finish()
    print(result.manifest_digest)
    return 0


def cmd_cp(args) -> int:
    operands = take_image(args, ["PATH", "HOST_DEST"])
    path, dest = operands.rest
    with open_image_fs(args, operands.image) as fs:
        fs.extract(path, dest)
    return 0


def cmd_example(args) -> int:
    from .example import build_example
    print(build_example(args.dest, zstd=args.zstd))
    return 0


def cmd_mount(args) -> int:
    from .containercli import bind_after_mount, parsed_volumes, served_volumes
    from .mount import mount
    operands = take_image(args, ["MOUNTPOINT"])
    volumes = parsed_volumes(args)
    served = served_volumes(volumes, writable=args.upper is not None)
    cache_from(args)     # records --cache-size, passes --max-layer-size on
    progress = ProgressBar("indexing")
    try:
        mount(operands.image, operands.rest[0], upper=args.upper,
              foreground=args.foreground, options=args.options,
              platform=args.platform, cache_dir=args.cache_dir,
              registry=registry_options(args), progress=progress,
              log_file=args.log, log_level=args.log_level, volumes=served)
    finally:
        progress.finish()
    if not served:
        bind_after_mount(operands.rest[0], volumes)
    return 0


def cmd_umount(args) -> int:
    from .mount import umount, umount_all
    if args.all == (args.mountpoint is not None):
        print("layerfs umount: give a MOUNTPOINT or --all (one of them)", file=sys.stderr)
        return EXIT_USAGE
    if args.all:
        umount_all()
    else:
        umount(args.mountpoint)
    return 0


def cmd_mounts(args) -> int:
    from .mount import list_mounts, server_pid
    for mountpoint, source in list_mounts(every=args.every):
        pid = server_pid(mountpoint)
        print(f"{mountpoint}\t{source}\t{pid if pid is not None else '-'}")
    return 0


# -- argument parsing and the error boundary ----------------------------

IMAGE_HELP = ("IMAGE is one argument: docker://[HOST[:PORT]/]REPO[:TAG|@DIGEST], "
              "oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG], or a "
              "bare path to an OCI layout, an image archive or a single layer file. "
              "In place of IMAGE, --layer FILE (repeated, base first) stacks layer "
              "files. A PATH inside the image starts with /.")


OPERAND_HELP = {
    "PATH": "a path inside the image, absolute",
    "[PATH]": "a path inside the image, absolute (default: /)",
    "OUT.tar": "the tar to write, or - for standard output",
    "UPPER": "an existing upper directory (the writable layer's changes)",
    "DEST": "the OCI layout to write the new image into (created, or added to)",
    "MOUNTPOINT": "an empty directory to mount on",
    "HOST_DEST": "where to copy to on the host",
}


def operands_help(operands: str) -> str:
    """What each positional argument of a command is, for its help page."""
    described = ["IMAGE: the image (see below)"]
    described += [f"{name}: {OPERAND_HELP[name]}" for name in operands.split()
                  if name in OPERAND_HELP]
    return "; ".join(described)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfs",
        description="Read container images as one filesystem, without extracting them.",
        epilog=IMAGE_HELP)
    parser.add_argument("--version", action="version", version=f"layerfs {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, function, help_text, operands, tag_option="--tag", short_help=True):
        """A command taking IMAGE (or --layer FILE...) then *operands*;
        without *short_help*, ``-h`` is the command's own option (``ls -h``)
        and help is ``--help`` alone."""
        usage = (f"layerfs {name} [options] (IMAGE | --layer FILE [--layer FILE ...])"
                 f"{' ' + operands if operands else ''}")
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  usage=usage, epilog=IMAGE_HELP, add_help=short_help)
        if not short_help:
            sub.add_argument("--help", action="help", help="show this help message and exit")
        sub.set_defaults(function=function)
        sub.add_argument("operands", nargs="*", metavar="IMAGE " + operands if operands
                         else "IMAGE", help=operands_help(operands))
        sub.add_argument("--layer", dest="layers", action="append", metavar="FILE",
                         help="a layer file, in place of IMAGE; repeat to stack layers, "
                              "base first")
        sub.add_argument(tag_option, dest="tag", metavar="T",
                         help="choose the image with this tag or manifest digest in a "
                              "layout or archive (or write oci:DIR:T)")
        sub.add_argument("--platform", help="choose the manifest for OS/ARCH[/VARIANT] "
                                            "(default: this machine's)")
        sub.add_argument("--cache-dir", help="index cache directory (default: "
                                             "$LAYERFS_CACHE_DIR or ~/.cache/layerfs)")
        sub.add_argument("--cache-size", metavar="SIZE",
                         help="record a budget for the cache directory (500M, 20G; "
                              "default: $LAYERFS_CACHE_SIZE, else a tenth of its disk)")
        sub.add_argument("--max-layer-size", metavar="SIZE",
                         help="refuse a compressed layer that expands beyond SIZE "
                              "(default: $LAYERFS_MAX_LAYER_SIZE, else 64G)")
        add_registry_options(sub)
        sub.add_argument("--offline", action="store_true",
                         help="docker://: use only what is cached (a tag resolves to the "
                              "digest it had when last fetched)")
        return sub

    def add_registry_options(sub):
        sub.add_argument("--authfile", metavar="FILE",
                         help="docker://: credentials file (default: $REGISTRY_AUTH_FILE, "
                              "else the containers tools' auth.json, else docker's)")
        sub.add_argument("--tls-verify", type=parse_bool, default=True, metavar="BOOL",
                         help="docker://: check the registry's certificate and refuse plain "
                              "HTTP to hosts other than loopback (default: true)")
        sub.add_argument("--registries-conf", metavar="FILE",
                         help="docker://: mirrors, locations, insecure and blocked "
                              "registries (default: $CONTAINERS_REGISTRIES_CONF, else "
                              "~/.config/containers/registries.conf, else /etc/containers/)")
        sub.add_argument("--cert-dir", metavar="DIR",
                         help="docker://: CA certificates (*.crt) and a client certificate "
                              "(*.cert + *.key) for the registry (default: certs.d/HOST "
                              "under ~/.config/containers, /etc/containers, /etc/docker)")

    sub = command("ls", cmd_ls, "list a directory of the image (PATH: absolute, inside "
                  "the image; default /)", "[PATH]", short_help=False)
    sub.add_argument("-l", dest="long", action="store_true", help="long listing")
    sub.add_argument("-a", dest="all", action="store_true",
                     help="show names beginning with '.', and . and ..")
    sub.add_argument("-h", "--human-readable", dest="human", action="store_true",
                     help="with -l, sizes as 1.0K, 12M")
    sub.add_argument("-R", dest="recursive", action="store_true", help="recurse")
    sub.add_argument("--json", action="store_true",
                     help="one record per entry, the fields of stat --json")

    command("cat", cmd_cat, "print a file of the image", "PATH")

    sub = command("stat", cmd_stat, "show the metadata of paths inside the image "
                  "(absolute)", "PATH")
    sub.add_argument("-L", dest="follow", action="store_true",
                     help="follow a symlink in the last component")
    chosen = sub.add_mutually_exclusive_group()
    chosen.add_argument("--json", action="store_true", help="a JSON object")
    chosen.add_argument("-c", "--format", metavar="FORMAT",
                        help="print FORMAT, with coreutils stat's directives "
                             "%%n %%s %%a %%A %%F %%u %%g %%i %%h %%y %%Y %%N %%%%")

    sub = command("inspect", cmd_inspect, "describe the image and what each layer changes",
                  "")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("-v", "--verbose", action="store_true",
                     help="list every added, changed and deleted path")
    sub.add_argument("--paths", action="store_true",
                     help="with --json, the paths each layer adds, changes and deletes "
                          "(else their counts)")

    sub = command("export", cmd_export, "write the flattened image as one tar "
                  "(OUT: a file, or - for standard output)", "OUT.tar")
    sub.add_argument("--compression", choices=["none", "gzip", "zstd"], type=str.lower,
                     help="default: from OUT's extension (.tar.gz/.tgz: gzip, "
                          ".tar.zst: zstd), else none")

    command("cp", cmd_cp, "copy a file or a tree out of the image, as cp -a does (into "
                          "DEST if it is a directory, else as DEST; never over an existing "
                          "name)", "PATH HOST_DEST")

    sub = command("diff", cmd_diff, "list what an upper directory changes in the image",
                  "UPPER")
    sub.add_argument("--json", action="store_true")

    sub = command("commit", cmd_commit, "write an upper directory as a new layer and image "
                                        "(an OCI layout at DEST)", "UPPER DEST",
                  tag_option="--from-tag")
    sub.add_argument("--tag", dest="tag_new", metavar="T", help="tag of the new image")
    sub.add_argument("--compression", choices=["gzip", "zstd", "none", "estargz",
                                               "zstd:chunked"], default="gzip",
                     type=str.lower, help="of the new layer (default: %(default)s, which "
                                          "every tool reads; estargz and zstd:chunked "
                                          "add a table of contents for lazy reading and "
                                          "stay valid gzip and zstd)")
    sub.add_argument("-m", "--message", help="a comment for the image history")

    sub = commands.add_parser("example", help="write a small example image (an OCI layout)",
                              description="write a small example image (an OCI layout)")
    sub.set_defaults(function=cmd_example)
    sub.add_argument("dest", metavar="DIR", help="where to write the layout (created)")
    sub.add_argument("--zstd", action="store_true",
                     help="compress the last layer with zstd instead of gzip")

    sub = command("mount", cmd_mount, "mount the image with FUSE (read-only, or "
                                      "copy-on-write with --upper)", "MOUNTPOINT")
    sub.add_argument("-f", "--foreground", action="store_true",
                     help="serve in the foreground until unmounted or interrupted")
    sub.add_argument("-o", dest="options", action="append", default=[],
                     metavar="OPTION[,OPTION...]", help="FUSE mount options (allow_other, ...)")
    sub.add_argument("--upper", metavar="DIR", help="keep changes in DIR (copy-on-write)")
    from .containercli import add_volume_option
    add_volume_option(sub)
    sub.add_argument("--store", metavar="DIR", help="the store of named volumes")
    sub.add_argument("--log", metavar="FILE",
                     help="write the daemon's log to FILE (default: syslog)")
    sub.add_argument("--log-level", default="WARNING", type=str.upper,
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="the log's level (default: WARNING)")

    from .registrycli import add_commands as add_registry_commands
    add_registry_commands(commands, command, add_registry_options)

    sub = commands.add_parser("umount", help="unmount a layerfs mount",
                              description="unmount a layerfs mount, or all of them")
    sub.set_defaults(function=cmd_umount)
    sub.add_argument("--all", action="store_true",
                     help="unmount every layerfs mount started from this runtime directory "
                          "(see 'layerfs mounts')")
    sub.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")

    sub = commands.add_parser("mounts", help="list the active layerfs mounts",
                              description="list the layerfs mounts started from this runtime "
                                          "directory ($LAYERFS_RUNTIME_DIR, else "
                                          "$XDG_RUNTIME_DIR/layerfs, else /run/layerfs for root): "
                                          "mount point, image, daemon pid or - (tab-separated)")
    sub.set_defaults(function=cmd_mounts)
    sub.add_argument("--every", action="store_true",
                     help="every layerfs mount on the machine, whoever started it")

    from .cachecli import add_parser as add_cache_parser
    add_cache_parser(commands)
    from .containercli import add_commands as add_container_commands
    add_container_commands(commands, add_registry_options)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Options may come before, between or after the operands (``ls IMAGE
    -l /etc``): argparse gives a ``*`` positional only the first run of
    operands, so later runs come back as extras and are appended in order.
    Anything else left over is an unknown option."""
    args, extras = parser.parse_known_args(argv)
    stray = [a for a in extras if a.startswith("-") and a != "-"]
    if stray or (extras and not hasattr(args, "operands")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extras)}")
    if extras:
        args.operands = list(args.operands) + extras
    return args


def version() -> str:
    from . import __version__
    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    try:
        return args.function(args)
    except UsageError as error:
        print(f"layerfs: {error}", file=sys.stderr)
        return EXIT_USAGE
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
    # Run as ``python -m layerfs.cli``: this file is then ``__main__``, a
    # second copy of the module; the commands in other modules raise the
    # errors of ``layerfs.cli``, so that copy is the one to run.
    from layerfs.cli import main as _main
    sys.exit(_main())
