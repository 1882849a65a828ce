"""Reading label sets: ShardReader streams a set's rows (or row groups),
local or in a bucket, checking what it reads against the manifest.

    for row in ShardReader("labels/").rows(columns=["input_ids", "topk_ids"]):
        ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from labelgen import format as fmt
from labelgen.format import Encoding, FormatError
from labelgen.store import storage


def max_row_group_bytes() -> int:
    """Uncompressed bytes a row group may always hold ($LABELGEN_MAX_ROW_GROUP_MB, default 64 MiB); above it,
    only at most MAX_EXPANSION times its compressed size."""
    return int(float(os.environ.get("LABELGEN_MAX_ROW_GROUP_MB", "64")) * (1 << 20))


_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}
MAX_ID_BYTES = 64 << 10   # an example id or finish reason (the dictionary-encoded strings): longer is not a label set's
MAX_EXPANSION = 100   # labels compress 2-20x (label sets of the tests' teacher: at most 8.3x a row group)


def _plain_strings(table):
    """Dictionary-encoded string columns decoded, once no value is longer than
    MAX_ID_BYTES: one long value repeated by every row would otherwise
    decode to rows x its length."""
    import pyarrow as pa
    import pyarrow.compute as pc
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            column = table.column(i).combine_chunks()
            longest = pc.max(pc.binary_length(column.dictionary)).as_py() or 0
            if longest > MAX_ID_BYTES:
                raise FormatError(f"{field.name}: a value of {longest:,} bytes; an example id or finish reason is at "
                                  f"most {MAX_ID_BYTES:,}")
            table = table.set_column(i, pa.field(field.name, field.type.value_type), column.dictionary_decode())
    return table


def check_row_group_sizes(meta, rows_per_group: int, where: str) -> None:
    """Refuse, from the Parquet footer and before anything is decompressed,
    row groups a writer of this format does not make: more rows than the
    set's encoding puts in one, or an uncompressed size far beyond its
    compressed one (a decompression bomb: a few KB that would need GBs)."""
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        if rg.num_rows > rows_per_group:
            raise FormatError(f"{where}: row group {i} declares {rg.num_rows:,} rows; this set's writer puts at most "
                              f"{rows_per_group:,} in one")
        columns = [rg.column(j) for j in range(rg.num_columns)]
        packed = sum(c.total_compressed_size for c in columns)
        # Run-length and dictionary encoding repeat a value without bytes: count the values a column decodes to.
        size = max(sum(max(c.total_uncompressed_size, c.num_values * _WIDTHS.get(c.physical_type, 0)) for c in columns),
                   rg.total_byte_size)
        if size > max_row_group_bytes() and size > MAX_EXPANSION * packed:
            raise FormatError(f"{where}: row group {i} would decompress to {size / 2**20:,.0f} MiB from "
                              f"{packed / 2**10:,.0f} KiB ({size / max(packed, 1):,.0f}x); refused as a decompression "
                              "bomb")


class ShardReader:
    """Lazy reader of a label set, driven by its manifest. Holds at most one
    row group in memory. Checks each shard's size on open (`verify=True`
    also checks its sha256) and its format metadata; `checksums` (default on)
    checks each shard's footer against the manifest's hash and every data
    page it decodes against the page's CRC32."""

    def __init__(self, label_dir: Path | str, verify: bool = False, checksums: bool = True,
                 file_hashes: bool = True):
        self.dir = storage.location(label_dir)   # a local Path, or a StorePath for s3:// and gs://
        # file_hashes=False: a training reader (no --verify) holds no shard's whole-file sha256 (read_manifest)
        self.manifest = fmt.read_manifest(self.dir, file_hashes or verify)
        m = self.manifest
        self.kind, self.k, self.vocab_size = m["kind"], int(m["k"]), int(m["vocab_size"])
        self.encoding = Encoding.from_dict(m["encoding"])
        self.verify, self.checksums = verify, checksums
        self._id_map: tuple = (None, None)   # (shard name, IdMap) of the last shard read

    @property
    def shards(self) -> "fmt.ShardTable":
        return self.manifest["shards"]

    def shard_path(self, shard: dict) -> Path:
        """The shard's file, which must exist and lie inside the label directory
        (the manifest's names are checked on read; a symlink must not lead out)."""
        path = self.dir / shard["name"]
        if not path.is_file():
            raise FormatError(f"{path}: listed in the manifest but missing")
        if path.is_symlink() and path.resolve().parent != self.dir.resolve():
            raise FormatError(f"{path}: a symlink out of the label directory; shards must lie inside it")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise FormatError(f"{path}: {size} bytes, manifest says {shard['bytes']} (truncated or replaced)")
        return path

    def check_files(self) -> None:
        """Every listed shard exists with its manifest size (and sha256 with
        verify=True): a request per shard (and a full read), so callers ask for
        it (--verify); reading a shard checks it anyway."""
        for shard in self.shards:
            path = self.shard_path(shard)
            if self.verify and storage.sha256_file(path) != shard["sha256"]:
                raise FormatError(f"{path}: sha256 does not match the manifest (corrupted)")

    def open_shard(self, shard: dict) -> pq.ParquetFile:
        """The shard's Parquet file, its footer checked against the manifest's
        hash (format 1.2: the footer holds the schema, the row group index and
        the id table) and its data pages against their CRC32 as they are read."""
        path = self.shard_path(shard)
        # The footer's bytes are checked before the Parquet parser reads them: pyarrow aborts the whole process
        # (std::terminate, not an exception) on some damaged footers, e.g. a size-statistics histogram whose
        # length was flipped ("Repetition level histogram size mismatch", pyarrow 26).
        if self.checksums and "footer_sha256" in shard and storage.footer_sha256(path) != shard["footer_sha256"]:
            raise FormatError(f"{path}: Parquet footer does not match the manifest's hash (corrupted)")
        options = dict(page_checksum_verification=self.checksums, thrift_string_size_limit=64 << 20,
                       thrift_container_size_limit=1 << 20)
        try:
            try:   # dictionary-encoded strings stay encoded until their values are checked (read_row_group)
                pf = storage.open_parquet(path, read_dictionary=list(fmt.record_kind(self.kind).dictionary_columns),
                                          **options)
            except KeyError:   # no such columns: not this kind's shard, as its footer then says
                pf = storage.open_parquet(path, **options)
        except Exception as e:  # a damaged footer can surface as any error of the parser
            raise FormatError(f"{path}: unreadable Parquet ({fmt.one_line(e)})") from None
        info = fmt.read_file_metadata(pf.schema_arrow.metadata, str(path))
        if info.get("kind") != self.kind:
            raise FormatError(f"{path}: holds {info.get('kind')!r} records, manifest says {self.kind!r}")
        if pf.metadata.num_rows != shard["rows"]:   # the manifest's counts are what a loader plans with
            raise FormatError(f"{path}: {pf.metadata.num_rows} rows, manifest says {shard['rows']}")
        check_row_group_sizes(pf.metadata, self.encoding.row_group_rows, str(path))
        return pf

    def id_map(self, shard: dict, pf: pq.ParquetFile) -> fmt.IdMap | None:
        """The shard's id table (format 1.2 topk shards), or None."""
        if not fmt.uses_id_map(self.kind, self.encoding):
            return None
        if self._id_map[0] != shard["name"]:
            where = str(self.dir / shard["name"])
            table = (pf.metadata.metadata or {}).get(fmt.ID_TABLE_FOOTER_KEY)   # 2.0
            if table is None:   # 1.2, 1.3: inside the labelgen metadata
                table = fmt.read_file_metadata(pf.schema_arrow.metadata, where).get(fmt.ID_TABLE_KEY)
            if table is None:
                raise FormatError(f"{where}: the encoding renumbers ids but the shard holds no id table")
            self._id_map = (shard["name"], fmt.IdMap.from_meta(table, self.vocab_size, where))
        return self._id_map[1]

    def read_row_group(self, shard_index: int, row_group: int, columns: list[str] | None = None,
                       pf: pq.ParquetFile | None = None, rank_order: bool = True) -> dict[str, Any]:
        """Decoded columns of one row group (see format.decode_batch)."""
        shard = self.shards[shard_index]
        pf = pf or self.open_shard(shard)
        wanted = columns
        if columns is not None and self.kind in fmt.TOPK_KINDS and self.encoding.id_order == "sorted" and rank_order \
                and fmt.TOPK_IDS in columns and fmt.TOPK_LOGPROBS not in columns:
            columns = list(columns) + [fmt.TOPK_LOGPROBS]   # ids are put in rank order by their logprobs
        if columns is not None and self.kind in fmt.TOPK_KINDS and self.encoding.variable_k \
                and {fmt.TOPK_IDS, fmt.TOPK_LOGPROBS} & set(columns) and fmt.TOPK_LENGTHS not in columns:
            columns = list(columns) + [fmt.TOPK_LENGTHS]    # entries kept per position
        if columns is not None and fmt.SAMPLED_IDS in columns and fmt.SAMPLED_LENGTHS not in columns:
            columns = list(columns) + [fmt.SAMPLED_LENGTHS]  # deltas restart at every position
        where = f"{self.dir / shard['name']}: row group {row_group}"
        self.check_row_group(pf, row_group, shard, where)
        try:
            table = _plain_strings(pf.read_row_group(row_group, columns=columns))
            decoded = fmt.decode_batch(table, self.kind, self.k, self.encoding, self.id_map(shard, pf), rank_order)
            if self.kind == "scored" and fmt.INPUT_IDS in decoded and fmt.COVERAGE in decoded:
                tokens, positions = np.diff(decoded[fmt.INPUT_IDS][1]), np.diff(decoded[fmt.COVERAGE][1])
                if ((positions < 1) | (positions > tokens - 1)).any():
                    row = int(np.flatnonzero((positions < 1) | (positions > tokens - 1))[0])
                    raise FormatError(f"row {row}: {positions[row]} completion positions for {tokens[row]} input ids")
            if fmt.ASSISTANT_MASK in decoded and fmt.INPUT_IDS in decoded:   # one mark per input id, row by row
                marks, tokens = np.diff(decoded[fmt.ASSISTANT_MASK][1]), np.diff(decoded[fmt.INPUT_IDS][1])
                if (marks != tokens).any():
                    row = int(np.flatnonzero(marks != tokens)[0])
                    raise FormatError(f"row {row}: {fmt.ASSISTANT_MASK} has {marks[row]} marks for {tokens[row]} "
                                      "input ids (one per input id)")
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        except Exception as e:  # damaged pages surface as checksum, decoding or shape errors
            raise FormatError(f"{where}: {fmt.one_line(e)}") from None
        return decoded if wanted is None else {c: decoded[c] for c in wanted}

    def check_row_group(self, pf: pq.ParquetFile, row_group: int, shard: dict, where: str) -> None:
        """Refuse, before anything is decoded, a row group whose declared sizes
        break what the manifest and the format allow: it could make a reader
        allocate without bound."""
        if not 0 <= row_group < pf.num_row_groups:
            raise FormatError(f"{where}: no such row group")
        md = pf.metadata.row_group(row_group)
        counts = {md.column(j).path_in_schema.split(".")[0]: md.column(j).num_values for j in range(md.num_columns)}
        missing = [c for c in fmt.schema(self.kind, self.vocab_size, self.encoding).names if c not in counts]
        if missing:
            raise FormatError(f"{where}: lacks column(s) {', '.join(missing)}")
        rows = md.num_rows
        if rows > shard["rows"]:
            raise FormatError(f"{where}: {rows} rows, more than the manifest's {shard['rows']} for the whole shard")
        seq = (self.manifest.get("config") or {}).get("max_seq_len")
        tokens = counts.get(fmt.INPUT_IDS)
        if tokens is not None and seq and tokens > rows * seq:
            raise FormatError(f"{where}: {tokens} input ids in {rows} rows, more than max_seq_len {seq} allows")
        if fmt.ASSISTANT_MASK in counts and tokens is not None and counts[fmt.ASSISTANT_MASK] != tokens:
            raise FormatError(f"{where}: {fmt.ASSISTANT_MASK} holds {counts[fmt.ASSISTANT_MASK]} values for {tokens} input ids")
        if self.kind in fmt.TOPK_KINDS:
            positions = counts[fmt.COVERAGE]
            # topk: one position per input id after the first; scored: at most that (completion tokens only)
            fits = tokens is None or (positions == tokens - rows if self.kind == "topk" else positions <= tokens - rows)
            if positions > shard["positions"] or not fits:
                raise FormatError(f"{where}: {positions} positions do not fit the input ids or the manifest")
            if self.kind == "scored" and counts[fmt.SAMPLING_LOGPROB] != positions:
                raise FormatError(f"{where}: {fmt.SAMPLING_LOGPROB} holds {counts[fmt.SAMPLING_LOGPROB]} values "
                                  f"for {positions} positions")
            if self.encoding.variable_k and counts[fmt.TOPK_LENGTHS] != positions:
                raise FormatError(f"{where}: {fmt.TOPK_LENGTHS} holds {counts[fmt.TOPK_LENGTHS]} values for {positions} positions")
            for col in (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS):
                bad = counts[col] > positions * self.k if self.encoding.variable_k else counts[col] != positions * self.k
                if bad:
                    raise FormatError(f"{where}: {col} holds {counts[col]} entries, {'more than' if self.encoding.variable_k else 'not'} "
                                      f"positions x k = {positions * self.k}")
        if self.kind == "samples" and counts[fmt.COMPLETION_IDS] > shard["positions"]:
            raise FormatError(f"{where}: {counts[fmt.COMPLETION_IDS]} completion tokens, more than the manifest's "
                              f"{shard['positions']} for the whole shard")
        if self.kind == "sampled":
            positions = counts[fmt.SAMPLED_LENGTHS]
            if positions > shard["positions"] or (tokens is not None and positions != tokens - rows):
                raise FormatError(f"{where}: {positions} positions do not fit the input ids or the manifest")
            for col in (fmt.SAMPLED_IDS, fmt.SAMPLED_COUNTS):
                if counts[col] > positions * self.k:
                    raise FormatError(f"{where}: {col} holds {counts[col]} entries, more than positions x draws")
            if self.encoding.sampled_coverage and counts[fmt.COVERAGE] != positions:
                raise FormatError(f"{where}: {fmt.COVERAGE} holds {counts[fmt.COVERAGE]} values for {positions} positions")

    def batches(self, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Decoded row groups, one at a time."""
        for si, shard in enumerate(self.shards):
            pf = self.open_shard(shard)
            try:
                for rg in range(pf.num_row_groups):
                    yield self.read_row_group(si, rg, columns, pf)
            finally:   # its file (an object's open stream, in a bucket) goes at once, not when collected
                pf.close(force=True)

    def rows(self, columns: list[str] | None = None, as_torch: bool = False) -> Iterator[dict[str, Any]]:
        """Rows as dicts of numpy arrays (or torch tensors with as_torch)."""
        for decoded in self.batches(columns):
            for row in fmt.rows_from_decoded(decoded):
                if as_torch:
                    import torch
                    row = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                           for k, v in row.items()}
                yield row
