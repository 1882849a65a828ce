"""Rows to Arrow batches and back: the logprob codecs, the frequency id map
(1.2), one validating encoder per record kind, and `decode_batch`, which
turns any shard's row group back into numpy arrays."""

from __future__ import annotations

import base64
import functools
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from labelgen.format.schema import (ASSISTANT_MASK, COMPLETION, COMPLETION_IDS, COMPLETION_LOGPROBS, COVERAGE, EXAMPLE_ID,
                                    FINISH_REASON, INPUT_IDS, LOGPROB_FLOOR, POSITIVE_TOLERANCE, PROMPT,
                                    PROMPT_IDS, ROUND, SAMPLED_COUNTS, SAMPLED_IDS, SAMPLED_LENGTHS,
                                    SAMPLED_LOGPROBS, SAMPLE_INDEX, SAMPLING_LOGPROB, SEED, TAIL_SQRT_STEP, TARGET_LOGPROB,
                                    TARGET_LOGPROB_STEP, TARGET_RANK, TOPK_IDS, TOPK_KINDS, TOPK_LENGTHS,
                                    TOPK_LOGPROBS, WINDOW_OFFSET, Encoding, FormatError, id_dtype, position_dtype)


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


# ---------------------------------------------------------------- per-position columns (2.0)


# coverage is stored as its tail mass 1 - coverage, a probability, through the sqrt codec
_TAIL_CODEC = Encoding(logprob_codec="sqrt", sqrt_step=TAIL_SQRT_STEP)


def encode_coverage(cov: np.ndarray, enc: Encoding) -> np.ndarray:
    if enc.position_codec == "f32":
        return cov.astype(np.float32)
    with np.errstate(divide="ignore"):   # a tail of 0 is log 0: the codec's floor, code 0
        return encode_logprobs(np.log(np.clip(1 - cov.astype(np.float64), 0, 1)), _TAIL_CODEC)


def decode_coverage(stored: np.ndarray, enc: Encoding) -> np.ndarray:
    if enc.position_codec == "f32":
        return stored.astype(np.float32, copy=False)
    return (1 - np.exp(decode_logprobs(stored, _TAIL_CODEC))).astype(np.float32)


def encode_target_logprob(lp: np.ndarray, enc: Encoding) -> np.ndarray:
    if enc.position_codec == "f32":
        return lp.astype(np.float32)
    return np.rint(-lp.astype(np.float64) / TARGET_LOGPROB_STEP).astype(np.uint16)   # lp in [LOGPROB_FLOOR, 0]


def decode_target_logprob(stored: np.ndarray, enc: Encoding) -> np.ndarray:
    if enc.position_codec == "f32":
        return stored.astype(np.float32, copy=False)
    return (stored * -TARGET_LOGPROB_STEP).astype(np.float32)


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


def _assistant_mask(sch: pa.Schema, rows: list[dict]) -> dict[str, pa.Array]:
    """The assistant_mask column of window rows where the schema has one
    (Encoding.assistant_mask, 2.4): one bool per input id, else nothing."""
    if ASSISTANT_MASK not in sch.names:
        return {}
    masks = []
    for r in rows:
        ex, m = r.get(EXAMPLE_ID), r.get(ASSISTANT_MASK)
        if m is None:
            _fail(ex, "assistant_mask is missing (this encoding marks which input ids are the assistant's)")
        m, n = np.asarray(m).reshape(-1), np.asarray(r[INPUT_IDS]).size
        if m.size != n:
            _fail(ex, f"assistant_mask has {m.size} entries for {n} input ids (one per input id)")
        if m.dtype != bool and not (m.dtype.kind in "iu" and np.isin(m, (0, 1)).all()):
            _fail(ex, "assistant_mask must hold booleans (or 0/1)")
        masks.append(m.astype(bool))
    return {ASSISTANT_MASK: _list_array(np.concatenate(masks), (m.size for m in masks), pa.bool_())}


def encode_topk_rows(sch: pa.Schema, rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                     id_map: IdMap | None = None) -> pa.RecordBatch:
    """Validate and encode topk rows (see module docstring) into one batch.

    Each row: example_id, window_offset (default 0), input_ids [L],
    topk_ids [L-1, k], topk_logprobs [L-1, k] (sorted descending, <= 0),
    coverage [L-1], target_logprob [L-1], target_rank [L-1]. `id_map`
    renumbers the stored top-k ids (required when enc.id_map is frequency).
    With enc.variable_k, entries whose logprob is -inf are dropped (the top-1
    of every position must be kept; their ids are not looked at). With
    enc.assistant_mask, also assistant_mask [L] (bool).
    """
    cols = _topk_columns(sch, rows, k, vocab_size, enc, id_map, scored=False)
    cols.update(_assistant_mask(sch, rows))
    cols[EXAMPLE_ID] = pa.array([r[EXAMPLE_ID] for r in rows], pa.string())
    cols[WINDOW_OFFSET] = pa.array([int(r.get(WINDOW_OFFSET, 0)) for r in rows], pa.int64())
    return pa.RecordBatch.from_arrays([cols[f.name] for f in sch], schema=sch)


def encode_scored_rows(sch: pa.Schema, rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                       id_map: IdMap | None = None) -> pa.RecordBatch:
    """Validate and encode scored rows: a sampled completion the teacher
    scored. Each row: example_id, sample_index, round, input_ids [L] (prompt
    then completion) and, for the P completion tokens only (1 <= P <= L-1:
    position j predicts input_ids[L-P+j]), the topk columns as in
    encode_topk_rows plus sampling_logprob [P], the sampler's logprob of
    each completion token."""
    cols = _topk_columns(sch, rows, k, vocab_size, enc, id_map, scored=True)
    n_pos, sampling = [], []
    for r in rows:
        ex, p = r[EXAMPLE_ID], len(np.asarray(r[TARGET_LOGPROB]).reshape(-1))
        slp = np.asarray(r[SAMPLING_LOGPROB], np.float32).reshape(-1)
        sampling.append(np.clip(slp, LOGPROB_FLOOR, 0))
        if slp.size != p:
            _fail(ex, f"sampling_logprob has {slp.size} entries, expected {p} (one per completion token)")
        if np.isnan(slp).any() or (slp > POSITIVE_TOLERANCE).any():
            _fail(ex, "sampling_logprob must be <= 0 and not NaN")
        for name in (SAMPLE_INDEX, ROUND):
            if not isinstance(r.get(name), (int, np.integer)) or not 0 <= r[name] < 2**31:
                _fail(ex, f"{name} must be an integer in [0, 2^31), got {r.get(name)!r}")
        n_pos.append(p)
    cols[EXAMPLE_ID] = pa.array([r[EXAMPLE_ID] for r in rows], pa.string())
    cols[SAMPLE_INDEX] = pa.array([int(r[SAMPLE_INDEX]) for r in rows], pa.int32())
    cols[ROUND] = pa.array([int(r[ROUND]) for r in rows], pa.int32())
    cols[SAMPLING_LOGPROB] = _list_array(np.concatenate(sampling), n_pos, pa.float32())
    return pa.RecordBatch.from_arrays([cols[f.name] for f in sch], schema=sch)


def _topk_columns(sch: pa.Schema, rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                  id_map: IdMap | None, scored: bool) -> dict[str, pa.Array]:
    """The validated, encoded input_ids and per-position top-k columns of
    topk rows (a prediction per next token) or scored rows (one per
    completion token, the last len(target_logprob) of the input ids)."""
    _check_id_map(enc, id_map)
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
        if scored:
            p = np.asarray(r[TARGET_LOGPROB]).reshape(-1).size
            if not 1 <= p <= inp.size - 1:
                _fail(ex, f"{p} completion positions for {inp.size} input ids (expected 1 to {inp.size - 1})")
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
    cols = {
        INPUT_IDS: _list_array(np.concatenate(inputs), (a.size for a in inputs), ids_t),
        TOPK_IDS: _list_array(np.concatenate(tids), entries, ids_t),
        TOPK_LOGPROBS: _list_array(stored, entries, lp_t),
        COVERAGE: _list_array(encode_coverage(np.concatenate(covs), enc), n_pos, sch.field(COVERAGE).type.value_type),
        TARGET_LOGPROB: _list_array(encode_target_logprob(np.concatenate(tgt_lp), enc), n_pos,
                                    sch.field(TARGET_LOGPROB).type.value_type),
        TARGET_RANK: _list_array(np.concatenate(tgt_rank), n_pos, pa.uint32()),
    }
    if enc.variable_k:
        cols[TOPK_LENGTHS] = _list_array(np.concatenate(kept_n), n_pos, pa.uint32())
    return cols


def encode_samples_rows(sch: pa.Schema, rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                        id_map: IdMap | None = None) -> pa.RecordBatch:
    """Validate and encode samples rows into one batch. Each row: example_id,
    sample_index, prompt, prompt_ids, completion, completion_ids,
    completion_logprobs (one per completion id), finish_reason, seed."""
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


def encode_tokens_rows(sch: pa.Schema, rows: list[dict], k: int, vocab_size: int, enc: Encoding,
                       id_map: IdMap | None = None) -> pa.RecordBatch:
    """Validate and encode tokens rows: example_id, window_offset, input_ids (>= 2 ids), and with
    enc.assistant_mask assistant_mask (one bool per input id)."""
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
    cols = {EXAMPLE_ID: pa.array([r[EXAMPLE_ID] for r in rows], pa.string()),
            WINDOW_OFFSET: pa.array([int(r.get(WINDOW_OFFSET, 0)) for r in rows], pa.int64()),
            INPUT_IDS: _list_array(np.concatenate(arrays), (a.size for a in arrays), sch.field(INPUT_IDS).type.value_type),
            **_assistant_mask(sch, rows)}
    return pa.RecordBatch.from_arrays([cols[f.name] for f in sch], schema=sch)


def encode_sampled_rows(sch: pa.Schema, rows: list[dict], draws: int, vocab_size: int, enc: Encoding,
                        id_map: IdMap | None = None) -> pa.RecordBatch:
    """Validate and encode sampled rows. Each row: example_id, window_offset,
    input_ids [L], sampled_lengths [L-1], sampled_ids and sampled_counts
    [sum of lengths] (per position ascending ids, counts summing to `draws`),
    sampled_logprobs [same] or empty, and with enc.sampled_coverage
    coverage [L-1] (the teacher's mass on each position's distinct ids),
    with enc.assistant_mask assistant_mask [L] (bool). `id_map` renumbers the stored ids (required when enc.id_map is
    frequency); each position is stored in ascending order of its
    renumbered ids."""
    _check_id_map(enc, id_map)
    u8 = Encoding(logprob_codec="u8", u8_range=enc.u8_range)
    cols: dict[str, list] = {c: [] for c in (INPUT_IDS, SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS,
                                             COVERAGE)}
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
        if enc.sampled_coverage:
            cov = np.asarray(r.get(COVERAGE, ()), dtype=np.float32).reshape(-1)
            if cov.size != lengths.size:
                _fail(ex, f"coverage has {cov.size} entries, expected {lengths.size} (one per position)")
            if np.isnan(cov).any() or (cov < 0).any() or (cov > 1 + POSITIVE_TOLERANCE).any():
                _fail(ex, "coverage outside [0, 1] (or NaN)")
            cols[COVERAGE].append(encode_coverage(cov, enc))
    names = (INPUT_IDS, SAMPLED_IDS, SAMPLED_COUNTS, SAMPLED_LENGTHS, SAMPLED_LOGPROBS) \
        + ((COVERAGE,) if enc.sampled_coverage else ())
    arrays = {c: _list_array(np.concatenate(cols[c]), (a.size for a in cols[c]), sch.field(c).type.value_type)
              for c in names}
    arrays.update({EXAMPLE_ID: pa.array([r[EXAMPLE_ID] for r in rows], pa.string()),
                   WINDOW_OFFSET: pa.array([int(r.get(WINDOW_OFFSET, 0)) for r in rows], pa.int64()),
                   **_assistant_mask(sch, rows)})
    return pa.RecordBatch.from_arrays([arrays[f.name] for f in sch], schema=sch)


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
    id_column = {"topk": TOPK_IDS, "scored": TOPK_IDS, "sampled": SAMPLED_IDS}.get(kind)   # ids the frequency map renumbers
    if id_column:
        _check_id_map(enc, id_map)
    out: dict[str, Any] = {}
    stored_lp = None
    kept = None   # [positions, k] mask of stored slots (variable_k)
    if kind in TOPK_KINDS and enc.variable_k and (TOPK_IDS in batch.schema.names or TOPK_LOGPROBS in batch.schema.names):
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
        elif name in (COVERAGE, TARGET_LOGPROB):
            want = position_dtype(name, enc)
            if values.dtype != want:
                raise FormatError(f"{name} holds {values.dtype} values; the encoding stores {want}")
            values = (decode_coverage if name == COVERAGE else decode_target_logprob)(values, enc)
        elif name == SAMPLED_LOGPROBS:
            values = decode_logprobs(values[None, :], Encoding(logprob_codec="u8", u8_range=enc.u8_range))[0]
        elif name == ASSISTANT_MASK:
            values = values.astype(bool, copy=False)
        else:
            values = values.astype(np.float32, copy=False)
        out[name] = (values, offsets)
    if kind in TOPK_KINDS and enc.id_order == "sorted" and TOPK_IDS in out and not rank_order:
        ids, off = out[TOPK_IDS]
        ids = np.cumsum(ids, axis=1)
        if kept is not None:
            ids[~kept] = 0
        out[TOPK_IDS] = (ids, off)
    elif kind in TOPK_KINDS and enc.id_order == "sorted" and (TOPK_IDS in out or TOPK_LOGPROBS in out):
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
    if id_map is not None and id_column in out:
        ids, off = out[id_column]
        if ids.size and (ids.min() < 0 or ids.max() >= len(id_map.from_stored)):
            raise FormatError(f"stored {id_column} outside the vocabulary [0, {len(id_map.from_stored)})")
        ids = id_map.from_stored[ids]
        if kept is not None and id_column == TOPK_IDS:
            ids[~kept] = 0
        out[id_column] = (ids, off)
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


