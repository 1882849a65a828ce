"""Input records for generation: JSONL, JSONL.zst (streamed), Parquet and
plain-text files, or directories of them.

Each record gets a stable `example_id`: the value of `id_field` when given,
else `<file>:<line>` (JSONL), `<file>:<row>` (Parquet) or `<file>` (a text
file is one document). Files are read in sorted order, so the sequence of
records, and hence the partition into shards, is a pure function of the
inputs. Nothing is loaded whole: every reader streams.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from labelgen.errors import LabelgenError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# One JSONL line is one record: bounded so that a damaged or hostile file
# (no newlines, one giant value) fails on its line instead of exhausting memory.
MAX_LINE_BYTES = 256 << 20


class InputError(LabelgenError, ValueError):
    """A bad input record or file; the message starts with file:line."""


@dataclass
class ReadPosition:
    """How far read_records has read: bytes of the input files, compressed
    bytes for .zst (the measure of a progress bar that needs no counting pass)."""
    bytes: int = 0


@dataclass
class Record:
    example_id: str
    where: str
    text: str | None = None
    prompt: str | None = None
    messages: list | None = None


@dataclass(frozen=True)
class FieldSpec:
    text_field: str = "text"
    prompt_field: str | None = None
    messages_field: str | None = None
    id_field: str | None = None

    @property
    def wanted(self) -> str:
        return self.messages_field or self.prompt_field or self.text_field


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named, plus every non-hidden file under directories named, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory (--input)")
    if not files:
        raise InputError(f"no input files under {', '.join(paths)} (--input)")
    return files


def file_kind(path: Path) -> str:
    """jsonl, jsonl.zst, parquet or text, by file name."""
    name = path.name.lower()
    if name.endswith(".zst") and name[:-4].endswith(JSONL_SUFFIXES):
        return "jsonl.zst"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _record(obj, where: str, default_id: str, spec: FieldSpec) -> Record:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    field = spec.wanted
    if field not in obj or obj[field] is None:
        raise InputError(f"{where}: no field {field!r} (fields: {', '.join(map(str, obj)) or 'none'})")
    value = obj[field]
    ex_id = default_id
    if spec.id_field:
        if obj.get(spec.id_field) in (None, ""):
            raise InputError(f"{where}: no id field {spec.id_field!r}")
        ex_id = str(obj[spec.id_field])
    if spec.messages_field:
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
            raise InputError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} messages")
        return Record(ex_id, where, messages=value)
    if not isinstance(value, str):
        raise InputError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{where}: field {field!r} is empty")
    return Record(ex_id, where, **{"prompt" if spec.prompt_field else "text": value})


def _safe_record(obj, where: str, default_id: str, spec: FieldSpec) -> Record | InputError:
    try:
        return _record(obj, where, default_id, spec)
    except InputError as e:
        return e


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file's frames, one after another. A
    file that ends inside a frame (cut short in a copy or a crash) raises
    InputError at its end instead of looking like a shorter, complete file."""

    def __init__(self, path: Path, f: io.BufferedIOBase):
        import zstandard
        self.path, self.f, self.zstd = path, f, zstandard
        self.obj = zstandard.ZstdDecompressor().decompressobj()
        self.started = False   # the current frame has consumed input
        self.pending, self.pos = b"", 0   # decompressed bytes not yet returned start at pos

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.pos == len(self.pending):
            chunk = self.f.read(1 << 16)
            if not chunk:
                if self.started and not self.obj.eof:
                    raise InputError(f"{self.path}: compressed stream ends inside a frame (truncated file?)")
                return 0
            self.pending, self.pos = b"", 0
            while chunk:
                try:
                    self.pending += self.obj.decompress(chunk)
                except self.zstd.ZstdError as e:
                    raise InputError(f"{self.path}: corrupt zstd stream ({e})") from None
                self.started = True
                if not self.obj.eof:
                    break
                # a frame ended: the rest of this chunk starts the next one
                chunk = self.obj.unused_data
                self.obj = self.zstd.ZstdDecompressor().decompressobj()
                self.started = False
        n = min(len(buf), len(self.pending) - self.pos)
        buf[:n] = self.pending[self.pos:self.pos + n]
        self.pos += n
        return n


def jsonl_lines(path: Path, at: Callable[[int], None] | None = None) -> Iterator[tuple[int, str | InputError]]:
    """(line number, text) of each non-blank line of a JSONL or JSONL.zst
    file; a line that is not UTF-8, or longer than MAX_LINE_BYTES, comes as
    an InputError. `at` follows the bytes of the file read (compressed bytes
    for .zst)."""
    max_bytes = MAX_LINE_BYTES
    with open(path, "rb") as f:
        binary = io.BufferedReader(_ZstdFrames(path, f), 1 << 20) if file_kind(path) == "jsonl.zst" else f
        n = 0
        while raw := binary.readline(max_bytes + 1):
            n += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while (rest := binary.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass   # skip the rest of the line without holding it
                yield n, InputError(f"{path}:{n}: line longer than {max_bytes >> 20} MiB; one record per line")
                continue
            if at is not None:
                at(f.tell())
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, InputError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                yield n, line


class _RepeatedKey(ValueError):
    pass


def _unique(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _RepeatedKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def parse_json(line: str, where: str, unique_keys: bool = False):
    """One JSON value; any way it fails is an InputError naming `where`. With
    `unique_keys` an object repeating a key is refused (json keeps the last)."""
    try:
        return json.loads(line, object_pairs_hook=_unique if unique_keys else None)
    except _RepeatedKey as e:
        raise InputError(f"{where}: key {str(e)[:40]!r} appears twice in one object") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None


def _read_jsonl(path: Path, spec: FieldSpec, at: Callable[[int], None], name: str) -> Iterator[Record | InputError]:
    for n, line in jsonl_lines(path, at):
        if isinstance(line, InputError):
            yield line
            continue
        try:
            obj = parse_json(line, f"{path}:{n}")
        except InputError as e:
            yield e
            continue
        yield _safe_record(obj, f"{path}:{n}", f"{name}:{n}", spec)


def _read_parquet(path: Path, spec: FieldSpec, at: Callable[[int], None], name: str) -> Iterator[Record | InputError]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: unreadable Parquet ({e})") from None
    cols = [c for c in (spec.wanted, spec.id_field) if c]
    missing = [c for c in cols if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row, size = 0, path.stat().st_size
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        at(size * (row + batch.num_rows) // max(pf.metadata.num_rows, 1))
        for obj in batch.to_pylist():
            yield _safe_record(obj, f"{path}:{row}", f"{name}:{row}", spec)
            row += 1


def _read_text(path: Path, name: str) -> Iterator[Record]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    if not text.strip():
        raise InputError(f"{path}:1: empty text file")
    yield Record(name, f"{path}:1", text=text)


def read_records(files: list[Path], spec: FieldSpec = FieldSpec(), position: ReadPosition | None = None,
                 names: list[str] | None = None) -> Iterator[Record | InputError]:
    """All records of the input files (expand_paths' list) in a fixed order.
    A bad record is yielded as an InputError (not raised) so the caller
    decides whether to skip it; a bad file (unreadable, corrupt) is yielded
    once and ends that file. `position` follows the bytes read. `names`
    (one per file) replace the files' paths in default example ids: the
    same records read from a copy keep the ids they were labelled with."""
    position = position or ReadPosition()
    done = 0
    for path, name in zip(files, names or map(str, files)):
        def at(n: int, base: int = done) -> None:
            position.bytes = base + n
        kind = file_kind(path)
        if kind == "text" and (spec.prompt_field or spec.messages_field):
            yield InputError(f"{path}: plain-text files hold corpora; --prompt-field/--messages-field need JSONL or Parquet")
            continue
        try:
            size = path.stat().st_size
            if kind == "text":
                at(size)
                yield from _read_text(path, name)
            elif kind == "parquet":
                yield from _read_parquet(path, spec, at, name)
            else:
                yield from _read_jsonl(path, spec, at, name)
        except InputError as e:
            yield e
        except OSError as e:
            yield InputError(f"{path}: cannot read ({e.strerror or e})")
            continue
        done += size
        position.bytes = done
