"""The ``layerfs container`` and ``layerfs volume`` commands: the CLI of
:mod:`layerfs.store`.  They print; the store decides.  Errors reach
:func:`layerfs.cli.main`, which prints them on one line."""

from __future__ import annotations

import argparse
import datetime
import errno
import json

from .errors import StoreError
from .store import Store, mounted_at

STORE_HELP = ("the store directory (default: $LAYERFS_STORE, else "
              "$XDG_DATA_HOME/layerfs, else ~/.local/share/layerfs)")


def store_of(args) -> Store:
    return Store(getattr(args, "store", None))


def cache_of(args):
    if getattr(args, "cache_dir", None) is None:
        return None
    from .layer import IndexCache
    return IndexCache(args.cache_dir)


# -- container ------------------------------------------------------------------

def cmd_create(args) -> int:
    from .cli import registry_options, take_image
    operands = take_image(args, ["NAME"])       # --tag is folded into the reference
    args.whole_blobs = True       # a container outlives the network: its blobs are kept
    container = store_of(args).create(operands.image, operands.rest[0],
                                      platform=args.platform, cache=cache_of(args),
                                      registry=registry_options(args))
    print(container.name)
    return 0


def cmd_ls(args) -> int:
    store = store_of(args)
    rows = []
    for container in store.list():
        try:
            size = store.upper_size(container.name)
        except StoreError:
            continue                    # removed meanwhile
        rows.append({"name": container.name, "image": container.image,
                     "manifest_digest": container.manifest_digest,
                     "chain_id": container.chain_id, "created": container.created,
                     "upper_size": size, "mounted": mounted_at(container)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("NAME\tIMAGE\tCHAINID\tCREATED\tSIZE\tMOUNTED")
    for row in rows:
        created = datetime.datetime.fromtimestamp(row["created"], datetime.timezone.utc)
        chain = (row["chain_id"] or "-").partition(":")[2][:12] or "-"
        print(f"{row['name']}\t{row['image']}\t{chain}\t"
              f"{created.strftime('%Y-%m-%dT%H:%M:%SZ')}\t{row['upper_size']}\t"
              f"{row['mounted'] or '-'}")
    return 0


def cmd_mount(args) -> int:
    from .cli import ProgressBar, registry_options
    from .mount import mount
    from .storedaemon import mount_container
    store = store_of(args)
    container = store.get(args.name)
    where = mounted_at(container)
    if where is not None:
        raise StoreError(errno.EBUSY, f"container {args.name!r} is mounted on {where} "
                                      "already")
    volumes = parsed_volumes(args)
    served = served_volumes(volumes, writable=True)
    progress = ProgressBar("indexing")
    try:
        if args.foreground:
            mount(container.reference, args.mountpoint, upper=container.upper,
                  tag=container.tag, platform=container.platform, foreground=True,
                  options=args.options, cache_dir=args.cache_dir,
                  registry=registry_options(args), log_file=args.log,
                  log_level=args.log_level)
        else:      # served by the store's one daemon, beside its other containers
            mount_container(store, args.name, args.mountpoint, options=args.options,
                            cache_dir=args.cache_dir, registry=registry_options(args),
                            progress=progress, log_file=args.log, log_level=args.log_level,
                            volumes=served)
    finally:
        progress.finish()
    if not served:
        bind_after_mount(args.mountpoint, volumes)
    return 0


def parsed_volumes(args) -> list:
    """The ``--volume`` options of a mount command, checked before mounting
    (named volumes are looked up in the store)."""
    if not getattr(args, "volumes", None):
        return []
    from .volume import parse_volume
    if args.foreground:
        raise StoreError(errno.EINVAL, "--volume needs a background mount (not -f)")
    return [parse_volume(text, store_of(args)) for text in args.volumes]


def served_volumes(volumes: list, writable: bool) -> list:
    """The volumes the mount's server is to serve itself: all of them for
    a caller who cannot bind them with the kernel (:func:`layerfs.volume.can_bind`),
    none for one who can (bound after mounting, :func:`bind_after_mount`)."""
    from .volume import can_bind
    if not volumes or can_bind():
        return []
    if not writable:
        raise StoreError(errno.EPERM, "--volume without root needs a writable mount "
                                      "(--upper): the mount's server serves the volumes")
    return volumes


def bind_after_mount(mountpoint: str, volumes: list) -> None:
    """Bind *volumes* into the new mount; if that fails, unmount it."""
    if not volumes:
        return
    from .mount import umount
    from .volume import bind_volumes
    try:
        bind_volumes(mountpoint, volumes)
    except BaseException:
        umount(mountpoint)
        raise


def cmd_diff(args) -> int:
    from .cli import print_changes
    with store_of(args).open(args.name, readonly=True, cache=cache_of(args)) as fs:
        print_changes(fs.diff(), args.json)
    return 0


def cmd_commit(args) -> int:
    from .cli import commit_writable
    return commit_writable(lambda: store_of(args).open(args.name, cache=cache_of(args)),
                           args.dest, args, tag=args.tag)


def cmd_rm(args) -> int:
    store = store_of(args)
    for name in args.names:
        store.remove(name, force=args.force)
    return 0


# -- volume ---------------------------------------------------------------------

def cmd_volume_create(args) -> int:
    from .volume import create_volume
    print(create_volume(store_of(args), args.name))
    return 0


def cmd_volume_ls(args) -> int:
    from .volume import list_volumes
    volumes = list_volumes(store_of(args))
    if args.json:
        print(json.dumps([{"name": name, "path": path} for name, path in volumes],
                         indent=2))
        return 0
    for name, path in volumes:
        print(f"{name}\t{path}")
    return 0


def cmd_volume_rm(args) -> int:
    from .volume import remove_volume
    for name in args.names:
        remove_volume(store_of(args), name)
    return 0


# -- parsers --------------------------------------------------------------------

def add_commands(commands, add_registry_options) -> None:
    """Register ``container`` and ``volume`` on *commands* (the top-level
    subparsers of :func:`layerfs.cli.build_parser`)."""
    container = commands.add_parser(
        "container", help="create, mount, diff, commit and remove named containers",
        description="named containers (an image plus its own writable layer) in a store")
    actions = container.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    def action(name, function, help_text, parent=actions):
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(function=function)
        sub.add_argument("--store", metavar="DIR", help=STORE_HELP)
        return sub

    def image_options(sub):
        sub.add_argument("--cache-dir", help="index cache directory (default: "
                                             "$LAYERFS_CACHE_DIR or ~/.cache/layerfs)")
        add_registry_options(sub)
        sub.add_argument("--offline", action="store_true",
                         help="docker://: use only what is cached")

    sub = action("create", cmd_create, "create a container of IMAGE named NAME")
    sub.usage = ("layerfs container create [options] (IMAGE | --layer FILE "
                 "[--layer FILE ...]) NAME")
    sub.set_defaults(command="container create")
    sub.add_argument("operands", nargs="*", metavar="IMAGE NAME")
    sub.add_argument("--layer", dest="layers", action="append", metavar="FILE",
                     help="a layer file, in place of IMAGE; repeat to stack layers, "
                          "base first")
    sub.add_argument("--tag", metavar="T", help="the image's tag or manifest digest in "
                                                "a layout or archive")
    sub.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: this machine's)")
    image_options(sub)

    sub = action("ls", cmd_ls, "list the containers: name, image, ChainID, created "
                               "(UTC), size of the upper in bytes, mount point")
    sub.add_argument("--json", action="store_true")

    sub = action("mount", cmd_mount, "mount a container (copy-on-write into its upper)")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("mountpoint", metavar="MOUNTPOINT")
    sub.add_argument("-f", "--foreground", action="store_true",
                     help="serve in the foreground until unmounted or interrupted")
    sub.add_argument("-o", dest="options", action="append", default=[],
                     metavar="OPTION[,OPTION...]", help="FUSE mount options")
    add_volume_option(sub)
    sub.add_argument("--log", metavar="FILE", help="the daemon's log (default: syslog)")
    sub.add_argument("--log-level", default="WARNING", type=str.upper,
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    image_options(sub)

    sub = action("diff", cmd_diff, "list what a container changes in its image "
                                   "(works while it is mounted)")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--cache-dir", help="index cache directory")

    sub = action("commit", cmd_commit, "write a container's changes as a new layer and "
                                       "image (an OCI layout at DEST); unmount it first")
    sub.add_argument("name", metavar="NAME")
    sub.add_argument("dest", metavar="DEST")
    sub.add_argument("--tag", metavar="T", help="tag of the new image")
    sub.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip",
                     type=str.lower)
    sub.add_argument("-m", "--message", help="a comment for the image history")
    sub.add_argument("--cache-dir", help="index cache directory")

    sub = action("rm", cmd_rm, "remove containers (refused while mounted, unless --force)")
    sub.add_argument("names", metavar="NAME", nargs="+")
    sub.add_argument("--force", action="store_true", help="unmount a mounted one first")

    volume = commands.add_parser("volume", help="create, list and remove named volumes",
                                 description="named volumes: host directories in the "
                                             "store, bound with --volume NAME:PATH")
    volume_actions = volume.add_subparsers(dest="action", metavar="ACTION")
    volume_actions.required = True
    sub = action("create", cmd_volume_create, "create a named volume; print its directory",
                 volume_actions)
    sub.add_argument("name", metavar="NAME")
    sub = action("ls", cmd_volume_ls, "list the named volumes: name, directory",
                 volume_actions)
    sub.add_argument("--json", action="store_true")
    sub = action("rm", cmd_volume_rm, "remove named volumes and their files",
                 volume_actions)
    sub.add_argument("names", metavar="NAME", nargs="+")


def add_volume_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--volume", "-v", dest="volumes", action="append", default=[],
                     metavar="SOURCE:PATH[:ro]",
                     help="bind the host directory SOURCE (or the named volume SOURCE "
                          "of the store) at PATH in the view; :ro refuses writes there. "
                          "Repeatable")
