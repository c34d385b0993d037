"""Opening a layer from its table of contents: where the TOC is, and
whether to trust it (see :mod:`layerfs.toc` for the model, and
docs/toc-layers.md).

:func:`open_toc_layer` looks at a layer descriptor's annotations first and
at the blob's last bytes second; it fetches only the footer and the TOC
through the blob source's ``read_at``, checks the TOC against the digest the
annotation gives (or, with no annotation, the whole blob against the layer
digest) and returns a :class:`~layerfs.toc.TocLayer`, or None for a layer
without a TOC, which the caller reads as a plain layer.
"""

from __future__ import annotations

import hashlib
import marshal
from typing import Any, Optional

from . import estargz, zstdchunked
from .blobsource import FileRange
from .cache import IndexCache, load_headed, write_atomic
from .compression import SUM_CHUNK
from .entry import REGULAR, Entry
from .errors import DigestMismatchError, ImageError, InvalidLayerError, UnsupportedImageError
from .toc import MAX_TOC_SIZE, Chunk, TocLayer, build_entries, sha256_digest


def toc_format_of(annotations: Optional[dict]) -> Optional[str]:
    """``"estargz"`` or ``"zstd:chunked"`` where a layer descriptor's
    annotations say so, else None."""
    annotations = annotations if isinstance(annotations, dict) else {}
    if zstdchunked.POSITION_ANNOTATION in annotations and \
            zstdchunked.CHECKSUM_ANNOTATION in annotations:
        return "zstd:chunked"
    if estargz.TOC_DIGEST_ANNOTATION in annotations:
        return "estargz"
    return None


def open_toc_layer(source, *, digest: Optional[str], diff_id: Optional[str] = None,
                   media_type: Optional[str] = None, annotations: Optional[dict] = None,
                   label: Optional[str] = None, sniff: bool = True,
                   cache=None) -> Optional[TocLayer]:
    """The layer of *source* (a blob source, a path or a
    :class:`layerfs.layer.BlobSource`) read from its table of contents, or
    None where it has none (the caller then reads it as a plain layer).

    With the descriptor's annotation, only the TOC is fetched (and, for
    eStargz, the 51-byte footer) and checked against the annotation's digest.
    Without it (*sniff*), the blob's last 72 bytes are looked at; where they
    are an eStargz or zstd:chunked footer, the whole blob is read once and
    checked against *digest* (no digest: None, a plain read).

    *cache* (an :class:`~layerfs.cache.IndexCache`, None for the default
    one, False for none) keeps the bytes the TOC was read from, once
    trusted, by blob digest (:func:`store_toc_record`): a reopen reads
    neither the footer nor the TOC again, and a layer trusted through its
    whole blob is not downloaded again."""
    blob, closers = _as_blob(source, digest, label)
    label = label or blob.label
    cache = _cache_of(cache)
    annotated = toc_format_of(annotations)
    record = load_toc_record(cache, digest, annotated) if cache is not None else None
    try:
        if record is not None:
            fmt, trusted_by = record["toc_format"], record["trusted_by"]
        else:
            fmt, trusted_by = annotated, "annotation"
            if fmt is None and sniff and digest:
                fmt = _sniff(blob)
                if fmt is not None:
                    _verify_whole(blob, digest, label)
                    trusted_by = "blob"
        if fmt is None:
            for close in closers:
                close()
            return None
        annotations = annotations if trusted_by == "annotation" else {}
        read_ahead = getattr(blob, "read_ahead", None)
        if read_ahead is not None:         # a registry blob: ask for the ranges needed only
            blob.read_ahead = 0
        reader = _Replay(blob, record["reads"]) if record is not None else _Recorder(blob)
        read = _read_estargz if fmt == "estargz" else _read_zstd_chunked
        try:
            entries, chunk_lists, decompress, toc_format = read(reader, annotations, label)
        except InvalidLayerError:
            if trusted_by != "blob":
                raise
            # Found by its footer, and the whole blob is the one the digest
            # names: a TOC that cannot serve (a stargz TOC with no digest per
            # chunk, say) leaves an ordinary compressed tar, read as such.
            if read_ahead is not None:
                blob.read_ahead = read_ahead
            for close in closers:
                close()
            return None
        if record is None and cache is not None and digest:
            store_toc_record(cache, digest, fmt, trusted_by, reader.reads)
        store = None
        if read_ahead is not None and cache is not None and _hex(digest):
            # a registry blob: the chunks it fetches are kept, pinned while open
            from .rangestore import RangeStore
            store = RangeStore(cache, _hex(digest), blob.size, SUM_CHUNK)
            closers.append(cache.pin(_hex(digest)).release)
    except BaseException:
        for close in closers:
            close()
        raise
    compression = "zstd" if fmt == "zstd:chunked" else "gzip"
    tar_split = (_tar_split_reader(blob, annotations, label)
                 if fmt == "zstd:chunked" else None)
    layer = TocLayer(blob=blob, label=label, digest=digest or blob.digest or "",
                     diff_id=diff_id, media_type=media_type, compression=compression,
                     toc_format=toc_format, entries=entries, chunk_lists=chunk_lists,
                     decompress=decompress, closers=closers, store=store,
                     tar_split=tar_split)
    if read_ahead is not None and fmt == "estargz":
        prefetch_prioritised(layer)
    return layer


def _tar_split_reader(blob, annotations: dict, label: str):
    """A function giving the records of a zstd:chunked layer's tar-split,
    fetched when first asked for (not at open): where the annotation says,
    checked against its checksum annotation, else where the footer says.
    (What rebuilds the tar from it checks the result against the diff_id:
    the tar-split needs no trust of its own.)"""
    def records():
        where = annotations.get(zstdchunked.TARSPLIT_POSITION_ANNOTATION)
        if where is not None:
            offset, length, uncompressed = zstdchunked.parse_tarsplit_position(where, label)
        else:
            found = zstdchunked.parse_footer_tarsplit(_fetch(
                blob, blob.size - zstdchunked.FOOTER_SIZE, zstdchunked.FOOTER_SIZE,
                "footer", label)) if blob.size >= zstdchunked.FOOTER_SIZE else None
            if found is None:
                raise UnsupportedImageError("the zstd:chunked layer has no tar-split to "
                                            "rebuild its tar from", layer=label)
            offset, length, uncompressed = found
        if uncompressed > MAX_TOC_SIZE:
            raise InvalidLayerError(f"the tar-split is larger than {MAX_TOC_SIZE} bytes",
                                    layer=label)
        raw = _fetch_annotated(blob, offset, length, "tar-split", annotations,
                               zstdchunked.TARSPLIT_CHECKSUM_ANNOTATION, label)
        try:
            data = zstdchunked.decompress_frames(raw, uncompressed + 1)
        except InvalidLayerError as error:
            raise InvalidLayerError(f"tar-split: {error.reason}", layer=label) from None
        if len(data) != uncompressed:
            raise InvalidLayerError(f"the tar-split is {len(data)} bytes, not the "
                                    f"{uncompressed} its position says", layer=label)
        return zstdchunked.tarsplit_records(data, label)
    return records


def prefetch_prioritised(layer: TocLayer) -> int:
    """eStargz's prioritised files: those before the ``.prefetch.landmark``
    entry in the TOC (its writer puts the files a workload reads first
    there) are fetched at open, in one request of at most
    :data:`layerfs.toc.PREFETCH_LIMIT` bytes, verified and kept (in memory,
    and in the range store of a registry blob).  Nothing for a layer with
    ``.no.prefetch.landmark`` or no landmark.  A failed prefetch is not an
    error: the files are fetched when read.  Returns the bytes fetched."""
    landmark = next((e for e in layer.entries if e.path == "/" + estargz.PREFETCH_LANDMARK
                     and e.kind == REGULAR and e.size), None)
    if landmark is None:
        return 0
    try:
        before = layer.chunk_start(landmark.data)
        return layer.prefetch(before) if before is not None else 0
    except (ImageError, OSError):
        return 0


# -- the TOC record: what the TOC was read from, kept once trusted -------------

TOC_RECORD_FORMAT = "layerfs-toc"
TOC_RECORD_VERSION = 1


def load_toc_record(cache, digest: Optional[str], annotated: Optional[str]) -> Optional[dict]:
    """The TOC record of the blob *digest*, if the cache holds one that may
    be used now: one trusted through the whole blob always; one trusted
    through an annotation only when the descriptor has that annotation now
    (its digest is checked again, on the recorded bytes)."""
    hex_ = _hex(digest)
    if not hex_:
        return None
    loaded = load_headed(cache.toc_path(hex_), TOC_RECORD_FORMAT, TOC_RECORD_VERSION,
                         ("digest", hex_), dict)
    if loaded is None:
        return None
    record = loaded[1]
    if record.get("trusted_by") == "blob":
        return record
    if record.get("trusted_by") == "annotation" and record.get("toc_format") == annotated:
        return record
    return None


def store_toc_record(cache, digest: str, fmt: str, trusted_by: str, reads: dict) -> None:
    """Keep the byte ranges the TOC was read from (``index/sha256/<hex>.toc``:
    the marshal of a header and ``{"toc_format", "trusted_by", "reads":
    {(offset, length): bytes}}``), written whole under a temp name.
    *trusted_by*: ``"blob"`` (the whole blob matched its digest) or
    ``"annotation"`` (the TOC matched the descriptor's annotation)."""
    hex_ = _hex(digest)
    if not hex_:
        return
    header = {"format": TOC_RECORD_FORMAT, "version": TOC_RECORD_VERSION, "digest": hex_}
    body = {"toc_format": fmt, "trusted_by": trusted_by, "reads": dict(reads)}
    try:
        write_atomic(cache.toc_path(hex_), marshal.dumps((header, body)))
    except OSError:
        pass             # a cache that cannot be written: the next open reads it again


class _Recorder:
    """A blob source that remembers what was read through it."""

    def __init__(self, blob):
        self.blob = blob
        self.size = blob.size
        self.label = blob.label
        self.reads: dict = {}

    def read_at(self, offset: int, length: int) -> bytes:
        data = self.blob.read_at(offset, length)
        self.reads[(offset, length)] = data
        return data


class _Replay:
    """A blob source that answers from a TOC record, and from the blob for
    anything the record lacks."""

    def __init__(self, blob, reads: dict):
        self.blob = blob
        self.size = blob.size
        self.label = blob.label
        self.reads = reads

    def read_at(self, offset: int, length: int) -> bytes:
        data = self.reads.get((offset, length))
        return data if data is not None else self.blob.read_at(offset, length)


def _cache_of(cache):
    if cache is False:
        return None
    if cache is None or cache is True:
        return IndexCache()
    return cache if hasattr(cache, "toc_path") else None


def _hex(digest: Optional[str]) -> str:
    algorithm, _, hex_ = (digest or "").partition(":")
    return hex_ if algorithm == "sha256" and len(hex_) == 64 else ""


def _as_blob(source, digest: Optional[str], label: Optional[str]) -> tuple[Any, list]:
    if hasattr(source, "read_at"):
        return source, []
    path = getattr(source, "path", None)
    if path is not None:
        blob = FileRange(path, source.offset, source.size, digest=digest, label=label)
    else:
        blob = FileRange(source, digest=digest, label=label)
    return blob, [blob.close]


def _sniff(blob) -> Optional[str]:
    if blob.size < zstdchunked.FOOTER_SIZE:
        return None
    tail = blob.read_at(blob.size - zstdchunked.FOOTER_SIZE, zstdchunked.FOOTER_SIZE)
    if zstdchunked.parse_footer(tail) is not None:
        return "zstd:chunked"
    if estargz.find_footer(tail) is not None:      # eStargz, or the original stargz
        return "estargz"
    return None


def _verify_whole(blob, digest: str, label: str) -> None:
    """The TOC is trusted because the whole blob matches *digest*."""
    algorithm, _, expected = digest.partition(":")
    if algorithm != "sha256":
        raise InvalidLayerError(f"digest {digest!r}: only sha256 is supported", layer=label)
    hasher = hashlib.sha256()
    position = 0
    while position < blob.size:
        data = blob.read_at(position, min(1 << 20, blob.size - position))
        if not data:
            raise InvalidLayerError(f"blob ends at {position} of {blob.size} bytes",
                                    layer=label)
        hasher.update(data)
        position += len(data)
    if hasher.hexdigest() != expected:
        raise DigestMismatchError(f"blob is sha256:{hasher.hexdigest()}, not {digest}",
                                  layer=label)


def _fetch_annotated(blob, offset: int, length: int, what: str, annotations: dict,
                     annotation: str, label: str) -> bytes:
    """The *length* bytes at *offset* of *blob* (the layer's *what*),
    checked against the sha256 the descriptor's *annotation* gives, if any."""
    raw = _fetch(blob, offset, length, what, label)
    expected = annotations.get(annotation)
    if expected is not None and sha256_digest(raw) != expected:
        raise DigestMismatchError(f"the {what} is {sha256_digest(raw)}, not {expected} as "
                                  f"the descriptor's {annotation} says", layer=label)
    return raw


def _fetch(blob, offset: int, length: int, what: str, label: str) -> bytes:
    if offset < 0 or length < 0 or offset + length > blob.size:
        raise InvalidLayerError(f"{what} at {offset} (+{length}) lies outside the "
                                f"{blob.size}-byte blob", layer=label)
    data = blob.read_at(offset, length)
    if len(data) != length:
        raise InvalidLayerError(f"blob ends inside the {what}", layer=label)
    return data


def _read_estargz(blob, annotations: dict, label: str):
    """The entries of an eStargz layer, or of an original stargz one (whose
    47-byte footer the last 51 bytes end with)."""
    if blob.size < estargz.FOOTER_SIZE:
        raise InvalidLayerError("blob is too short for an eStargz footer", layer=label)
    found = estargz.find_footer(_fetch(blob, blob.size - estargz.FOOTER_SIZE,
                                       estargz.FOOTER_SIZE, "footer", label))
    toc_offset, footer_size = found if found is not None else (None, 0)
    toc_end = blob.size - footer_size
    if toc_offset is None or toc_offset >= toc_end:
        raise InvalidLayerError("the descriptor says eStargz but the blob ends with no "
                                "eStargz footer", layer=label)
    raw = _fetch(blob, toc_offset, toc_end - toc_offset, "TOC", label)
    try:
        member = estargz.decompress_member(raw, MAX_TOC_SIZE + (1 << 20))
    except InvalidLayerError as error:
        raise InvalidLayerError(f"TOC: {error.reason}", layer=label) from None
    data, info = estargz.read_toc_member(member, label)
    expected = annotations.get(estargz.TOC_DIGEST_ANNOTATION)
    if expected is not None and sha256_digest(data) != expected:
        raise DigestMismatchError(f"the table of contents is {sha256_digest(data)}, not "
                                  f"{expected} as the descriptor's "
                                  f"{estargz.TOC_DIGEST_ANNOTATION} says", layer=label)
    toc = estargz.parse_toc(data, label)
    entries, chunk_lists = build_entries(toc, label, estargz.chunk_ranges(toc, toc_offset))
    # The TOC is the tar's last member: shown as any reader of the tar shows it.
    mtime = info.pax_headers.get("mtime")
    mtime_ns = _pax_mtime_ns(mtime) if mtime else int(info.mtime) * 1_000_000_000
    entries.append(Entry("/" + estargz.TOC_NAME, REGULAR, info.mode & 0o7777, info.uid,
                         info.gid, mtime_ns, len(data), "", 0, None, len(chunk_lists)))
    chunk_lists.append((Chunk((0, len(data), toc_offset, toc_end, info.offset_data,
                               sha256_digest(data), False)),) if data else ())
    fmt = "estargz" if footer_size == estargz.FOOTER_SIZE else "stargz"
    return entries, chunk_lists, estargz.decompress_member, fmt


def _pax_mtime_ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction[:9] or "0").ljust(9, "0"))


def _read_zstd_chunked(blob, annotations: dict, label: str):
    position = annotations.get(zstdchunked.POSITION_ANNOTATION)
    if position is not None:
        offset, length, uncompressed, kind = zstdchunked.parse_position(position, label)
    else:
        if blob.size < zstdchunked.FOOTER_SIZE:
            raise InvalidLayerError("blob is too short for a zstd:chunked footer", layer=label)
        found = zstdchunked.parse_footer(_fetch(
            blob, blob.size - zstdchunked.FOOTER_SIZE, zstdchunked.FOOTER_SIZE,
            "footer", label))
        if found is None:
            raise InvalidLayerError("no zstd:chunked footer", layer=label)
        offset, length, uncompressed, kind = found
    if kind != zstdchunked.MANIFEST_TYPE_CRFS:
        raise InvalidLayerError(f"zstd:chunked manifest type {kind} is not 1 (CRFS)",
                                layer=label)
    raw = _fetch_annotated(blob, offset, length, "table of contents", annotations,
                           zstdchunked.CHECKSUM_ANNOTATION, label)
    manifest = zstdchunked.read_manifest(raw, uncompressed, label)
    entries, chunk_lists = build_entries(manifest, label, zstdchunked.chunk_ranges)
    return entries, chunk_lists, zstdchunked.decompress_frames, "zstd:chunked"
