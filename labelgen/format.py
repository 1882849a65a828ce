"""The label shard format: the one place that defines what a label shard is.

Every reader and writer imports this module; nobody re-declares a column name.
A label set is a directory of zstd-compressed Parquet shards plus a
``manifest.json`` written last (see docs/format.md). Four record kinds:

``topk``     one row per token window: the input ids and, for each of the
             L-1 next-token predictions, the teacher's top-k (id, logprob)
             sorted by logprob descending, the mass they cover, and the
             logprob and rank of the token that actually came next. With
             adaptive truncation (``Encoding.variable_k``, 1.3) a position
             keeps 1..k entries and ``topk_lengths`` says how many.
``samples``  one row per teacher completion of a prompt (hard labels).
``tokens``   one row per token window, ids only (a tokenized corpus, for
             co-distillation and CE baselines; added in format 1.1).
``sampled``  one row per token window: at each of its L-1 positions, the
             distinct ids among N draws from the teacher's distribution and
             how often each was drawn (sparse unbiased soft labels; 1.1).

Encoding (chosen by benchmarks/bench_storage.py on a real LLM's labels,
documented in docs/format.md): ids use the narrowest unsigned width the
vocabulary allows. By default each position's top-k is stored in id order —
ids as ascending deltas, probabilities quantised beside them — because a
teacher's candidate sets cluster on frequent tokens and sorted deltas compress
far better than ids in rank order. Before sorting, ids are renumbered by how
often the shard's first row group proposes them (format 1.2; the table is in
the shard's footer), so the frequent candidates get small numbers and small
deltas. Probabilities are stored as uint8 codes of sqrt(p) (1.2): an entry's
KL cost of an error grows with its probability, and a uniform step in sqrt(p)
spends the same KL on every entry. The alternative layout keeps rank order and
gap-codes the sorted logprobs. Decoding always returns rank order (logprob
descending), int64 ids and float32 logprobs.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

FORMAT_NAME = "labelgen"
FORMAT_VERSION = "1.3"
READABLE_MAJOR_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"   # the labels' tokenizer, saved beside the shards
SHARD_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
FILE_META_KEY = b"labelgen"
COUNTS_META_KEY = b"labelgen_counts"
ID_TABLE_KEY = "id_table"   # in a shard's labelgen metadata: its id renumbering (1.2)   # footer metadata: the input records a shard covers and skipped

KINDS = ("topk", "samples", "tokens", "sampled")

# Column names. Per-position columns of a topk row hold L-1 entries for a
# window of L input ids: position t predicts input_ids[t + 1].
EXAMPLE_ID = "example_id"
WINDOW_OFFSET = "window_offset"
INPUT_IDS = "input_ids"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
COVERAGE = "coverage"
TARGET_LOGPROB = "target_logprob"
TARGET_RANK = "target_rank"
TOPK_LENGTHS = "topk_lengths"          # entries kept per position (variable_k only, 1.3)

SAMPLE_INDEX = "sample_index"
PROMPT = "prompt"
PROMPT_IDS = "prompt_ids"
COMPLETION = "completion"
COMPLETION_IDS = "completion_ids"
COMPLETION_LOGPROBS = "completion_logprobs"
FINISH_REASON = "finish_reason"
SEED = "seed"

SAMPLED_IDS = "sampled_ids"            # per position, distinct drawn ids ascending (stored as deltas)
SAMPLED_COUNTS = "sampled_counts"      # how often each was drawn; a position's counts sum to N
SAMPLED_LENGTHS = "sampled_lengths"    # distinct ids per position
SAMPLED_LOGPROBS = "sampled_logprobs"  # teacher logprob of each id (u8), only when the proposal temperature != 1

# Logprobs below this are stored as this (it stands for "impossible": -inf
# logits of padded vocabulary slots land here). exp(-1000) is 0 in float32.
LOGPROB_FLOOR = -1000.0
# Writers accept tiny positive logprobs from float rounding and clip them to 0.
POSITIVE_TOLERANCE = 1e-4
LOGPROB_CODECS = ("sqrt", "gap", "u8", "f32")
ID_ORDERS = ("sorted", "rank")
ID_MAPS = ("frequency", "none")
ID_ENCODINGS = ("byte_stream_split", "plain", "dictionary")


class FormatError(ValueError):
    """A shard, manifest or row that breaks the format. The message says where."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (Arrow and thrift messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


@dataclass(frozen=True)
class Encoding:
    """How top-k entries are laid out on disk. Stored in the manifest and in
    every shard's Parquet metadata, so a reader never guesses."""

    id_order: str = "sorted"
    """sorted: each position's entries in id order, ids stored as deltas.
    rank: entries in rank order, ids stored as they are."""
    logprob_codec: str = "sqrt"
    """sqrt: uint8 code round(sqrt(p) / sqrt_step) (max error sqrt_step/2 in
    sqrt(p); code 0 stands for p < (sqrt_step/2)^2). u8: logprob quantised to
    255 steps down to -`u8_range` (max error u8_range/510 nats; clipped
    below). gap (rank order only): quantise to `logprob_step` and store the
    gaps along k as uint16 (max error step/2). f32: exact."""
    sqrt_step: float = 1 / 128
    """Step of the sqrt codec in sqrt(probability); p = 1 is code 1/step."""
    id_map: str = "frequency"
    """frequency: renumber ids by how often the shard's first row group
    proposes them before storing (topk; the table travels in the footer).
    none: store ids as they are."""
    id_map_size: int = 4096
    """Ids listed in the frequency table; the rest keep their id order after them."""
    logprob_step: float = 1 / 32
    """Quantisation step in nats for the gap codec."""
    u8_range: float = 20.0
    """Lowest logprob the u8 codec represents; lower values are clipped to it."""
    id_encoding: str = "byte_stream_split"
    """Parquet encoding of the id columns."""
    zstd_level: int = 3
    """zstd level for every column."""
    row_group_rows: int = 128
    """Rows per Parquet row group: the unit a reader holds in memory."""
    variable_k: bool = False
    """Adaptive truncation (1.3): a position keeps its first 1..k entries, the
    rest are not stored; the topk_lengths column counts them. Writers mark a
    dropped entry with logprob -inf; readers return dropped slots as id 0,
    logprob -inf."""

    def __post_init__(self):
        if self.logprob_codec not in LOGPROB_CODECS:
            raise FormatError(f"logprob_codec must be one of {LOGPROB_CODECS}, got {self.logprob_codec!r}")
        if self.id_order not in ID_ORDERS:
            raise FormatError(f"id_order must be one of {ID_ORDERS}, got {self.id_order!r}")
        if self.id_order == "sorted" and self.logprob_codec == "gap":
            raise FormatError("logprob_codec 'gap' needs id_order 'rank' (gaps need logprobs in sorted order)")
        if self.id_encoding not in ID_ENCODINGS:
            raise FormatError(f"id_encoding must be one of {ID_ENCODINGS}, got {self.id_encoding!r}")
        if not (-LOGPROB_FLOOR / 65535 <= self.logprob_step <= 1.0):
            raise FormatError(f"logprob_step must be in [{-LOGPROB_FLOOR / 65535:.4f}, 1] nats, got {self.logprob_step}")
        if not 0 < self.u8_range <= -LOGPROB_FLOOR:
            raise FormatError(f"u8_range must be in (0, {-LOGPROB_FLOOR}], got {self.u8_range}")
        if not 1 / 255 <= self.sqrt_step <= 0.25:
            raise FormatError(f"sqrt_step must be in [1/255, 0.25], got {self.sqrt_step}")
        if self.id_map not in ID_MAPS:
            raise FormatError(f"id_map must be one of {ID_MAPS}, got {self.id_map!r}")
        if not 1 <= self.id_map_size <= 1 << 20:
            raise FormatError(f"id_map_size must be in [1, 2^20], got {self.id_map_size}")
        if not 1 <= self.zstd_level <= 22:
            raise FormatError(f"zstd_level must be in [1, 22], got {self.zstd_level}")
        if not isinstance(self.variable_k, bool):
            raise FormatError(f"variable_k must be true or false, got {self.variable_k!r}")
        if self.variable_k and self.logprob_codec == "gap":
            raise FormatError("logprob_codec 'gap' cannot store variable_k labels (gaps run along a full row of k)")
        if self.row_group_rows < 1:
            raise FormatError(f"row_group_rows must be >= 1, got {self.row_group_rows}")

    @property
    def max_logprob_error(self) -> float:
        """Bound on |decoded - exact| for logprobs above the codec's floor
        (the sqrt codec bounds the error of sqrt(p) instead: `max_error`)."""
        return {"gap": self.logprob_step / 2, "u8": self.u8_range / 510, "f32": 0.0,
                "sqrt": math.inf}[self.logprob_codec]

    @property
    def max_error(self) -> float:
        """Bound on `error()`: the codec's own unit (sqrt(p) for sqrt, nats otherwise)."""
        return self.sqrt_step / 2 if self.logprob_codec == "sqrt" else self.max_logprob_error

    def error(self, exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """Per-entry error of decoded logprobs in the codec's unit (see max_error)."""
        exact, decoded = np.asarray(exact, np.float64), np.asarray(decoded, np.float64)
        if self.logprob_codec == "sqrt":
            return np.abs(np.exp(exact / 2) - np.exp(decoded / 2))
        floor = -self.u8_range if self.logprob_codec == "u8" else LOGPROB_FLOOR
        return np.abs(np.maximum(exact, floor) - decoded)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Encoding":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("id_map", "none")   # written before 1.2: ids were stored as they are
        d.setdefault("variable_k", False)
        return cls(**d)


def id_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned integer that holds every id below vocab_size."""
    if vocab_size <= 0:
        raise FormatError(f"vocab_size must be positive, got {vocab_size}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise FormatError(f"vocab_size {vocab_size} does not fit in uint32")


def _logprob_dtype(enc: Encoding) -> np.dtype:
    return np.dtype({"gap": np.uint16, "u8": np.uint8, "sqrt": np.uint8, "f32": np.float32}[enc.logprob_codec])


def schema(kind: str, vocab_size: int, enc: Encoding) -> pa.Schema:
    """Arrow schema of a shard of `kind` whose ids are below `vocab_size`."""
    ids = pa.list_(pa.from_numpy_dtype(id_dtype(vocab_size)))
    if kind == "topk":
        return pa.schema([
            (EXAMPLE_ID, pa.string()),
            (WINDOW_OFFSET, pa.int64()),
            (INPUT_IDS, ids),
            (TOPK_IDS, ids),
            (TOPK_LOGPROBS, pa.list_(pa.from_numpy_dtype(_logprob_dtype(enc)))),
            (COVERAGE, pa.list_(pa.float32())),
            (TARGET_LOGPROB, pa.list_(pa.float32())),
            (TARGET_RANK, pa.list_(pa.uint32())),
        ] + ([(TOPK_LENGTHS, pa.list_(pa.uint32()))] if enc.variable_k else []))
    if kind == "tokens":
        return pa.schema([(EXAMPLE_ID, pa.string()), (WINDOW_OFFSET, pa.int64()), (INPUT_IDS, ids)])
    if kind == "sampled":
        return pa.schema([
            (EXAMPLE_ID, pa.string()),
            (WINDOW_OFFSET, pa.int64()),
            (INPUT_IDS, ids),
            (SAMPLED_IDS, ids),
            (SAMPLED_COUNTS, pa.list_(pa.uint8())),
            (SAMPLED_LENGTHS, pa.list_(pa.uint8())),
            (SAMPLED_LOGPROBS, pa.list_(pa.uint8())),
        ])
    if kind == "samples":
        return pa.schema([
            (EXAMPLE_ID, pa.string()),
            (SAMPLE_INDEX, pa.int32()),
            (PROMPT, pa.string()),
            (PROMPT_IDS, ids),
            (COMPLETION, pa.string()),
            (COMPLETION_IDS, ids),
            (COMPLETION_LOGPROBS, pa.list_(pa.float32())),
            (FINISH_REASON, pa.string()),
            (SEED, pa.int64()),
        ])
    raise FormatError(f"unknown record kind {kind!r}; this version knows {KINDS}")


def parquet_writer_options(kind: str, enc: Encoding) -> dict:
    """Keyword arguments for pyarrow.parquet.ParquetWriter."""
    dict_cols = [EXAMPLE_ID] + ([FINISH_REASON] if kind == "samples" else [])
    col_enc = {}
    if kind in ("tokens", "sampled"):
        col_enc[f"{INPUT_IDS}.list.element"] = "BYTE_STREAM_SPLIT"
    if kind == "sampled":
        col_enc.update({f"{c}.list.element": "BYTE_STREAM_SPLIT"
                        for c in (SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS)})
    if kind == "topk":
        # ids (or id deltas) and gap-coded logprobs are integers whose high
        # bytes are mostly zero: byte-stream-split lets zstd drop them.
        floats = [f"{c}.list.element" for c in (COVERAGE, TARGET_LOGPROB) + ((TOPK_LENGTHS,) if enc.variable_k else ())]
        col_enc.update({c: "BYTE_STREAM_SPLIT" for c in floats})
        id_cols = [f"{c}.list.element" for c in (INPUT_IDS, TOPK_IDS)]
        if enc.id_encoding == "dictionary":
            dict_cols += id_cols
        else:
            col_enc.update({c: enc.id_encoding.upper() for c in id_cols})
        col_enc[f"{TOPK_LOGPROBS}.list.element"] = "BYTE_STREAM_SPLIT"
    return dict(
        compression="zstd",
        compression_level=enc.zstd_level,
        write_page_checksum=True,   # CRC32 per page: readers verify every byte they decode
        use_dictionary=dict_cols,
        column_encoding=col_enc or None,
        write_statistics=[EXAMPLE_ID, SAMPLE_INDEX] if kind == "samples" else [EXAMPLE_ID, WINDOW_OFFSET],
    )


# ---------------------------------------------------------------- logprobs


def encode_logprobs(lp: np.ndarray, enc: Encoding) -> np.ndarray:
    """[n, k] float logprobs (sorted descending for the gap codec) -> [n, k] stored values."""
    lp = np.maximum(np.asarray(lp, dtype=np.float64), LOGPROB_FLOOR)
    if enc.logprob_codec == "f32":
        return lp.astype(np.float32)
    if enc.logprob_codec == "sqrt":
        return np.clip(np.rint(np.exp(lp / 2) / enc.sqrt_step), 0, 255).astype(np.uint8)
    if enc.logprob_codec == "u8":
        step = enc.u8_range / 255
        return np.clip(np.rint(-lp / step), 0, 255).astype(np.uint8)
    q = np.rint(-lp / enc.logprob_step).astype(np.int64)
    # Gaps of the quantised values, not of the floats: no error accumulates.
    gaps = np.diff(q, axis=1, prepend=0)
    return gaps.astype(np.uint16)


@functools.lru_cache(maxsize=8)
def _sqrt_decode_table(step: float) -> np.ndarray:
    """Logprob of each uint8 code of the sqrt codec (a lookup beats a log per entry).
    Code 0 holds p < (step/2)^2: it decodes to the middle of that range in sqrt(p)."""
    root = np.concatenate([[0.25], np.arange(1, 256)]) * step
    return np.minimum(2 * np.log(root), 0).astype(np.float32)


def decode_logprobs(stored: np.ndarray, enc: Encoding) -> np.ndarray:
    """[n, k] stored values -> [n, k] float32 logprobs, in stored order."""
    if enc.logprob_codec == "f32":
        return stored.astype(np.float32, copy=False)
    if enc.logprob_codec == "sqrt":
        return _sqrt_decode_table(enc.sqrt_step)[stored]
    if enc.logprob_codec == "u8":
        return (stored.astype(np.float32) * np.float32(-enc.u8_range / 255)).astype(np.float32)
    q = np.cumsum(stored, axis=1, dtype=np.int64)
    return (q * -enc.logprob_step).astype(np.float32)


# ---------------------------------------------------------------- id map

# Vocabularies beyond this are refused before an id map (two int64 arrays of
# this length) is built from untrusted metadata.
MAX_VOCAB = 1 << 24


def frequency_table(ids: np.ndarray, vocab_size: int, size: int) -> np.ndarray:
    """The `size` ids that occur most often in `ids`, most frequent first (ties
    by id). Ids outside the vocabulary are left to the row checks to report."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    counts = np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")[: min(size, int((counts > 0).sum()))]
    return order.astype(id_dtype(vocab_size))


class IdMap:
    """A renumbering of [0, vocab_size): the table's ids get 0, 1, ... in
    table order, every other id follows in id order."""

    def __init__(self, table: np.ndarray, vocab_size: int, where: str = "id table"):
        if not 0 < vocab_size <= MAX_VOCAB:
            raise FormatError(f"{where}: vocabulary size {vocab_size} outside (0, {MAX_VOCAB}]")
        table = np.asarray(table, np.int64)
        if table.size > vocab_size or (table.size and (table.min() < 0 or table.max() >= vocab_size)):
            raise FormatError(f"{where}: ids outside [0, {vocab_size})")
        listed = np.zeros(vocab_size, bool)
        listed[table] = True
        if listed.sum() != table.size:
            raise FormatError(f"{where}: repeated ids")
        self.table = table
        self.from_stored = np.concatenate([table, np.flatnonzero(~listed)])
        self.to_stored = np.empty(vocab_size, np.int64)
        self.to_stored[self.from_stored] = np.arange(vocab_size)

    def to_meta(self, vocab_size: int) -> str:
        return base64.b64encode(self.table.astype(id_dtype(vocab_size).newbyteorder("<")).tobytes()).decode()

    @classmethod
    def from_meta(cls, text: Any, vocab_size: int, where: str) -> "IdMap":
        dt = id_dtype(vocab_size).newbyteorder("<")
        try:
            raw = base64.b64decode(text, validate=True)
        except (ValueError, TypeError):
            raise FormatError(f"{where}: id table is not base64") from None
        if len(raw) % dt.itemsize or len(raw) // dt.itemsize > vocab_size:
            raise FormatError(f"{where}: id table has {len(raw)} bytes, not a list of at most {vocab_size} ids")
        return cls(np.frombuffer(raw, dt), vocab_size, where)


# The label-id column of each kind whose ids are renumbered (format 1.2).
ID_MAPPED_COLUMN = {"topk": TOPK_IDS, "sampled": SAMPLED_IDS}


def uses_id_map(kind: str, enc: Encoding) -> bool:
    """Whether shards of this kind and encoding carry an id table (format 1.2)."""
    return kind in ID_MAPPED_COLUMN and enc.id_map == "frequency"


def _check_id_map(enc: Encoding, id_map: IdMap | None) -> None:
    if (enc.id_map == "frequency") != (id_map is not None):
        raise FormatError(f"encoding id_map {enc.id_map!r} needs {'an' if id_map is None else 'no'} id table")


# ---------------------------------------------------------------- rows


def _fail(example_id: Any, msg: str):
    raise FormatError(f"example {example_id!r}: {msg}")


def _list_array(flat: np.ndarray, lengths: Iterable[int], dtype: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def _check_ids(ex, name, ids, vocab_size):
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        _fail(ex, f"{name} has ids outside [0, {vocab_size}) (min {ids.min()}, max {ids.max()})")


def encode_topk_rows(rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                     id_map: IdMap | None = None) -> pa.RecordBatch:
    """Validate and encode topk rows (see module docstring) into one batch.

    Each row: example_id, window_offset (default 0), input_ids [L],
    topk_ids [L-1, k], topk_logprobs [L-1, k] (sorted descending, <= 0),
    coverage [L-1], target_logprob [L-1], target_rank [L-1]. `id_map`
    renumbers the stored top-k ids (required when enc.id_map is frequency).
    With enc.variable_k, entries whose logprob is -inf are dropped (the top-1
    of every position must be kept; their ids are not looked at).
    """
    _check_id_map(enc, id_map)
    sch = schema("topk", vocab_size, enc)
    ids_t = sch.field(INPUT_IDS).type.value_type
    inputs, tids, tlps, covs, tgt_lp, tgt_rank, n_pos, kept_n = [], [], [], [], [], [], [], []
    for r in rows:
        ex = r.get(EXAMPLE_ID)
        if not isinstance(ex, str) or not ex:
            _fail(ex, "example_id must be a non-empty string")
        inp = np.asarray(r[INPUT_IDS]).reshape(-1)
        p = inp.size - 1
        if p < 1:
            _fail(ex, f"needs at least 2 input ids, got {inp.size}")
        ti = np.asarray(r[TOPK_IDS])
        tl = np.asarray(r[TOPK_LOGPROBS], dtype=np.float32)
        if ti.shape != (p, k) or tl.shape != (p, k):
            _fail(ex, f"topk_ids {ti.shape} and topk_logprobs {tl.shape} must both be ({p}, {k}) for {inp.size} input ids")
        cov = np.asarray(r[COVERAGE], dtype=np.float32).reshape(-1)
        tlp = np.asarray(r[TARGET_LOGPROB], dtype=np.float32).reshape(-1)
        trk = np.asarray(r[TARGET_RANK]).reshape(-1)
        for name, a in ((COVERAGE, cov), (TARGET_LOGPROB, tlp), (TARGET_RANK, trk)):
            if a.size != p:
                _fail(ex, f"{name} has {a.size} entries, expected {p} (one per predicted position)")
        _check_ids(ex, INPUT_IDS, inp, vocab_size)
        if np.isnan(tl).any() or np.isnan(cov).any() or np.isnan(tlp).any():
            _fail(ex, "NaN in logprobs or coverage")
        kept = tl > -np.inf if enc.variable_k else np.ones(tl.shape, bool)
        if not kept[:, 0].all():
            _fail(ex, f"position {int(np.argmin(kept[:, 0]))} keeps no entry (its top-1 logprob is -inf)")
        _check_ids(ex, TOPK_IDS, ti[kept], vocab_size)
        ti = np.where(kept, ti, 0)
        if (tl > POSITIVE_TOLERANCE).any() or (tlp > POSITIVE_TOLERANCE).any():
            _fail(ex, f"positive logprob (max {max(tl.max(), tlp.max()):.4g})")
        with np.errstate(invalid="ignore"):   # -inf - -inf between dropped entries
            unsorted = np.diff(tl, axis=1) > 1e-6 if k > 1 else np.zeros((p, 0), bool)
        if unsorted.any():
            pos = int(np.argwhere(unsorted)[0, 0])
            _fail(ex, f"topk_logprobs not sorted descending at position {pos}")
        if (cov < 0).any() or (cov > 1 + POSITIVE_TOLERANCE).any():
            _fail(ex, f"coverage outside [0, 1] (min {cov.min():.4g}, max {cov.max():.4g})")
        if trk.size and trk.min() < 0:
            _fail(ex, "negative target_rank")
        if id_map is not None:
            ti = id_map.to_stored[ti]
        if enc.id_order == "sorted":
            # ids are unique within a position, so any sort will do: quicksort
            # on 32-bit is the fastest. Dropped entries sort last (vocab < 2^32).
            order = np.argsort(np.where(kept, ti, np.iinfo(np.uint32).max).astype(np.uint32), axis=1)
            ti = np.diff(np.take_along_axis(ti, order, 1), axis=1, prepend=0)
            tl = np.take_along_axis(tl, order, 1)
        # Kept entries are a prefix of each position in both layouts.
        inputs.append(inp)
        tids.append(ti[kept])
        tlps.append(np.minimum(tl[kept], 0))
        kept_n.append(kept.sum(1))
        covs.append(np.minimum(cov, 1))
        tgt_lp.append(np.clip(tlp, LOGPROB_FLOOR, 0))
        tgt_rank.append(trk)
        n_pos.append(p)
    tl_flat = np.concatenate(tlps)
    # The gap codec runs along rows of k (variable_k refuses it); the others are per entry.
    stored = encode_logprobs(tl_flat.reshape(-1, k) if enc.logprob_codec == "gap" else tl_flat[None], enc).reshape(-1)
    lp_t = sch.field(TOPK_LOGPROBS).type.value_type
    entries = [int(n.sum()) for n in kept_n]
    lengths = [_list_array(np.concatenate(kept_n), n_pos, pa.uint32())] if enc.variable_k else []
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r[EXAMPLE_ID] for r in rows], pa.string()),
            pa.array([int(r.get(WINDOW_OFFSET, 0)) for r in rows], pa.int64()),
            _list_array(np.concatenate(inputs), (p + 1 for p in n_pos), ids_t),
            _list_array(np.concatenate(tids), entries, ids_t),
            _list_array(stored, entries, lp_t),
            _list_array(np.concatenate(covs), n_pos, pa.float32()),
            _list_array(np.concatenate(tgt_lp), n_pos, pa.float32()),
            _list_array(np.concatenate(tgt_rank), n_pos, pa.uint32()),
        ] + lengths,
        schema=sch,
    )


def encode_samples_rows(rows: list[dict], vocab_size: int, enc: Encoding) -> pa.RecordBatch:
    """Validate and encode samples rows into one batch. Each row: example_id,
    sample_index, prompt, prompt_ids, completion, completion_ids,
    completion_logprobs (one per completion id), finish_reason, seed."""
    sch = schema("samples", vocab_size, enc)
    for r in rows:
        ex = r.get(EXAMPLE_ID)
        if not isinstance(ex, str) or not ex:
            _fail(ex, "example_id must be a non-empty string")
        cids = np.asarray(r[COMPLETION_IDS]).reshape(-1)
        clp = np.asarray(r[COMPLETION_LOGPROBS], dtype=np.float32).reshape(-1)
        if cids.size != clp.size:
            _fail(ex, f"{cids.size} completion ids but {clp.size} completion logprobs")
        _check_ids(ex, PROMPT_IDS, np.asarray(r[PROMPT_IDS]).reshape(-1), vocab_size)
        _check_ids(ex, COMPLETION_IDS, cids, vocab_size)
        if np.isnan(clp).any() or (clp > POSITIVE_TOLERANCE).any():
            _fail(ex, "completion_logprobs must be <= 0 and not NaN")
    table = {
        EXAMPLE_ID: [r[EXAMPLE_ID] for r in rows],
        SAMPLE_INDEX: [int(r[SAMPLE_INDEX]) for r in rows],
        PROMPT: [r[PROMPT] for r in rows],
        PROMPT_IDS: [np.asarray(r[PROMPT_IDS]).reshape(-1) for r in rows],
        COMPLETION: [r[COMPLETION] for r in rows],
        COMPLETION_IDS: [np.asarray(r[COMPLETION_IDS]).reshape(-1) for r in rows],
        COMPLETION_LOGPROBS: [np.minimum(np.asarray(r[COMPLETION_LOGPROBS], np.float32).reshape(-1), 0) for r in rows],
        FINISH_REASON: [str(r[FINISH_REASON]) for r in rows],
        SEED: [int(r[SEED]) for r in rows],
    }
    return pa.RecordBatch.from_arrays(
        [pa.array(table[f.name], type=f.type) for f in sch], schema=sch
    )


def encode_tokens_rows(rows: list[dict], vocab_size: int, enc: Encoding) -> pa.RecordBatch:
    """Validate and encode tokens rows: example_id, window_offset, input_ids (>= 2 ids)."""
    sch = schema("tokens", vocab_size, enc)
    arrays = []
    for r in rows:
        ex = r.get(EXAMPLE_ID)
        if not isinstance(ex, str) or not ex:
            _fail(ex, "example_id must be a non-empty string")
        inp = np.asarray(r[INPUT_IDS]).reshape(-1)
        if inp.size < 2:
            _fail(ex, f"needs at least 2 input ids, got {inp.size}")
        _check_ids(ex, INPUT_IDS, inp, vocab_size)
        arrays.append(inp)
    return pa.RecordBatch.from_arrays([
        pa.array([r[EXAMPLE_ID] for r in rows], pa.string()),
        pa.array([int(r.get(WINDOW_OFFSET, 0)) for r in rows], pa.int64()),
        _list_array(np.concatenate(arrays), (a.size for a in arrays), sch.field(INPUT_IDS).type.value_type),
    ], schema=sch)


def encode_sampled_rows(rows: list[dict], draws: int, vocab_size: int, enc: Encoding,
                        id_map: IdMap | None = None) -> pa.RecordBatch:
    """Validate and encode sampled rows. Each row: example_id, window_offset,
    input_ids [L], sampled_lengths [L-1], sampled_ids and sampled_counts
    [sum of lengths] (per position ascending ids, counts summing to `draws`),
    sampled_logprobs [same] or empty. `id_map` renumbers the stored ids
    (required when enc.id_map is frequency); each position is stored in
    ascending order of its renumbered ids."""
    _check_id_map(enc, id_map)
    sch = schema("sampled", vocab_size, enc)
    u8 = Encoding(logprob_codec="u8", u8_range=enc.u8_range)
    cols: dict[str, list] = {c: [] for c in (INPUT_IDS, SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS)}
    for r in rows:
        ex = r.get(EXAMPLE_ID)
        if not isinstance(ex, str) or not ex:
            _fail(ex, "example_id must be a non-empty string")
        inp = np.asarray(r[INPUT_IDS]).reshape(-1)
        lengths = np.asarray(r[SAMPLED_LENGTHS]).reshape(-1)
        ids = np.asarray(r[SAMPLED_IDS]).reshape(-1)
        counts = np.asarray(r[SAMPLED_COUNTS]).reshape(-1)
        lps = np.asarray(r.get(SAMPLED_LOGPROBS, ()), dtype=np.float32).reshape(-1)
        if inp.size < 2 or lengths.size != inp.size - 1:
            _fail(ex, f"sampled_lengths has {lengths.size} entries for {inp.size} input ids (expected {inp.size - 1})")
        if ids.size != lengths.sum() or counts.size != ids.size or lps.size not in (0, ids.size):
            _fail(ex, f"sampled_ids ({ids.size}), sampled_counts ({counts.size}) and sampled_logprobs ({lps.size}) "
                      f"must match the {int(lengths.sum())} entries sampled_lengths counts")
        _check_ids(ex, INPUT_IDS, inp, vocab_size)
        _check_ids(ex, SAMPLED_IDS, ids, vocab_size)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if (lengths < 1).any() or counts.min(initial=1) < 1 or (np.add.reduceat(counts, starts) != draws).any():
            _fail(ex, f"every position needs >= 1 distinct id and counts summing to {draws}")
        first = np.zeros(ids.size, bool)
        first[starts] = True
        if (np.diff(ids, prepend=0)[~first] <= 0).any():
            _fail(ex, "sampled_ids must ascend strictly within a position")
        if id_map is not None:
            ids = id_map.to_stored[ids]
            order = np.lexsort((ids, np.repeat(np.arange(lengths.size), lengths)))
            ids, counts = ids[order], counts[order]
            lps = lps[order] if lps.size else lps
        deltas = np.diff(ids, prepend=0)
        deltas[first] = ids[first]
        cols[INPUT_IDS].append(inp)
        cols[SAMPLED_IDS].append(deltas)
        cols[SAMPLED_COUNTS].append(counts)
        cols[SAMPLED_LENGTHS].append(lengths)
        cols[SAMPLED_LOGPROBS].append(encode_logprobs(lps[None, :], u8)[0] if lps.size else np.zeros(0, np.uint8))
    return pa.RecordBatch.from_arrays(
        [pa.array([r[EXAMPLE_ID] for r in rows], pa.string()),
         pa.array([int(r.get(WINDOW_OFFSET, 0)) for r in rows], pa.int64())]
        + [_list_array(np.concatenate(cols[c]), (a.size for a in cols[c]), sch.field(c).type.value_type)
           for c in (INPUT_IDS, SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS)],
        schema=sch)


def encode_rows(kind: str, rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                id_map: IdMap | None = None) -> pa.RecordBatch:
    if kind == "topk":
        return encode_topk_rows(rows, k, vocab_size, enc, id_map)
    if kind == "sampled":
        return encode_sampled_rows(rows, k, vocab_size, enc, id_map)
    if kind == "tokens":
        return encode_tokens_rows(rows, vocab_size, enc)
    if kind == "samples":
        return encode_samples_rows(rows, vocab_size, enc)
    raise FormatError(f"unknown record kind {kind!r}; this version knows {KINDS}")


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets starting at 0) of a list column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def decode_batch(batch: pa.RecordBatch | pa.Table, kind: str, k: int, enc: Encoding,
                 id_map: IdMap | None = None, rank_order: bool = True) -> dict[str, Any]:
    """Decode the columns present in `batch` into flat numpy arrays.

    Returns, per column present: list columns as (values, offsets) where
    offsets has rows+1 entries; topk_ids/topk_logprobs values shaped
    [positions, k] (int64 / float32, rank order) with offsets counted in
    positions; scalar columns as numpy arrays or lists of str. With the sorted
    id layout, topk_ids can only be put in rank order together with
    topk_logprobs (ShardReader reads both when either is asked for).
    `id_map`: the shard's id table (topk and sampled shards whose encoding
    has one); sampled ids then come back in renumbered order within a position.
    With enc.variable_k, topk_ids/topk_logprobs need topk_lengths and come
    back as [positions, k] all the same: dropped slots hold id 0, logprob -inf.
    rank_order=False leaves sorted-layout entries in the order they are
    stored (a consumer that ignores entry order, such as the KD loss, skips
    the per-position sort).
    """
    if kind in ID_MAPPED_COLUMN:
        _check_id_map(enc, id_map)
    out: dict[str, Any] = {}
    stored_lp = None
    kept = None   # [positions, k] mask of stored slots (variable_k)
    if kind == "topk" and enc.variable_k and (TOPK_IDS in batch.schema.names or TOPK_LOGPROBS in batch.schema.names):
        if TOPK_LENGTHS not in batch.schema.names:
            raise FormatError("variable_k topk entries need topk_lengths to decode")
        lengths, pos_offsets = _flat(batch.column(TOPK_LENGTHS))
        if lengths.size and (lengths.min() < 1 or lengths.max() > k):
            raise FormatError(f"topk_lengths outside [1, k={k}] (min {lengths.min()}, max {lengths.max()})")
        kept = np.arange(k) < lengths[:, None].astype(np.int64)
    for name in batch.schema.names:
        col = batch.column(name)
        if not pa.types.is_list(col.type):
            out[name] = col.to_pylist() if pa.types.is_string(col.type) else col.to_numpy()
            continue
        values, offsets = _flat(col)
        if name in (TOPK_IDS, TOPK_LOGPROBS):
            if kept is not None:
                if values.size != kept.sum():
                    raise FormatError(f"{name} holds {values.size} entries, topk_lengths count {int(kept.sum())}")
                full = np.zeros(kept.shape, values.dtype)
                full[kept] = values
                values, offsets = full, pos_offsets
            else:
                values = values.reshape(-1, k)
                offsets = offsets // k
            if name == TOPK_LOGPROBS:
                stored_lp = values
                values = decode_logprobs(values, enc)
                if kept is not None:
                    values[~kept] = -np.inf
            else:
                values = values.astype(np.int64)
        elif name in (INPUT_IDS, PROMPT_IDS, COMPLETION_IDS, TARGET_RANK, SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS,
                      TOPK_LENGTHS):
            values = values.astype(np.int64)
        elif name == SAMPLED_LOGPROBS:
            values = decode_logprobs(values[None, :], Encoding(logprob_codec="u8", u8_range=enc.u8_range))[0]
        else:
            values = values.astype(np.float32, copy=False)
        out[name] = (values, offsets)
    if kind == "topk" and enc.id_order == "sorted" and TOPK_IDS in out and not rank_order:
        ids, off = out[TOPK_IDS]
        ids = np.cumsum(ids, axis=1)
        if kept is not None:
            ids[~kept] = 0
        out[TOPK_IDS] = (ids, off)
    elif kind == "topk" and enc.id_order == "sorted" and (TOPK_IDS in out or TOPK_LOGPROBS in out):
        if TOPK_LOGPROBS not in out:
            raise FormatError("the sorted id layout needs topk_logprobs to decode topk_ids")
        lp, off = out[TOPK_LOGPROBS]
        # Stable, so entries whose stored logprobs tie keep id order. uint8
        # codes sort (radix-fast) in the order of their logprobs.
        key = {"u8": stored_lp, "sqrt": 255 - stored_lp}.get(enc.logprob_codec, -lp)
        if kept is not None:   # dropped slots sort last
            last = np.int16(256) if key.dtype == np.uint8 else np.float32(np.inf)
            key = np.where(kept, key.astype(last.dtype), last)
        order = np.argsort(key, axis=1, kind="stable")
        out[TOPK_LOGPROBS] = (np.take_along_axis(lp, order, 1), off)
        if TOPK_IDS in out:
            ids = np.cumsum(out[TOPK_IDS][0], axis=1)
            if kept is not None:
                ids[~kept] = 0   # kept slots are a prefix before and after the sort
            out[TOPK_IDS] = (np.take_along_axis(ids, order, 1), off)
    if kind == "sampled" and SAMPLED_IDS in out:
        if SAMPLED_LENGTHS not in out:
            raise FormatError("sampled_ids need sampled_lengths to decode")
        deltas, off = out[SAMPLED_IDS]
        lengths = out[SAMPLED_LENGTHS][0]
        if lengths.sum() != deltas.size:
            raise FormatError(f"sampled_lengths count {lengths.sum()} ids, sampled_ids holds {deltas.size}")
        total = np.cumsum(deltas)
        before = np.concatenate([[0], total])[np.concatenate([[0], np.cumsum(lengths)[:-1]])]
        out[SAMPLED_IDS] = (total - np.repeat(before, lengths), off)
    column = ID_MAPPED_COLUMN.get(kind)
    if id_map is not None and column in out:
        ids, off = out[column]
        if ids.size and (ids.min() < 0 or ids.max() >= len(id_map.from_stored)):
            raise FormatError(f"stored {column} outside the vocabulary [0, {len(id_map.from_stored)})")
        ids = id_map.from_stored[ids]
        if kept is not None and column == TOPK_IDS:
            ids[~kept] = 0
        out[column] = (ids, off)
    return out


def rows_from_decoded(decoded: dict[str, Any]) -> list[dict]:
    """Split decode_batch output into one dict per row (views, no copies)."""
    n = next(len(v[1]) - 1 if isinstance(v, tuple) else len(v) for v in decoded.values())
    rows = [{} for _ in range(n)]
    for name, v in decoded.items():
        if isinstance(v, tuple):
            values, off = v
            for i in range(n):
                rows[i][name] = values[off[i]:off[i + 1]]
        else:
            for i in range(n):
                rows[i][name] = v[i].item() if isinstance(v, np.ndarray) else v[i]
    return rows


# ---------------------------------------------------------------- naming


def shard_name(index: int, worker: int | None = None) -> str:
    """File name of shard `index` (a pure function of its input slice)."""
    return f"shard-{index:06d}{SHARD_SUFFIX}" if worker is None else f"shard-w{worker:04d}-{index:06d}{SHARD_SUFFIX}"


def partial_manifest_name(worker: int, num_workers: int) -> str:
    return f"manifest.worker-{worker:04d}-of-{num_workers:04d}.json"


# ---------------------------------------------------------------- manifest


def file_metadata(kind: str, k: int, vocab_size: int, enc: Encoding, extra: dict | None = None) -> dict[bytes, bytes]:
    """Key-value metadata stored in every shard so a lone file is self-describing."""
    return {FILE_META_KEY: json.dumps({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
        "k": k, "vocab_size": vocab_size, "encoding": enc.to_dict(), **(extra or {}),
    }).encode()}


def check_version(version: Any, where: str) -> None:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise FormatError(f"{where}: unreadable format_version {version!r}") from None
    if major not in READABLE_MAJOR_VERSIONS:
        readable = ", ".join(f"{m}.x" for m in READABLE_MAJOR_VERSIONS)
        raise FormatError(f"{where}: format version {version} is not supported; this labelgen reads {readable}")


def read_file_metadata(meta: dict[bytes, bytes] | None, where: str) -> dict:
    if not meta or FILE_META_KEY not in meta:
        raise FormatError(f"{where}: not a labelgen shard (no '{FILE_META_KEY.decode()}' metadata)")
    try:
        info = json.loads(meta[FILE_META_KEY])
    except ValueError as e:
        raise FormatError(f"{where}: corrupt labelgen metadata ({e})") from None
    check_version(info.get("format_version"), where)
    return info


def dataset_fingerprint(manifest: dict) -> str:
    """Identity of a label set: format, kind, tokenizer and every shard's bytes."""
    ident = {
        "format_version": manifest["format_version"],
        "kind": manifest["kind"],
        "tokenizer": manifest.get("tokenizer", {}).get("fingerprint"),
        "shards": [(s["name"], s["bytes"], s["sha256"]) for s in manifest["shards"]],
    }
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """tmp + fsync + rename + fsync(dir): a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    refuse_symlink(path)
    tmp.unlink(missing_ok=True)   # never write through a stale or planted tmp file
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def refuse_symlink(path: Path) -> None:
    """Outputs are written inside their directory: a symlink planted in their
    place (pointing anywhere) is refused, not written through."""
    if Path(path).is_symlink():
        raise FormatError(f"{path}: is a symlink; refusing to write through it (remove it and rerun)")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(out_dir: Path, manifest: dict, name: str = MANIFEST_NAME) -> dict:
    manifest = dict(manifest)
    manifest["fingerprint"] = dataset_fingerprint(manifest)
    atomic_write_bytes(Path(out_dir) / name, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return manifest


def read_manifest(label_dir: Path | str) -> dict:
    path = Path(label_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = " (the job did not finish, or run `labelgen finalize` after all workers)" if Path(label_dir).is_dir() else ""
        raise FormatError(f"{path}: no manifest; not a complete label set{hint}")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a labelgen manifest (missing \"format\": \"{FORMAT_NAME}\")")
    check_version(m.get("format_version"), str(path))
    for key in ("kind", "k", "vocab_size", "encoding", "shards"):
        if key not in m:
            raise FormatError(f"{path}: manifest lacks {key!r}")
    if m["kind"] not in KINDS:
        raise FormatError(f"{path}: unknown record kind {m['kind']!r}; this version knows {KINDS}")
    check_bounds(m, str(path))
    if not isinstance(m["encoding"], dict):
        raise FormatError(f"{path}: encoding must be a mapping")
    try:
        Encoding.from_dict(m["encoding"])
    except (TypeError, FormatError) as e:
        raise FormatError(f"{path}: bad encoding ({e})") from None
    if not isinstance(m["shards"], list):
        raise FormatError(f"{path}: shards must be a list")
    for i, shard in enumerate(m["shards"]):
        check_shard_entry(shard, f"{path}: shards[{i}]")
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


def footer_sha256(path: Path) -> str:
    """sha256 of a Parquet file's footer (its metadata, length and magic)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            raise FormatError(f"{path}: {size} bytes, too short for Parquet")
        f.seek(size - 8)
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n + 12 > size:
            raise FormatError(f"{path}: no Parquet footer (truncated or not Parquet)")
        f.seek(size - 8 - n)
        return hashlib.sha256(f.read(n) + tail).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


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
