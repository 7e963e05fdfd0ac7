"""Manifests as datasets: one file, a folder, a glob, or a Hugging Face Parquet layout.

At corpus scale nothing may hold the whole manifest. The planner reads only the id
column of Parquet parts (of JSONL parts: one streamed pass keeping ids and line
offsets), the fingerprint comes from what identifies a part without reading its
data (a Parquet part's size and footer; a JSONL part's content, which is small),
and a worker reads only the rows of its shard: the Parquet row groups that hold
them, or each JSONL line by its offset. Row parsing and validation are
:mod:`.manifest`'s.

A manifest URI is a local path or ``s3://`` URI of

* one ``.parquet`` file, or a JSONL file of any other name;
* a folder: every ``*.parquet``, ``*.jsonl`` and ``*.ndjson`` under it, in path
  order, skipping names that start with ``.`` or ``_`` (a Hub dataset repository
  with ``data/<split>-00000-of-00004.parquet`` parts is such a folder; one that
  holds several splits must be narrowed with a glob);
* a glob: ``*`` and ``?`` within a path segment, ``**`` across segments.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from analysis.storage import list_files, resolve

from .manifest import Manifest, ManifestError, row_to_utterance
from .records import ManifestRowError, SpeechInputError, Utterance

#: Suffixes a folder or glob treats as manifest parts.
PART_SUFFIXES = (".parquet", ".jsonl", ".ndjson")
#: Utterances whose words make the control-word pool (the lowest crc32 of the id):
#: frequency-matched chance words need a sample of the corpus, not all of it.
CONTROL_UTTERANCES = 4096
#: Columns the control pool needs (a Parquet part's audio is never read for it).
CONTROL_COLUMNS = ("id", "utterance_id", "text", "words", "textgrid")
_SPLIT_PART = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
_NUMBERED_PART = re.compile(r"^\d{4,}\.parquet$")


@dataclass(frozen=True)
class ManifestPart:
    """One file of a manifest, with what identifies its content."""

    uri: str
    format: str  # "parquet" | "jsonl"
    size: int
    digest: str

    @property
    def base(self) -> str:
        """Where the part's relative audio and TextGrid paths start."""
        return self.uri.rsplit("/", 1)[0]


@dataclass(frozen=True)
class RowLocations:
    """Where some manifest rows are: ids, part, row within the part, JSONL line bytes.

    Arrays rather than objects per row, so that a plan of 10^6 utterances stays a
    few tens of MB in the driver. ``index`` is the row's number in the whole
    manifest (it names rows in messages and makes ``row{index}`` ids).
    """

    ids: list[str]
    part: np.ndarray  # int32
    row: np.ndarray  # int64, row (Parquet) or non-blank line (JSONL) within the part
    offset: np.ndarray  # int64, JSONL line start in bytes; -1 for Parquet
    length: np.ndarray  # int64, JSONL line length in bytes; 0 for Parquet
    index: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, keep: slice) -> RowLocations:
        return RowLocations(
            self.ids[keep],
            self.part[keep],
            self.row[keep],
            self.offset[keep],
            self.length[keep],
            self.index[keep],
        )

    def take(self, positions: Sequence[int]) -> RowLocations:
        pos = np.asarray(positions, dtype=np.int64)
        return RowLocations(
            [self.ids[i] for i in pos],
            self.part[pos],
            self.row[pos],
            self.offset[pos],
            self.length[pos],
            self.index[pos],
        )


@dataclass(frozen=True)
class ManifestSource:
    """What a worker needs besides its shard's rows: the parts and the control pool."""

    uri: str
    parts: tuple[ManifestPart, ...]
    control_pool: tuple[tuple[str, tuple[str, ...]], ...]  # (utterance id, its words)


@dataclass(frozen=True)
class ManifestIndex:
    """What the planner learns from one pass over the ids."""

    source: ManifestSource
    fingerprint: str
    rows: RowLocations  # every row that will be read, in manifest order
    errors: list[SpeechInputError]  # rows that are not objects, bad JSON, duplicate ids


# Parts ------------------------------------------------------------------------------------
def _glob_regex(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 1)) > i:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _uri_of(uri: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if uri.startswith("s3://") else fs_path


def _format_of(path: str) -> str:
    return "parquet" if path.endswith(".parquet") else "jsonl"


def _hidden(relative: str) -> bool:
    return any(p.startswith((".", "_")) for p in relative.split("/"))


def _part_paths(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The files a manifest URI names, in path order."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise ManifestError(f"cannot open manifest {uri}: {exc}") from exc
    if info.type == pafs.FileType.File:
        return fs, [path]
    if info.type != pafs.FileType.Directory:
        if any(c in path for c in "*?["):  # a glob, unless a file is named so
            return fs, _glob(fs, path, uri)
        raise ManifestError(f"cannot open manifest {uri}: no such file or folder")
    files = [i.path for i in list_files(fs, path)]
    names = {f.rsplit("/", 1)[-1] for f in files}
    if "state.json" in names and any(n.endswith(".arrow") for n in names):
        raise ManifestError(
            f"{uri} is a datasets save_to_disk folder (Arrow files); write it as Parquet "
            "(Dataset.to_parquet, or the Hub's data/*.parquet layout) and point at that"
        )
    root = path.rstrip("/") + "/"
    found = sorted(f for f in files if f.endswith(PART_SUFFIXES) and not _hidden(f[len(root) :]))
    if not found:
        raise ManifestError(f"no manifest parts ({', '.join(PART_SUFFIXES)}) under {uri}")
    groups = sorted({g for f in found if (g := _split_of(f[len(root) :]))})
    if len(groups) > 1:
        names = ", ".join(f"{c}/{sp}" if c else sp for c, sp in groups)
        config, split = groups[0]
        numbered = any(
            _split_of(f[len(root) :]) == groups[0] and _NUMBERED_PART.match(f.rsplit("/", 1)[-1])
            for f in found
        )
        folder = f"{config}/" if config else ""
        hint = f"{folder}{split}/*.parquet" if numbered else f"{folder}{split}-*.parquet"
        raise ManifestError(
            f"{uri} holds several splits or configurations ({names}); name one with a glob, "
            f"e.g. {uri.rstrip('/')}/{hint}"
        )
    return fs, found


def _glob(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    parts = path.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    base = "/".join(parts[:fixed]) or "/"
    pattern = _glob_regex(path)
    root = base.rstrip("/") + "/"
    found = sorted(
        i.path
        for i in list_files(fs, base)
        if pattern.match(i.path)
        and i.path.endswith(PART_SUFFIXES)
        and not _hidden(i.path[len(root) :])
    )
    if not found:
        raise ManifestError(f"no manifest file ({', '.join(PART_SUFFIXES)}) matches {uri}")
    return found


def _split_of(relative: str) -> tuple[str, str] | None:
    """(configuration, split) a Hub layout gives a part, or None for other names.

    ``data/test-00000-of-00004[-<hash>].parquet`` is split ``test`` of folder ``data``;
    the Parquet converter's ``<config>/<split>/0000.parquet`` is split ``<split>`` of
    ``<config>``.
    """
    folder, _, name = relative.rpartition("/")
    if m := _SPLIT_PART.match(name):
        return folder, m["split"]
    if _NUMBERED_PART.match(name) and folder:
        config, _, split = folder.rpartition("/")
        return config, split
    return None


def _parquet_digest(fs: pafs.FileSystem, path: str, uri: str) -> tuple[int, str]:
    """(size, digest of size, modification time and footer), never reading the data.

    The footer alone is not enough: a same-size edit (one word for another of its
    length) often leaves every compressed size and statistic as it was. Any rewrite
    moves the modification time, so the digest changes; a copy that does not keep
    modification times makes a new run id (a re-extraction, never a stale resume).
    """
    try:
        mtime = fs.get_file_info(path).mtime_ns or 0
        with fs.open_input_file(path) as f:
            size = f.size()
            tail = f.read_at(8, size - 8) if size >= 12 else b""
            if tail[4:] != b"PAR1":
                raise ManifestError(f"{uri} is not a Parquet file (no PAR1 footer)")
            footer_len = int.from_bytes(tail[:4], "little")
            footer = f.read_at(footer_len, size - 8 - footer_len)
    except OSError as exc:
        raise ManifestError(f"cannot open manifest part {uri}: {exc}") from exc
    stamp = size.to_bytes(8, "little") + int(mtime).to_bytes(8, "little", signed=True)
    return size, hashlib.sha256(stamp + footer).hexdigest()


def _jsonl_digest(fs: pafs.FileSystem, path: str, uri: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ManifestError(f"cannot open manifest part {uri}: {exc}") from exc
    return size, digest.hexdigest()


def list_parts(uri: str) -> list[ManifestPart]:
    """The parts of a manifest, each with its content digest."""
    fs, paths = _part_paths(uri)
    parts = []
    for path in paths:
        part_uri = _uri_of(uri, path)
        fmt = _format_of(path)
        size, digest = (_parquet_digest if fmt == "parquet" else _jsonl_digest)(fs, path, part_uri)
        parts.append(ManifestPart(part_uri, fmt, size, digest))
    return parts


def fingerprint(parts: Sequence[ManifestPart]) -> str:
    """12 hex digits that change when any part's content, name or order changes.

    One JSONL file keeps the digest of its bytes (run ids of earlier versions hold).
    """
    if len(parts) == 1 and parts[0].format == "jsonl":
        return parts[0].digest[:12]
    root = parts[0].base if len(parts) == 1 else _common_base([p.uri for p in parts])
    lines = "\n".join(f"{p.uri[len(root) :]}\t{p.format}\t{p.digest}" for p in parts)
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def _common_base(uris: list[str]) -> str:
    base = uris[0].rsplit("/", 1)[0]
    while not all(u.startswith(base + "/") for u in uris):
        base = base.rsplit("/", 1)[0]
    return base


# Ids --------------------------------------------------------------------------------------
def _jsonl_lines(fs: pafs.FileSystem, path: str) -> Iterator[tuple[int, int, int, bytes]]:
    """(line number, byte offset, length, line) of every non-blank line, streamed."""
    with fs.open_input_stream(path) as f:
        pending, start, lineno = b"", 0, 0
        while True:
            chunk = f.read(1 << 22)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop() if chunk else b""
            for line in lines:
                lineno += 1
                if line.strip():
                    yield lineno, start, len(line), line
                start += len(line) + 1
            if not chunk:
                break


def _given_id(value) -> str | None:
    return None if value is None or value == "" else str(value)


def _scan_part(
    fs, k: int, part: ManifestPart, first: int, out: dict, errors: list, single: bool
) -> int:
    """Append one part's rows to ``out`` (column lists); returns the rows it holds."""
    path = resolve(part.uri)[1]
    if part.format == "parquet":
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            names = pf.schema_arrow.names
            column = next((c for c in ("id", "utterance_id") if c in names), None)
            n = pf.metadata.num_rows
            given = pf.read(columns=[column]).column(0).to_pylist() if column else [None] * n
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ManifestError(f"{part.uri} is not a readable Parquet manifest: {exc}") from exc
        for row, value in enumerate(given):
            out["ids"].append(_given_id(value) or f"row{first + row}")
        out["part"].append(np.full(n, k, dtype=np.int32))
        out["row"].append(np.arange(n, dtype=np.int64))
        out["offset"].append(np.full(n, -1, dtype=np.int64))
        out["length"].append(np.zeros(n, dtype=np.int64))
        out["keep"].append(np.ones(n, dtype=bool))
        return n
    rows, offsets, lengths, keep = [], [], [], []
    try:
        for row, (lineno, offset, length, line) in enumerate(_jsonl_lines(fs, path)):
            index = first + row
            rows.append(row)
            offsets.append(offset)
            lengths.append(length)
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                where = f"line{lineno}" if single else f"{part.uri}:line{lineno}"
                message = f"manifest line {lineno}" + ("" if single else f" of {part.uri}")
                errors.append(ManifestRowError(where, f"{message}: {exc}"))
                keep.append(False)
                out["ids"].append(where)
                continue
            if not isinstance(value, dict):
                kind = type(value).__name__
                errors.append(
                    ManifestRowError(
                        f"row{index}", f"manifest row {index + 1} is a {kind}, not an object"
                    )
                )
                keep.append(False)
                out["ids"].append(f"row{index}")
                continue
            keep.append(True)
            given = _given_id(value.get("id", value.get("utterance_id")))
            out["ids"].append(given or f"row{index}")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest part {part.uri}: {exc}") from exc
    n = len(rows)
    out["part"].append(np.full(n, k, dtype=np.int32))
    out["row"].append(np.asarray(rows, dtype=np.int64))
    out["offset"].append(np.asarray(offsets, dtype=np.int64))
    out["length"].append(np.asarray(lengths, dtype=np.int64))
    out["keep"].append(np.asarray(keep, dtype=bool))
    return n


def index_manifest(uri: str, control_utterances: int = CONTROL_UTTERANCES) -> ManifestIndex:
    """Parts, fingerprint, every row's id and place, and the control pool of a manifest."""
    parts = list_parts(uri)
    fs = resolve(parts[0].uri)[0]
    cols: dict[str, list] = {k: [] for k in ("ids", "part", "row", "offset", "length", "keep")}
    errors: list[SpeechInputError] = []
    first = 0
    for k, part in enumerate(parts):
        first += _scan_part(fs, k, part, first, cols, errors, len(parts) == 1)
    every = RowLocations(
        cols["ids"],
        *(np.concatenate(cols[c]) for c in ("part", "row", "offset", "length")),
        np.arange(first, dtype=np.int64),
    )
    keep = np.concatenate(cols["keep"])
    for i in _repeated(every.ids, keep):
        errors.append(SpeechInputError(every.ids[i], "duplicate utterance id in the manifest"))
        keep[i] = False
    rows = every if keep.all() else every.take(np.flatnonzero(keep))
    source = ManifestSource(uri, tuple(parts), ())
    pool = control_pool(source, rows, control_utterances)
    return ManifestIndex(ManifestSource(uri, tuple(parts), pool), fingerprint(parts), rows, errors)


def _repeated(ids: list[str], keep: np.ndarray) -> np.ndarray:
    """Positions (among ``keep``) whose id an earlier kept row already has, in order.

    By a stable sort rather than a set: 16 bytes per row at the peak instead of a hash
    table's ~40, which is most of the planner's memory at 10^6 rows.
    """
    kept = np.flatnonzero(keep)
    values = np.empty(len(kept), dtype=object)
    values[:] = [ids[i] for i in kept]
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    later = np.zeros(len(kept), dtype=bool)
    later[order[1:]] = ordered[1:] == ordered[:-1]
    return kept[later]


def control_pool(
    source: ManifestSource, rows: RowLocations, size: int
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Words of up to ``size`` utterances, in manifest order, for frequency-matched controls.

    A manifest of at most ``size`` utterances gives all of them; a larger one the
    ``size`` with the lowest crc32 of their id: spread over the corpus (not its first
    book), the same whatever the sharding, and read without audio.
    """
    if len(rows) > size:
        hashes = np.fromiter((zlib.crc32(u.encode()) for u in rows.ids), np.int64, len(rows))
        rows = rows.take(np.sort(np.argsort(hashes, kind="stable")[:size]))
    pool = []
    for item in read_rows(source, rows, columns=CONTROL_COLUMNS):
        if isinstance(item, Utterance):
            words = [w.word for w in item.words] if item.words else item.text_words()
            pool.append((item.id, tuple(words)))
    return tuple(pool)


# Rows -------------------------------------------------------------------------------------
def _parquet_rows(fs, part: ManifestPart, wanted: np.ndarray, columns) -> dict[int, object]:
    """The wanted rows of a Parquet part (or the error of each), reading only the row
    groups that hold them."""
    pf = pq.ParquetFile(fs.open_input_file(resolve(part.uri)[1]))
    names = pf.schema_arrow.names
    cols = None if columns is None else [c for c in columns if c in names]
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = {}
    groups = np.searchsorted(starts, wanted, side="right") - 1
    for g in np.unique(groups):
        local = wanted[groups == g] - starts[g]
        try:
            rows = pf.read_row_group(int(g), columns=cols).take(local).to_pylist()
        except (OSError, ValueError) as exc:  # a damaged row group fails its rows only
            rows = [exc] * len(local)
        for r, row in zip(local, rows, strict=True):
            out[int(r + starts[g])] = row
    return out


def _jsonl_rows(fs, part: ManifestPart, offsets: np.ndarray, lengths: np.ndarray) -> dict:
    """Lines by offset (parsed, or the error of each); neighbouring lines in one request."""
    out: dict[int, object] = {}
    order = np.argsort(offsets)
    with fs.open_input_file(resolve(part.uri)[1]) as f:
        i = 0
        while i < len(order):
            j = i
            while (
                j + 1 < len(order)
                and offsets[order[j + 1]] - (offsets[order[j]] + lengths[order[j]]) <= 4096
            ):
                j += 1
            start = int(offsets[order[i]])
            end = int(offsets[order[j]] + lengths[order[j]])
            data = f.read_at(end - start, start)
            for m in order[i : j + 1]:
                a = int(offsets[m]) - start
                try:
                    out[int(offsets[m])] = json.loads(data[a : a + int(lengths[m])])
                except ValueError as exc:  # it parsed when planned
                    out[int(offsets[m])] = ValueError(
                        f"{exc}: the manifest changed after the run was planned (plan it again)"
                    )
            i = j + 1
    return out


def read_rows(
    source: ManifestSource, rows: RowLocations, columns: Sequence[str] | None = None
) -> list[Utterance | SpeechInputError]:
    """The utterances at ``rows``, in their order: parsed, validated, or the error of each.

    ``columns`` narrows a Parquet read (the control pool skips audio). A row whose
    id is no longer the planned one means the manifest changed after planning: an
    error for that row, never another utterance's data under its id.
    """
    if not len(rows):
        return []
    fs = resolve(source.parts[0].uri)[0]
    raw: dict[tuple[int, int], object] = {}
    for k in np.unique(rows.part):
        part = source.parts[int(k)]
        mine = rows.part == k
        try:
            if part.format == "parquet":
                got = _parquet_rows(fs, part, rows.row[mine], columns)
                raw.update(((int(k), r), v) for r, v in got.items())
            else:
                got = _jsonl_rows(fs, part, rows.offset[mine], rows.length[mine])
                for r, off in zip(rows.row[mine], rows.offset[mine], strict=True):
                    raw[(int(k), int(r))] = got[int(off)]
        except (OSError, ValueError) as exc:  # unreachable, or changed under the plan
            for r in rows.row[mine]:
                raw[(int(k), int(r))] = exc
    out: list[Utterance | SpeechInputError] = []
    for i, utt_id in enumerate(rows.ids):
        index = int(rows.index[i])
        where = f"manifest row {index + 1}"
        row = raw[(int(rows.part[i]), int(rows.row[i]))]
        if isinstance(row, Exception):
            out.append(ManifestRowError(utt_id, f"{where} cannot be read: {row}"))
            continue
        given = _given_id(row.get("id", row.get("utterance_id"))) if isinstance(row, dict) else ""
        if (given or f"row{index}") != utt_id:
            out.append(
                ManifestRowError(
                    utt_id,
                    f"{where} now has id {given!r}: the manifest changed after the run was "
                    "planned (plan it again)",
                )
            )
            continue
        try:
            out.append(row_to_utterance(row, source.parts[int(rows.part[i])].base, index))
        except ManifestRowError as exc:
            out.append(ManifestRowError(exc.utterance_id, f"{where}: {exc.reason}"))
        except SpeechInputError as exc:
            out.append(exc)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            out.append(ManifestRowError(utt_id, f"{where}: {type(exc).__name__}: {exc}"))
    return out


def read_manifest(uri: str) -> Manifest:
    """Every utterance of a (small) manifest, and every error, with one index pass."""
    index = index_manifest(uri)
    utterances, errors = [], list(index.errors)
    for item in read_rows(index.source, index.rows):
        (errors if isinstance(item, SpeechInputError) else utterances).append(item)
    return Manifest(uri, utterances, errors)
