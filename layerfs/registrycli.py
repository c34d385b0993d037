"""The registry commands: ``pull``, ``copy``, ``tags``, ``login`` and
``logout`` (what reading images from ``docker://`` needs besides the
commands that read any image).  They print; :mod:`layerfs.registry` and
:mod:`layerfs.auth` decide.  Errors reach :func:`layerfs.cli.main`, which
prints them on one line."""

from __future__ import annotations

import os
import sys

from .cli import (EXIT_ERROR, ProgressBar, UsageError, cache_from, open_image_fs,
                  registry_options, take_image)
from .errors import InvalidReferenceError


def cmd_pull(args) -> int:
    operands = take_image(args, [])
    args.whole_blobs = True       # pull is what fetches every blob into the cache
    with open_image_fs(args, operands.image) as fs:
        print(fs.image.manifest_digest)
    return 0


def cmd_copy(args) -> int:
    from .image import descriptor
    from .imagewrite import copy_to_layout
    from .reference import parse_reference as parse
    from .cache import cache_root
    from .remote import BlobCache
    operands = take_image(args, ["DEST"])
    if not operands.image.is_remote:
        raise UsageError("copy: IMAGE must be a docker:// reference (a local image is "
                         "already on disk; commit or export write new ones)")
    try:
        dest = parse(operands.rest[0])
    except InvalidReferenceError as error:
        raise UsageError(f"copy: {error}") from None
    if dest.transport != "oci" or dest.digest is not None:
        raise UsageError(f"copy: DEST must be oci:DIR[:TAG], not {operands.rest[0]!r}")
    tag = dest.tag if dest.tag is not None else operands.image.tag
    args.whole_blobs = True       # the layout gets every blob, byte for byte
    cache = BlobCache(cache_root(cache_from(args)))
    with open_image_fs(args, operands.image) as fs:
        image = fs.image
        needed = [image.manifest_digest, image.config_digest,
                  *[layer.digest for layer in image.layers]]
        entry = descriptor(image.manifest.get("mediaType") or
                           "application/vnd.oci.image.manifest.v1+json", image.manifest_digest,
                           os.path.getsize(cache.blob_path(image.manifest_digest)))
        if image.platform:
            parts = image.platform.split("/")
            entry["platform"] = {"os": parts[0], "architecture": parts[1],
                                 **({"variant": parts[2]} if len(parts) > 2 else {})}
        digest = copy_to_layout(dest.path, entry, {d: cache.blob_path(d) for d in needed},
                                tag)
    print(digest)
    return 0


def cmd_tags(args) -> int:
    operands = take_image(args, [])
    ref = operands.image
    if ref.is_remote:
        from .registry import Client
        from .reference import Reference as Ref
        client = Client(Ref("docker", host=ref.host, repository=ref.repository),
                        registry_options(args))
        for tag in sorted(client.tags()):
            print(tag)
        return 0
    from .image import list_images
    progress = ProgressBar("indexing")
    try:
        images = list_images(ref, cache=cache_from(args), progress=progress)
    finally:
        progress.finish()
    for names, platform, digest in images:
        print(f"{', '.join(names) or '(untagged)'}\t{platform or '-'}\t{digest}")
    return 0


def cmd_login(args) -> int:
    from . import auth
    from .reference import Reference as Ref
    from .registry import Client
    username = args.username
    if username is None:
        if not sys.stdin.isatty():
            raise UsageError("login: give --username")
        username = input("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        password = args.password
    else:
        import getpass
        password = getpass.getpass("Password: ")
    credentials = auth.Credentials(username, password, "the command line")
    client = Client(Ref("docker", host=args.host, repository="library/x"),
                    registry_options(args), credentials=credentials)
    client.check_login()
    path = auth.store(args.host, username, password, args.authfile)
    print(f"Login Succeeded ({path})")
    return 0


def cmd_logout(args) -> int:
    from . import auth
    if not auth.remove(args.host, args.authfile):
        print(f"layerfs: not logged in to {args.host} ({auth.write_target(args.authfile)})",
              file=sys.stderr)
        return EXIT_ERROR
    print(f"Removed login credentials for {args.host}")
    return 0


def add_commands(commands, command, add_registry_options) -> None:
    """The registry commands' parsers, on *commands* (the subparsers of
    :func:`layerfs.cli.build_parser`); *command* adds one that takes IMAGE,
    *add_registry_options* the options of reaching a registry."""
    command("pull", cmd_pull, "fetch and index an image ahead of use; print its manifest "
                              "digest", "")
    command("copy", cmd_copy, "save a registry image as an OCI layout (the same blobs "
                              "and digests); print its manifest digest", "oci:DIR[:TAG]")
    command("tags", cmd_tags, "list the tags of a repository (docker://) or the images "
                              "of a layout or archive", "")

    sub = commands.add_parser("login", help="check and store credentials for a registry",
                              description="check a username and password against a "
                              "registry and store them in the containers auth file")
    sub.set_defaults(function=cmd_login)
    sub.add_argument("-u", "--username")
    sub.add_argument("-p", "--password", help="(visible to other users: prefer "
                                              "--password-stdin)")
    sub.add_argument("--password-stdin", action="store_true")
    add_registry_options(sub)
    sub.add_argument("host", metavar="HOST[:PORT]")

    sub = commands.add_parser("logout", help="remove stored credentials for a registry",
                              description="remove stored credentials for a registry")
    sub.set_defaults(function=cmd_logout)
    sub.add_argument("--authfile", metavar="FILE")
    sub.add_argument("host", metavar="HOST[:PORT]")
