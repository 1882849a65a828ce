"""Writing label shards (the layout itself lives in labelgen/format/).

    with ShardWriter("labels/", kind="topk", k=64, vocab_size=32000) as w:
        for row in rows:
            w.write(row)                      # manifest.json appears on exit

A shard is written to `NAME.tmp`, fsynced and renamed; the manifest is written
last, so a directory with a manifest is a complete label set and an
interrupted writer leaves only `.tmp` files, which nothing reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen import format as fmt
from labelgen.errors import OptionError
from labelgen.format import Encoding, FormatError
from labelgen.store import fsutil, storage

# A row group also closes at this many values in its rows' arrays (ids, logprobs, counts, input ids), so what a
# reader decodes at once stays near 100 MB however large k and the windows are: 128 rows of a top-4096 set of
# 256-token windows hold 117M entries, and streaming ten such shards peaked at 17.3 GB (1.3 GB with this bound).
ROW_GROUP_VALUES = 8 << 20


def _values(row: dict) -> int:
    return sum(v.size if isinstance(v, np.ndarray) else len(v) for v in row.values() if isinstance(v, (np.ndarray, list)))


@dataclass
class ShardInfo:
    name: str
    rows: int
    positions: int
    bytes: int
    sha256: str
    row_groups: int
    footer_sha256: str

    def to_dict(self) -> dict:
        return dict(name=self.name, rows=self.rows, positions=self.positions, bytes=self.bytes, sha256=self.sha256,
                    row_groups=self.row_groups, footer_sha256=self.footer_sha256)




def shard_counts(path: Path) -> dict:
    """The counts a writer stored in a finished shard's footer ({} if none)."""
    meta = pq.ParquetFile(path).metadata.metadata or {}
    return json.loads(meta[fmt.COUNTS_META_KEY]) if fmt.COUNTS_META_KEY in meta else {}


def shard_info_from_file(path: Path, kind: str) -> ShardInfo:
    """ShardInfo of a finished shard on disk (used when a job resumes)."""
    pf = pq.ParquetFile(path)
    rk = fmt.record_kind(kind)
    positions = sum(rk.positions(pf.read_row_group(i, columns=[rk.position_column])) for i in range(pf.num_row_groups))
    return ShardInfo(path.name, pf.metadata.num_rows, positions, path.stat().st_size, storage.sha256_file(path),
                     pf.num_row_groups, storage.footer_sha256(path))


class _HashingFile(io.RawIOBase):
    """A file being written that hashes its bytes on the way (no read-back).
    A failed write (a full disk) names the file: the system's error does not."""

    def __init__(self, path: Path):
        self.path = path
        self._f = fsutil.create_fresh(path)
        self.sha256, self.size = hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        with self._naming_the_file():
            return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if not self._f.closed:
            with self._naming_the_file():
                self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            try:
                with self._naming_the_file():
                    self._f.flush()
                    os.fsync(self._f.fileno())
            finally:
                with contextlib.suppress(OSError):   # the flush's error, if any, is the one raised
                    self._f.close()
        super().close()

    @contextlib.contextmanager
    def _naming_the_file(self):
        try:
            yield
        except OSError as e:
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None


class ShardFile:
    """One shard, written atomically. Rows are buffered into row groups of
    `encoding.row_group_rows` (fewer where they reach ROW_GROUP_VALUES);
    `close()` renames the finished file into place and returns its
    ShardInfo; `abort()` (or an exception inside `with`) removes the
    temporary file."""

    def __init__(self, path: Path, kind: str, k: int, vocab_size: int, enc: Encoding, extra_meta: dict | None = None,
                 encoder: Executor | None = None, in_flight: int = 2):
        """`encoder`: encode row groups on this executor's threads (numpy and
        Arrow release the GIL), writing them in order as they finish, with at
        most `in_flight` row groups waiting."""
        self.encoder, self.in_flight = encoder, in_flight
        self._pending: deque[Future] = deque()
        self.path, self.kind, self.k, self.vocab_size, self.enc = Path(path), kind, k, vocab_size, enc
        self.tmp = self.path.with_name(self.path.name + fmt.TMP_SUFFIX)
        self.extra_meta = dict(extra_meta or {})
        self.id_map: fmt.IdMap | None = None
        # Opened at the first row group: the id table (format 1.2) is counted
        # from it and goes into the footer.
        self._writer: pq.ParquetWriter | None = None
        self._buf: list[dict] = []
        self._buf_values = 0
        self.rows = 0
        self.positions = 0
        self.row_groups = 0

    def write(self, row: dict) -> None:
        self._buf.append(row)
        self._buf_values += _values(row)
        if len(self._buf) >= self.enc.row_group_rows or self._buf_values >= ROW_GROUP_VALUES:
            self._flush()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _open(self) -> None:
        meta = dict(self.extra_meta)
        if fmt.uses_id_map(self.kind, self.enc):
            seen = [np.asarray(r[fmt.record_kind(self.kind).id_column]).reshape(-1) for r in self._buf]
            table = fmt.frequency_table(np.concatenate(seen) if seen else np.zeros(0, np.int64), self.vocab_size,
                                        self.enc.id_map_size)
            self.id_map = fmt.IdMap(table, self.vocab_size)
        sch = fmt.schema(self.kind, self.vocab_size, self.enc).with_metadata(
            fmt.file_metadata(self.kind, self.k, self.vocab_size, self.enc, meta))
        self._file = _HashingFile(self.tmp)
        self._writer = pq.ParquetWriter(self._file, sch, **fmt.parquet_writer_options(self.kind, self.enc))
        if self.id_map is not None:   # a footer key of its own, outside the schema: stored once
            self._writer.add_key_value_metadata({fmt.ID_TABLE_FOOTER_KEY: self.id_map.to_meta(self.vocab_size)})

    def _flush(self, wait: bool = False) -> None:
        if self._writer is None:
            self._open()
        if self._buf:
            rows, self._buf, self._buf_values = self._buf, [], 0
            args = (self.kind, rows, self.k, self.vocab_size, self.enc, self.id_map)
            if self.encoder is None:
                self._write(fmt.encode_rows(*args))
            else:
                self._pending.append(self.encoder.submit(fmt.encode_rows, *args))
        limit = 0 if wait else self.in_flight
        while self._pending and (self._pending[0].done() or len(self._pending) > limit):
            self._write(self._pending.popleft().result())

    def _write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch, row_group_size=batch.num_rows)
        self.rows += batch.num_rows
        self.positions += fmt.record_kind(self.kind).positions(batch)
        self.row_groups += 1

    @property
    def approx_bytes(self) -> int:
        return self.tmp.stat().st_size if self.tmp.exists() else 0

    def close(self, counts: dict | None = None) -> ShardInfo:
        """Finish the file; `counts` (e.g. examples, skipped) are stored in its
        footer so a resumed job can total them without redoing the shard."""
        try:
            self._flush(wait=True)
            if counts:
                self._writer.add_key_value_metadata({fmt.COUNTS_META_KEY.decode(): json.dumps(counts)})
            self._writer.close()
            self._file.close()   # flushed and fsynced
        except BaseException:
            self.abort()
            raise
        info = ShardInfo(self.path.name, self.rows, self.positions, self._file.size, self._file.sha256.hexdigest(),
                         self.row_groups, storage.footer_sha256(self.tmp))
        fsutil.commit_file(self.tmp, self.path)
        return info

    def abort(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        try:
            if self._writer is not None:
                self._writer.close()
                self._file.close()
        except (OSError, pa.ArrowException):
            pass   # the error being handled (a full disk, say) fails the close too: the tmp file goes anyway
        storage.delete(self.tmp)

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


class ShardWriter:
    """A label set: rolls a new shard at `max_rows` rows or `max_bytes` bytes
    and writes the manifest on a clean exit (never after an exception).
    `header` goes into the manifest as is (teacher, tokenizer, config, ...)."""

    def __init__(self, out_dir: Path | str, kind: str, k: int, vocab_size: int, *,
                 encoding: Encoding = Encoding(), header: dict | None = None,
                 max_rows: int = 100_000, max_bytes: int = 512 << 20, exist: str = "error"):
        if kind not in fmt.KINDS:
            raise FormatError(f"unknown record kind {kind!r}; this version knows {fmt.KINDS}")
        if kind in fmt.TOPK_KINDS and k < 1:
            raise FormatError(f"k must be >= 1, got {k}")
        self.out_dir, self.kind, self.k, self.vocab_size, self.enc = Path(out_dir), kind, k, vocab_size, encoding
        self.header, self.max_rows, self.max_bytes = header or {}, max_rows, max_bytes
        if exist not in ("error", "overwrite"):
            raise OptionError(f"exist must be error or overwrite, got {exist!r}")
        held = [p for p in storage.list_dir(self.out_dir) if not fsutil.is_lock_file(p)]   # the lock: its caller's
        if held and exist != "overwrite":
            raise FormatError(f"{self.out_dir}: output directory is not empty ({held[0].name}); pass exist='overwrite' "
                              "to replace what it holds")
        if held:
            fsutil.clear_directory(self.out_dir, only=lambda name: not name.endswith(fsutil.LOCK_SUFFIX))
        storage.make_dir(self.out_dir)
        self.shards: list[ShardInfo] = []
        self._file: ShardFile | None = None
        self.manifest: dict | None = None

    def write(self, row: dict) -> None:
        if self._file is None:
            path = self.out_dir / fmt.shard_name(len(self.shards))
            self._file = ShardFile(path, self.kind, self.k, self.vocab_size, self.enc)
        self._file.write(row)
        f = self._file
        if f.rows + f.buffered >= self.max_rows or f.approx_bytes >= self.max_bytes:
            self.shards.append(f.close())
            self._file = None

    @property
    def rows(self) -> int:
        """Rows written so far, the open shard's buffered ones included."""
        f = self._file
        return sum(s.rows for s in self.shards) + (f.rows + f.buffered if f is not None else 0)

    def close(self) -> dict:
        if self._file is not None:
            self.shards.append(self._file.close())
            self._file = None
        self.manifest = fmt.write_manifest(self.out_dir, build_manifest(
            self.kind, self.k, self.vocab_size, self.enc, self.shards, self.header))
        return self.manifest

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def build_manifest(kind: str, k: int, vocab_size: int, enc: Encoding, shards: list[ShardInfo], header: dict) -> dict:
    m = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "kind": kind,
        "k": k,
        "vocab_size": vocab_size,
        "encoding": enc.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    m.update(header)
    m["counts"] = {**header.get("counts", {}), "rows": sum(s.rows for s in shards),
                   "positions": sum(s.positions for s in shards)}
    m["shards"] = [s.to_dict() for s in shards]
    return m
