"""The manifest: a label set's table of contents, written last, and the
identities (dataset and tokenizer fingerprints) readers check against. Its
shard entries are held column-wise (ShardTable); a set of more than
SHARD_TABLE_MIN shards keeps them in a Parquet shard table beside
manifest.json (format 2.3), which stays small."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

from labelgen.errors import LabelgenError, OptionError, one_line
from labelgen.format.codec import MAX_VOCAB
from labelgen.format.schema import (FORMAT_NAME, KINDS, MANIFEST_NAME, SHARD_SUFFIX, SHARD_TABLE_PREFIX,
                                    SHARD_TABLE_VERSION, Encoding, FormatError, check_version)
from labelgen.store import storage

MAX_HEAD_BYTES = 64 << 20   # a manifest.json larger than this is not one labelgen wrote (10,000 inline entries: 3 MB)


SHARD_TABLE_MIN = 10_000
"""A manifest lists more shards than this in a Parquet shard table beside it
(format 2.3): a million entries as JSON are 380 MB that every training rank
would parse into 2.6 GB of dicts; the table is read column-wise."""
_TABLE_ROW_GROUP = 1 << 16
_INTS = ("rows", "positions", "bytes", "row_groups")
_HASHES = ("sha256", "footer_sha256")
_TABLE_SCHEMA = None


def _schema():
    global _TABLE_SCHEMA
    if _TABLE_SCHEMA is None:
        import pyarrow as pa
        _TABLE_SCHEMA = pa.schema([("name", pa.string())] + [(c, pa.int64()) for c in _INTS]
                                  + [(c, pa.binary(32)) for c in _HASHES])
    return _TABLE_SCHEMA


class ShardTable(Sequence):
    """A label set's shard entries, held column-wise (Arrow arrays, the hashes
    as 32 bytes): read from a manifest's inline list or its shard table and
    checked as a whole. `table[i]` is entry i as a dict (name, rows, positions,
    bytes, sha256, and row_groups and footer_sha256 where the writer recorded
    them); iterating yields the entries one at a time; `column(name)` is a
    column as numpy (counts) or Arrow (names, hashes)."""

    def __init__(self, table):
        self.table = table

    @classmethod
    def from_entries(cls, entries: list, where: str) -> "ShardTable":
        """The table of a manifest's inline list (or a list of ShardInfo dicts), each entry checked."""
        import pyarrow as pa
        if not isinstance(entries, list):
            raise FormatError(f"{where}: shards must be a list")
        for i, shard in enumerate(entries):
            check_shard_entry(shard, f"{where}: shards[{i}]")
        columns = {"name": pa.array([s["name"] for s in entries], pa.string())}
        for c in _INTS:
            columns[c] = pa.array([s.get(c) for s in entries], pa.int64())
        for c in _HASHES:
            try:
                columns[c] = pa.array([bytes.fromhex(s[c]) if s.get(c) is not None else None for s in entries],
                                      pa.binary(32))
            except (ValueError, TypeError, pa.ArrowInvalid):
                raise FormatError(f"{where}: a shard's {c} is not 64 hex digits") from None
        return cls(pa.table(columns, schema=_schema()))._checked(where)

    def _checked(self, where: str) -> "ShardTable":
        """Entries that can describe files: each shard named once, and a row-group count (where recorded) that
        fits the row count: at least one group for rows, at most one group a row."""
        import pyarrow.compute as pc
        names = self.table.column("name")
        if len(names) and pc.count_distinct(names).as_py() != len(names):
            counts = pc.value_counts(names)
            twice = counts.field("values")[int(pc.index(pc.greater(counts.field("counts"), 1), True).as_py())]
            raise FormatError(f"{where}: shard {twice} is listed more than once (a tampered or damaged manifest)")
        rows, groups = self.column("rows"), self.column("row_groups")
        bad = (groups >= 0) & (((rows > 0) & (groups < 1)) | (groups > rows))
        if bad.any():
            i = int(bad.argmax())
            raise FormatError(f"{where}: shard {names[i]} has {rows[i]} rows in {groups[i]} row groups, which no "
                              "writer makes (a tampered or damaged manifest)")
        return self

    @classmethod
    def read(cls, path, count: int, footer_sha256: str | None, where: str, file_hashes: bool = True,
             size: int | None = None) -> "ShardTable":
        """A shard table file, its footer checked against the manifest's hash
        and its pages against their CRC32 as they are read, then its entries
        (all of them at once, column-wise). Without `file_hashes` the shards'
        whole-file sha256 stays unread (a third of the table: what only
        --verify and validate compare; opening a shard checks its footer hash)."""
        import pyarrow.compute as pc
        if count < 1:
            raise FormatError(f"{where}: the shard table lists {count} shards; a label set has at least one")
        if path.is_symlink() and path.resolve().parent != path.parent.resolve():   # as a shard's symlink is refused
            raise FormatError(f"{path}: a symlink out of the label directory; the shard table must lie inside it")
        try:
            actual = path.stat().st_size   # one request on a bucket
        except FileNotFoundError:
            raise FormatError(f"{path}: the shard table the manifest names is missing") from None
        if size is not None and actual != size:
            raise FormatError(f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced)")
        if footer_sha256 is not None and storage.footer_sha256(path) != footer_sha256:
            raise FormatError(f"{path}: shard table's Parquet footer does not match the manifest's hash (corrupted)")
        try:
            pf = storage.open_parquet(path, page_checksum_verification=True, thrift_string_size_limit=64 << 20,
                                      thrift_container_size_limit=1 << 20)
            if pf.metadata.num_rows != count or not pf.schema_arrow.equals(_schema()):
                raise FormatError(f"{path}: {pf.metadata.num_rows} entries, or columns other than a shard table's; "
                                  f"the manifest says {count}")
            table = pf.read([c for c in _schema().names if file_hashes or c != "sha256"], use_threads=False)
        except FormatError:
            raise
        except Exception as e:   # a damaged table surfaces as any error of the parser
            raise FormatError(f"{path}: unreadable shard table ({one_line(e)})") from None
        names = table.column("name")
        plain = pc.match_substring_regex(names, r"^[^./\\\x00][^/\\\x00]*\.parquet$")
        if names.null_count or not pc.all(plain).as_py():
            bad = names[int(pc.index(plain, False).as_py())] if not names.null_count else None
            raise FormatError(f"{where}: shard name {bad} is not a plain file name inside the label directory")
        for c in ("rows", "positions", "bytes"):
            column = table.column(c)
            if column.null_count or (len(column) and pc.min(column).as_py() < 0):
                raise FormatError(f"{where}: a shard's {c} is missing or negative")
        if file_hashes and table.column("sha256").null_count:
            raise FormatError(f"{where}: a shard's sha256 is missing")
        return cls(table)._checked(where)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ShardTable(self.table.slice(*_span(i, len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = {c: self.table.column(c)[i].as_py() for c in self.table.column_names}
        return _entry(row)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                yield _entry(row)

    def column(self, name: str):
        """Counts as an int64 numpy array (a missing row_groups is -1); names and hashes as Arrow."""
        column = self.table.column(name)
        if name in _INTS and not column.null_count:   # the chunks' buffers viewed, copied once into one array
            import numpy as np
            return np.concatenate([c.to_numpy() for c in column.chunks]) if column.num_chunks else np.zeros(0, np.int64)
        column = column.combine_chunks()
        return column.fill_null(-1).to_numpy() if name in _INTS else column

    @property
    def names(self) -> list[str]:
        return self.table.column("name").to_pylist()

    def to_list(self) -> list[dict]:
        return list(self)

    def to_parquet(self) -> bytes:
        """The table as a Parquet file (zstd, page checksums): the same bytes for the same entries."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        if not self.table.schema.equals(_schema()):
            raise ValueError("a shard table read without its file hashes is not written back")
        sink = pa.BufferOutputStream()
        pq.write_table(self.table, sink, compression="zstd", row_group_size=_TABLE_ROW_GROUP,
                       write_page_checksum=True, write_statistics=False)
        return sink.getvalue().to_pybytes()


def _entry(row: dict) -> dict:
    """A table row as a manifest entry: hashes as hex, unrecorded (or unread) fields left out."""
    for c in _HASHES:
        if row.get(c) is not None:
            row[c] = row[c].hex()
    return {k: v for k, v in row.items() if v is not None}


def _span(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise IndexError("a shard table slices with step 1")
    return start, max(0, stop - start)


def _head(manifest: dict) -> tuple[dict, bytes | None]:
    """(the manifest as written, the shard table's bytes or None): a list of
    more than SHARD_TABLE_MIN shards becomes a table named after its hash,
    which the head names with its size, hashes and count."""
    head = {k: v for k, v in manifest.items() if k not in ("shards", "shard_table", "fingerprint")}
    shards = manifest["shards"]
    if len(shards) <= SHARD_TABLE_MIN:
        head["shards"] = shards.to_list() if isinstance(shards, ShardTable) else list(shards)
        return head, None
    table = shards if isinstance(shards, ShardTable) else ShardTable.from_entries(list(shards), "manifest")
    data = table.to_parquet()
    digest = hashlib.sha256(data).hexdigest()
    n = int.from_bytes(data[-8:-4], "little")   # the footer: its metadata, its length and the magic
    head["format_version"] = max(head["format_version"], SHARD_TABLE_VERSION, key=_version)
    head["shard_table"] = {"name": f"{SHARD_TABLE_PREFIX}{digest[:16]}{SHARD_SUFFIX}",   # unique per content
                           "count": len(table), "bytes": len(data), "sha256": digest,
                           "footer_sha256": hashlib.sha256(data[-8 - n:]).hexdigest()}
    return head, data


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(v).split("."))


def dataset_fingerprint(manifest: dict) -> str:
    """Identity of a label set: format, kind, tokenizer and every shard's
    bytes (their entries, or the shard table's hash, which covers them)."""
    head = manifest if "shard_table" in manifest else _head(manifest)[0]
    ident = {
        "format_version": head["format_version"],
        "kind": head["kind"],
        "tokenizer": head.get("tokenizer", {}).get("fingerprint"),
    }
    if "shard_table" in head:
        ident["shard_table"] = head["shard_table"]["sha256"]
    else:
        ident["shards"] = [(s["name"], s["bytes"], s["sha256"]) for s in head["shards"]]
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def write_manifest(out_dir, manifest: dict, name: str = MANIFEST_NAME, if_absent: bool = False) -> dict:
    """Write the manifest (last: it makes the label set) into a directory or
    bucket prefix, its shard table first where it has one (a worker's partial
    manifest `name` keeps its list); `if_absent`: fail (storage.AlreadyExists)
    when a manifest is there. Returns the manifest as written, its "shards"
    a list or (with a shard table) a ShardTable, as read_manifest returns it."""
    out = storage.location(out_dir)
    head, table = _head(manifest) if name == MANIFEST_NAME else ({**manifest, "shards": list(manifest["shards"])}, None)
    head.pop("fingerprint", None)
    head["fingerprint"] = dataset_fingerprint(head)
    if table is not None:
        storage.write_bytes(out / head["shard_table"]["name"], table)
    storage.write_bytes(out / name, (json.dumps(head, indent=2, sort_keys=False) + "\n").encode(), if_absent=if_absent)
    if table is None:
        return head
    shards = manifest["shards"]
    return {**head, "shards": shards if isinstance(shards, ShardTable) else ShardTable.from_entries(list(shards), name)}


def _not_a_label_set(label_dir, path) -> LabelgenError:
    """Why `label_dir` has no manifest, saying what to pass instead: a wrong path is the user's (OptionError), a
    directory without its manifest an unfinished or damaged set (FormatError)."""
    if label_dir.is_file():
        if label_dir.name.endswith(SHARD_SUFFIX):
            return OptionError(f"{label_dir}: a shard file, not a label set: pass the directory it is in "
                               f"({label_dir.parent})")
        return OptionError(f"{label_dir}: a file, not a label set: pass the directory `labelgen generate --out` wrote")
    if not label_dir.is_dir():
        return OptionError(f"{label_dir}: no such label set (nothing at that path)")
    return FormatError(f"{path}: no manifest; not a complete label set (the job did not finish, or run "
                       "`labelgen finalize` after all workers)")


def read_manifest(label_dir: Path | str, file_hashes: bool = True) -> dict:
    """A label set's manifest, checked; its "shards" are a ShardTable (from
    the inline list, or from the shard table it names; without
    `file_hashes`, a shard table's entries lack the whole-file sha256)."""
    label_dir = storage.location(label_dir)
    path = label_dir / MANIFEST_NAME
    if not path.is_file():
        raise _not_a_label_set(label_dir, path)
    try:
        m = json.loads(storage.read_text(path, MAX_HEAD_BYTES))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a labelgen manifest (missing \"format\": \"{FORMAT_NAME}\")")
    check_version(m.get("format_version"), str(path))
    for key in ("kind", "k", "vocab_size", "encoding"):
        if key not in m:
            raise FormatError(f"{path}: manifest lacks {key!r}")
    if "shards" not in m and "shard_table" not in m:
        raise FormatError(f"{path}: manifest lacks 'shards'")
    if m["kind"] not in KINDS:
        raise FormatError(f"{path}: unknown record kind {m['kind']!r}; this version knows {KINDS}")
    check_bounds(m, str(path))
    if not isinstance(m["encoding"], dict):
        raise FormatError(f"{path}: encoding must be a mapping")
    try:
        Encoding.from_dict(m["encoding"])
    except (TypeError, FormatError) as e:
        raise FormatError(f"{path}: bad encoding ({e})") from None
    if "shard_table" in m:
        t = m["shard_table"]
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"].startswith(SHARD_TABLE_PREFIX) \
                or not t["name"].endswith(SHARD_SUFFIX) or "/" in t["name"] or not isinstance(t.get("count"), int) \
                or not isinstance(t.get("sha256"), str) or not isinstance(t.get("footer_sha256"), str):
            raise FormatError(f"{path}: shard_table must name a {SHARD_TABLE_PREFIX}*{SHARD_SUFFIX} file beside it, "
                              "with its count and hashes")
        if "bytes" in t and (not isinstance(t["bytes"], int) or t["bytes"] < 0):
            raise FormatError(f"{path}: shard_table.bytes {t['bytes']!r} is not a non-negative integer")
        m["shards"] = ShardTable.read(label_dir / t["name"], t["count"], t["footer_sha256"], str(path), file_hashes,
                                      t.get("bytes"))
    else:
        m["shards"] = ShardTable.from_entries(m["shards"], str(path))
    return m


# A label set names its shards; they must be plain files inside it.
MAX_K = 1 << 16


def check_bounds(m: dict, where: str) -> None:
    """The manifest's sizes, which readers allocate by, within what the format allows."""
    V, k = m["vocab_size"], m["k"]
    if not isinstance(V, int) or not 0 < V <= MAX_VOCAB:
        raise FormatError(f"{where}: vocab_size {V!r} outside (0, {MAX_VOCAB}]")
    if not isinstance(k, int) or not 0 <= k <= min(V, MAX_K):
        raise FormatError(f"{where}: k {k!r} outside [0, min(vocab_size, {MAX_K})]")
    seq = (m.get("config") or {}).get("max_seq_len")
    if seq is not None and (not isinstance(seq, int) or not 2 <= seq <= 1 << 24):
        raise FormatError(f"{where}: config.max_seq_len {seq!r} outside [2, 2^24]")


def check_shard_entry(shard: Any, where: str) -> None:
    """A manifest's shard entry: a plain file name (no directories, no '..',
    not hidden) and non-negative integer counts."""
    if not isinstance(shard, dict):
        raise FormatError(f"{where}: not a mapping")
    name = shard.get("name")
    if (not isinstance(name, str) or not name.endswith(SHARD_SUFFIX) or name.startswith(".")
            or "/" in name or "\\" in name or "\0" in name or name != os.path.basename(name)):
        raise FormatError(f"{where}: shard name {name!r} is not a plain file name inside the label directory")
    for key in ("rows", "positions", "bytes"):
        if not isinstance(shard.get(key), int) or shard[key] < 0:
            raise FormatError(f"{where}: {key} {shard.get(key)!r} is not a non-negative integer")
    if not isinstance(shard.get("sha256"), str):
        raise FormatError(f"{where}: sha256 missing")


def tokenizer_fingerprint(tokenizer) -> dict:
    """Fingerprint of a HF tokenizer: vocabulary, merges, special tokens and
    normalisation, with a hash per part so a mismatch can say what differs.
    Two tokenizers with equal fingerprints tokenize alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        ident = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")}
    else:
        ident = {"model": sorted(tokenizer.get_vocab().items())}
    ident["special_tokens"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}

    def h(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": f"sha256:{h(ident)}", "vocab_size": len(tokenizer),
            "parts": {k: h(v)[:16] for k, v in ident.items()}, "special_tokens": ident["special_tokens"]}


def tokenizer_difference(a: dict, b: dict) -> str:
    """What differs between two tokenizer fingerprints, in words."""
    diffs = []
    if a.get("vocab_size") != b.get("vocab_size"):
        diffs.append(f"vocabulary size {a.get('vocab_size')} vs {b.get('vocab_size')}")
    names = {"model": "vocabulary/merges", "added_tokens": "added tokens", "normalizer": "normalizer",
             "pre_tokenizer": "pre-tokenizer", "post_processor": "post-processor", "special_tokens": "special tokens"}
    pa_, pb_ = a.get("parts", {}), b.get("parts", {})
    diffs += [names[k] for k in names if k in pa_ and k in pb_ and pa_[k] != pb_[k]]
    return ", ".join(diffs) or "fingerprints differ"
