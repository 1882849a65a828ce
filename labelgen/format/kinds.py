"""The record kinds, one table: everything that differs between topk,
samples, tokens, sampled and scored shards — the columns, how Parquet stores them,
which column counts a row's positions, what the trainer's loader reads,
which ids the frequency map renumbers, and the validating encoder. A new
kind is a new entry here (plus its encoder and decoding in codec.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from labelgen.format import codec
from labelgen.format.schema import (ASSISTANT_MASK, COMPLETION, COMPLETION_IDS, COMPLETION_LOGPROBS, COVERAGE, EXAMPLE_ID,
                                    FINISH_REASON, INPUT_IDS, KINDS, PROMPT, PROMPT_IDS, ROUND, SAMPLE_INDEX, SAMPLING_LOGPROB,
                                    SAMPLED_COUNTS, SAMPLED_IDS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS, SEED,
                                    TARGET_LOGPROB, TARGET_RANK, TOPK_IDS, TOPK_KINDS, TOPK_LENGTHS, TOPK_LOGPROBS,
                                    WINDOW_OFFSET, Encoding, FormatError, id_dtype, logprob_dtype, position_dtype)


@dataclass(frozen=True)
class RecordKind:
    name: str
    columns: Callable[[pa.DataType, Encoding], list[tuple[str, pa.DataType]]]
    """(list-of-ids type, encoding) -> the shard's columns, in order."""
    encode: Callable[..., pa.RecordBatch]
    """codec's validating encoder: (schema, rows, k, vocab_size, enc, id_map) -> one batch."""
    position_column: str
    """The list column whose lengths count a row's positions (tokens: one fewer per row)."""
    loader_columns: tuple[str, ...]
    """The columns the training loader reads."""
    split_columns: Callable[[Encoding], tuple[str, ...]]
    """List columns stored BYTE_STREAM_SPLIT: integers whose high bytes are
    mostly zero and floats whose bytes compress apart."""
    id_column: str | None = None
    """The label-id column the frequency id map renumbers (format 1.2)."""
    dictionary_columns: tuple[str, ...] = (EXAMPLE_ID,)
    statistics_columns: tuple[str, ...] = (EXAMPLE_ID, WINDOW_OFFSET)

    def positions(self, batch: pa.RecordBatch | pa.Table) -> int:
        """Stored positions: next-token predictions (topk, tokens, sampled) or completion tokens (samples)."""
        n = int(pc.sum(pc.list_value_length(batch.column(self.position_column))).as_py() or 0)
        return n - batch.num_rows if self.name == "tokens" else n


def _windows(ids: pa.DataType, enc: Encoding, *rest) -> list:
    """A window kind's columns: the window, its label columns, and with enc.assistant_mask (2.4) which of its
    ids are the assistant's."""
    mask = [(ASSISTANT_MASK, pa.list_(pa.bool_()))] if enc.assistant_mask else []
    return [(EXAMPLE_ID, pa.string()), (WINDOW_OFFSET, pa.int64()), (INPUT_IDS, ids), *rest, *mask]


def _topk_per_position(ids: pa.DataType, enc: Encoding) -> list:
    """The per-position top-k columns (topk and scored)."""
    return [(TOPK_IDS, ids), (TOPK_LOGPROBS, pa.list_(pa.from_numpy_dtype(logprob_dtype(enc)))),
            (COVERAGE, pa.list_(pa.from_numpy_dtype(position_dtype(COVERAGE, enc)))),
            (TARGET_LOGPROB, pa.list_(pa.from_numpy_dtype(position_dtype(TARGET_LOGPROB, enc)))),
            (TARGET_RANK, pa.list_(pa.uint32())), *([(TOPK_LENGTHS, pa.list_(pa.uint32()))] if enc.variable_k else [])]


def _topk_split(enc: Encoding) -> tuple[str, ...]:
    return (TOPK_LOGPROBS, COVERAGE, TARGET_LOGPROB) + ((TOPK_LENGTHS,) if enc.variable_k else ())


TABLE = {k.name: k for k in (
    RecordKind(
        "topk",
        columns=lambda ids, enc: _windows(ids, enc, *_topk_per_position(ids, enc)),
        encode=codec.encode_topk_rows,
        position_column=COVERAGE,
        loader_columns=(INPUT_IDS, TOPK_IDS, TOPK_LOGPROBS, COVERAGE),
        # The id columns follow enc.id_encoding instead (see parquet_writer_options).
        split_columns=_topk_split,
        id_column=TOPK_IDS),
    RecordKind(
        "samples",
        columns=lambda ids, enc: [
            (EXAMPLE_ID, pa.string()), (SAMPLE_INDEX, pa.int32()), (PROMPT, pa.string()), (PROMPT_IDS, ids),
            (COMPLETION, pa.string()), (COMPLETION_IDS, ids), (COMPLETION_LOGPROBS, pa.list_(pa.float32())),
            (FINISH_REASON, pa.string()), (SEED, pa.int64())],
        encode=codec.encode_samples_rows,
        position_column=COMPLETION_IDS,
        loader_columns=(PROMPT_IDS, COMPLETION_IDS),
        split_columns=lambda enc: (),
        dictionary_columns=(EXAMPLE_ID, FINISH_REASON),
        statistics_columns=(EXAMPLE_ID, SAMPLE_INDEX)),
    RecordKind(
        "tokens",
        columns=lambda ids, enc: _windows(ids, enc),
        encode=codec.encode_tokens_rows,
        position_column=INPUT_IDS,
        loader_columns=(INPUT_IDS,),
        split_columns=lambda enc: (INPUT_IDS,)),
    RecordKind(
        "sampled",
        columns=lambda ids, enc: _windows(
            ids, enc, (SAMPLED_IDS, ids), (SAMPLED_COUNTS, pa.list_(pa.uint8())), (SAMPLED_LENGTHS, pa.list_(pa.uint8())),
            (SAMPLED_LOGPROBS, pa.list_(pa.uint8())),
            *([(COVERAGE, pa.list_(pa.from_numpy_dtype(position_dtype(COVERAGE, enc))))] if enc.sampled_coverage else [])),
        encode=codec.encode_sampled_rows,
        position_column=SAMPLED_LENGTHS,
        # COVERAGE where the set has it (Encoding.sampled_coverage): the loader reads what the schema holds.
        loader_columns=(INPUT_IDS, SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS, COVERAGE),
        split_columns=lambda enc: (INPUT_IDS, SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS)
        + ((COVERAGE,) if enc.sampled_coverage else ()),
        id_column=SAMPLED_IDS),
    RecordKind(
        # A sampled completion (input_ids: prompt then completion) scored by the teacher at
        # its completion tokens only: the per-position columns cover the last P input ids.
        "scored",
        columns=lambda ids, enc: [
            (EXAMPLE_ID, pa.string()), (SAMPLE_INDEX, pa.int32()), (ROUND, pa.int32()), (INPUT_IDS, ids),
            *_topk_per_position(ids, enc), (SAMPLING_LOGPROB, pa.list_(pa.float32()))],
        encode=codec.encode_scored_rows,
        position_column=COVERAGE,
        loader_columns=(INPUT_IDS, TOPK_IDS, TOPK_LOGPROBS, COVERAGE, TARGET_LOGPROB, SAMPLING_LOGPROB),
        split_columns=lambda enc: _topk_split(enc) + (SAMPLING_LOGPROB,),
        id_column=TOPK_IDS,
        statistics_columns=(EXAMPLE_ID, SAMPLE_INDEX, ROUND)),
)}
assert tuple(TABLE) == KINDS


def record_kind(kind: str) -> RecordKind:
    if kind not in TABLE:
        raise FormatError(f"unknown record kind {kind!r}; this version knows {KINDS}")
    return TABLE[kind]


def schema(kind: str, vocab_size: int, enc: Encoding) -> pa.Schema:
    """Arrow schema of a shard of `kind` whose ids are below `vocab_size`."""
    return pa.schema(record_kind(kind).columns(pa.list_(pa.from_numpy_dtype(id_dtype(vocab_size))), enc))


def parquet_writer_options(kind: str, enc: Encoding) -> dict:
    """Keyword arguments for pyarrow.parquet.ParquetWriter."""
    rk = record_kind(kind)
    dictionary = list(rk.dictionary_columns)
    column_encoding = {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in rk.split_columns(enc)}
    if kind in TOPK_KINDS:   # ids (or id deltas): the encoding benchmarks chose (enc.id_encoding)
        id_cols = [f"{c}.list.element" for c in (INPUT_IDS, TOPK_IDS)]
        if enc.id_encoding == "dictionary":
            dictionary += id_cols
        else:
            column_encoding.update({c: enc.id_encoding.upper() for c in id_cols})
    return dict(
        compression="zstd",
        compression_level=enc.zstd_level,
        write_page_checksum=True,   # CRC32 per page: readers verify every byte they decode
        use_dictionary=dictionary,
        column_encoding=column_encoding or None,
        write_statistics=list(rk.statistics_columns),
    )


def encode_rows(kind: str, rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                id_map: codec.IdMap | None = None) -> pa.RecordBatch:
    """Validate rows of `kind` and encode them into one batch (k: entries per
    position for topk and scored, draws per position for sampled)."""
    return record_kind(kind).encode(schema(kind, vocab_size, enc), rows, k, vocab_size, enc, id_map)


def uses_id_map(kind: str, enc: Encoding) -> bool:
    """Whether shards of this kind and encoding carry an id table (format 1.2)."""
    return record_kind(kind).id_column is not None and enc.id_map == "frequency"
