"""The format's names and settings: column names, record kinds, the
`Encoding` of top-k entries, shard file names and the metadata every shard
carries. No reading or writing here."""

from __future__ import annotations

import dataclasses
import json
import re
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from labelgen.errors import FormatError, one_line  # noqa: F401  (raised by every format module; fmt.one_line)
from labelgen.store.fsutil import TMP_SUFFIX  # noqa: F401

FORMAT_NAME = "labelgen"
FORMAT_VERSION = "2.4"   # 2.1: the scored kind; 2.2: sampled sets may carry coverage (Encoding.sampled_coverage);
#                           2.4: windows of chat text may carry assistant_mask (Encoding.assistant_mask)
SHARD_TABLE_VERSION = "2.3"   # a manifest of more shards than manifest.SHARD_TABLE_MIN lists them in a Parquet table
# Runs an earlier release began that this one may finish: it writes their shards alike (2.3 changed only the manifest
# of large sets), except for what 2.4 added, assistant_mask, which a run begun by them does not use.
CONTINUABLE_VERSIONS = ("2.2", "2.3")


def continues(written: str, encoding: dict) -> bool:
    """Whether shards this release writes with `encoding` may join a run begun by a labelgen writing `written`."""
    return written == FORMAT_VERSION or (written in CONTINUABLE_VERSIONS and not encoding.get("assistant_mask"))
READABLE_MAJOR_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
RUN_FILE = "run.json"         # a run's config and inputs, written first: resume and export read it
TOKENIZER_DIR = "tokenizer"   # the labels' tokenizer, saved beside the shards
# The files a HF tokenizer's save_pretrained writes (fast, sentencepiece and tiktoken tokenizers): what of
# TOKENIZER_DIR is labelgen's; anything else a user put there is left alone by --overwrite.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "*.model", "*.tiktoken", "additional_chat_templates/*.jinja")
SHARD_SUFFIX = ".parquet"
SHARD_GLOB = "shard-*" + SHARD_SUFFIX
SHARD_TABLE_PREFIX = "manifest.shards-"   # a large set's shard entries (2.3: format/manifest.py), + hash + suffix
SHARD_TABLE_GLOB = SHARD_TABLE_PREFIX + "*" + SHARD_SUFFIX
# Every name a label set consists of (fnmatch patterns; 'dir/name' inside a directory it shares with others).
LABEL_SET_FILES = (SHARD_GLOB, SHARD_TABLE_GLOB, MANIFEST_NAME, RUN_FILE) + tuple(f"{TOKENIZER_DIR}/{name}" for name in TOKENIZER_FILES)
FILE_META_KEY = b"labelgen"
COUNTS_META_KEY = b"labelgen_counts"
ID_TABLE_KEY = "id_table"   # in a shard's labelgen metadata: its id renumbering (1.2, 1.3)
# From 2.0 the id table is a footer key of its own: inside the labelgen metadata
# pyarrow stored it twice (again in its copy of the Arrow schema), ~15 KB a shard.
ID_TABLE_FOOTER_KEY = b"labelgen_id_table"

KINDS = ("topk", "samples", "tokens", "sampled", "scored")
TOPK_KINDS = ("topk", "scored")   # the kinds that store a teacher's top-k per position
WINDOW_KINDS = ("topk", "tokens", "sampled")   # rows are windows of text: they may mark the assistant's tokens
COMPLETION_KINDS = ("samples", "scored")        # rows are completions: only their completion tokens are labelled

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
ASSISTANT_MASK = "assistant_mask"      # per input id: part of an assistant turn (Encoding.assistant_mask, 2.4)

SAMPLE_INDEX = "sample_index"
PROMPT = "prompt"
PROMPT_IDS = "prompt_ids"
COMPLETION = "completion"
COMPLETION_IDS = "completion_ids"
COMPLETION_LOGPROBS = "completion_logprobs"
FINISH_REASON = "finish_reason"
SEED = "seed"

ROUND = "round"                        # scored: the on-policy round the completion was sampled in
SAMPLING_LOGPROB = "sampling_logprob"  # scored, per position: the sampler's logprob of the completion token

SAMPLED_IDS = "sampled_ids"            # per position, distinct drawn ids ascending (stored as deltas)
SAMPLED_COUNTS = "sampled_counts"      # how often each was drawn; a position's counts sum to N
SAMPLED_LENGTHS = "sampled_lengths"    # distinct ids per position
SAMPLED_LOGPROBS = "sampled_logprobs"  # teacher logprob of each id (u8), only when the proposal temperature != 1

# Logprobs below this are stored as this (it stands for "impossible": -inf
# logits of padded vocabulary slots land here). exp(-1000) is 0 in float32.
LOGPROB_FLOOR = -1000.0
# Writers accept tiny positive logprobs from float rounding and clip them to 0.
POSITIVE_TOLERANCE = 1e-4
# Rows a row group may hold: what any writer of this format sets (Encoding.row_group_rows) stays below it.
MAX_ROW_GROUP_ROWS = 1 << 16
LOGPROB_CODECS = ("sqrt", "gap", "u8", "f32")
ID_ORDERS = ("sorted", "rank")
ID_MAPS = ("frequency", "none")
ID_ENCODINGS = ("byte_stream_split", "plain", "dictionary")
POSITION_CODECS = ("quantized", "f32")
# The quantized per-position columns (2.0): coverage as a uint8 code of the
# square root of its tail mass, target_logprob as uint16 in steps of 1/64 nat
# (the floor, -1000, is code 64000).
TAIL_SQRT_STEP = 1 / 255
TARGET_LOGPROB_STEP = 1 / 64




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
    """Rows per Parquet row group: the unit a reader holds in memory (at most
    MAX_ROW_GROUP_ROWS; a reader refuses a row group declaring more)."""
    variable_k: bool = False
    """Adaptive truncation (1.3): a position keeps its first 1..k entries, the
    rest are not stored; the topk_lengths column counts them. Writers mark a
    dropped entry with logprob -inf; readers return dropped slots as id 0,
    logprob -inf."""
    position_codec: str = "quantized"
    """The topk per-position columns (2.0). quantized: coverage as the uint8
    code round(sqrt(1 - coverage) * 255) (max error 1/510 in the square root
    of the tail mass; code 0 decodes to a tail of (0.25/255)^2), and
    target_logprob as the uint16 code round(-logprob * 64) (max error 1/128
    nat). f32: both float32, as format 1.0-1.3 stored them."""
    sampled_coverage: bool = False
    """Sampled sets (2.2): a per-position coverage column, the teacher's exact
    probability mass on the position's distinct drawn ids, stored as topk's
    coverage is (position_codec); what the tail-bucket loss needs. Sets
    written before 2.2 have none."""
    assistant_mask: bool = False
    """Windows of chat text (topk, tokens and sampled kinds, 2.4): an
    assistant_mask column of one bool per input id, true where the token
    belongs to an assistant turn as the chat template renders it (its
    content and end of turn, after the generation prompt). Training with
    --assistant-only (TRL: assistant_only_loss) counts a position only when
    the token it predicts is the assistant's. `labelgen generate` writes it
    for --messages-field input; sets written before 2.4 have none."""

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
        for name in ("variable_k", "sampled_coverage", "assistant_mask"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.variable_k and self.logprob_codec == "gap":
            raise FormatError("logprob_codec 'gap' cannot store variable_k labels (gaps run along a full row of k)")
        if self.position_codec not in POSITION_CODECS:
            raise FormatError(f"position_codec must be one of {POSITION_CODECS}, got {self.position_codec!r}")
        if not 1 <= self.row_group_rows <= MAX_ROW_GROUP_ROWS:
            raise FormatError(f"row_group_rows must be in [1, {MAX_ROW_GROUP_ROWS}], got {self.row_group_rows}")

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
        d.setdefault("position_codec", "f32")   # written before 2.0: float32 coverage and target logprob
        return cls(**d)


def id_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned integer that holds every id below vocab_size."""
    if vocab_size <= 0:
        raise FormatError(f"vocab_size must be positive, got {vocab_size}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise FormatError(f"vocab_size {vocab_size} does not fit in uint32")


def position_dtype(column: str, enc: Encoding) -> np.dtype:
    """Stored type of a topk per-position float column (coverage, target_logprob)."""
    if enc.position_codec == "f32":
        return np.dtype(np.float32)
    return np.dtype(np.uint8 if column == COVERAGE else np.uint16)


def logprob_dtype(enc: Encoding) -> np.dtype:
    return np.dtype({"gap": np.uint16, "u8": np.uint8, "sqrt": np.uint8, "f32": np.float32}[enc.logprob_codec])


# ---------------------------------------------------------------- naming


def shard_name(index: int, worker: int | None = None) -> str:
    """File name of shard `index` (a pure function of its input slice)."""
    return f"shard-{index:06d}{SHARD_SUFFIX}" if worker is None else f"shard-w{worker:04d}-{index:06d}{SHARD_SUFFIX}"


def shard_index(name: str) -> int | None:
    """The index of a generated shard from its name (shard-000003.parquet, or
    shard-000003-<attempt>.parquet in a bucket), else None."""
    m = re.fullmatch(r"shard-(\d{6,})(?:-[0-9a-f]{8})?" + re.escape(SHARD_SUFFIX), name)
    return int(m.group(1)) if m else None


def partial_manifest_name(worker: int, num_workers: int) -> str:
    return f"manifest.worker-{worker:04d}-of-{num_workers:04d}.json"


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


