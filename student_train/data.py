"""Streaming label data for the student: row groups in, padded batches out.

The unit of work is a Parquet row group. Each epoch the units of all label
sets are shuffled with (seed, epoch) and dealt to consumers — one consumer
per (DDP rank, DataLoader worker) — by stride, so consumers never overlap and
together miss nothing. A consumer reads `group_units` units at a time, shuffles
their rows with (seed, epoch, consumer, group) and cuts batches: memory is
bounded by that group, never by the dataset. The plan is arrays (UnitPlan):
cumulative row-group counts per shard, and a keyed permutation that each
consumer evaluates at its own positions only, so a million-shard set costs a
consumer a few tens of MB, not a list of every row group.

Every batch comes with the consumer's position after it, (epoch, group, row).
The training loop keeps the latest position of each consumer (LoaderState);
restarting the stream from those positions yields exactly the batches that
would have come next, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from labelgen import format as fmt
from labelgen.format import FormatError
from labelgen.shards import ShardReader


def open_label_sets(dirs: list[str], verify: bool = False, checksums: bool = True) -> list[ShardReader]:
    """Readers for label dirs that can be trained on together (same kind and
    tokenizer), at a cost of a few store requests whatever their size (the
    manifest and its shard table): each shard's size, footer hash and page
    CRC32s are checked when it is read (checksums), and verify=True checks
    every shard's size and sha256 first (a request and a full read each)."""
    if not dirs:
        raise FormatError("--labels: at least one label directory is required")
    readers = [ShardReader(d, verify=verify, checksums=checksums, file_hashes=False) for d in dirs]
    for r in readers if verify else ():
        r.check_files()
    first = readers[0]
    for r in readers[1:]:
        if r.kind != first.kind:
            raise FormatError(f"--labels: {r.dir} holds {r.kind} labels, {first.dir} holds {first.kind}; train on one kind at a time")
        fp_a = first.manifest.get("tokenizer", {}).get("fingerprint")
        fp_b = r.manifest.get("tokenizer", {}).get("fingerprint")
        if fp_a != fp_b:
            raise FormatError(f"--labels: {r.dir} and {first.dir} were made with different tokenizers")
    return readers


def sampled_weights(counts: np.ndarray, logprobs: np.ndarray | None, starts: np.ndarray, temperature: float) -> np.ndarray:
    """Empirical probabilities of the distinct drawn ids of each position.
    Draws from softmax(z / T) over-represent (T > 1) or under-represent
    (T < 1) the tail; self-normalised importance weights p/q ∝ p^(1 - 1/T)
    turn them back into an estimate of the teacher's own distribution."""
    w = counts.astype(np.float64)
    if temperature != 1.0:
        w = w * np.exp(logprobs.astype(np.float64) * (1.0 - 1.0 / temperature))
    totals = np.add.reduceat(w, starts) if len(starts) else w
    return (w / np.repeat(totals, np.diff(np.append(starts, len(w))))).astype(np.float32)


def _spread(offsets: np.ndarray, rows: np.ndarray):
    """For the selected rows of a list column: each value's row in the
    selection, its index within its row, its index in the flat values, and
    the rows' lengths."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    row = np.repeat(np.arange(len(rows)), lengths)
    t = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return row, t, np.repeat(starts, lengths) + t, lengths


def concat_columns(parts: list[dict]) -> dict:
    """Decoded list columns (values, offsets) of consecutive row groups as one."""
    out = {}
    for name in parts[0]:
        offsets, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p[name][1][1:] + base)
            base += p[name][1][-1]
        out[name] = (np.concatenate([p[name][0] for p in parts]), np.concatenate(offsets))
    return out


def take_rows(columns: dict, rows: np.ndarray) -> dict:
    """The selected rows of decoded list columns, as columns of their own."""
    out = {}
    for name, (values, offsets) in columns.items():
        _, _, flat, lengths = _spread(offsets, rows)
        out[name] = (values[flat], np.concatenate([[0], np.cumsum(lengths)]))
    return out


def columns_from_rows(rows: list[dict]) -> dict:
    """Per-row arrays (e.g. ShardReader.iter_rows output) as decoded list columns."""
    return {name: (np.concatenate([r[name] for r in rows]),
                   np.concatenate([[0], np.cumsum([len(r[name]) for r in rows])]))
            for name in rows[0] if rows[0][name] is not None and not np.isscalar(rows[0][name])}


def collate(columns: dict, kind: str, rows: np.ndarray | None = None, k: int | None = None,
            vocab_limit: int | None = None, proposal_temperature: float = 1.0,
            assistant_only: bool = False) -> dict[str, torch.Tensor]:
    """A padded batch of `rows` (default: all) straight from decoded list
    columns (values, offsets), with no per-row objects. Position t of a row
    predicts input_ids[t + 1].

    Rows are topk, tokens (windows of ids), samples (prompt + completion) or
    scored (prompt + completion, labelled at the completion only).
    Returns input_ids, attention_mask [B, T]; targets, mask [B, T-1]; for
    topk and scored rows topk_ids (long), topk_logprobs (float32, -inf for
    empty slots), coverage [B, T-1, k] / [B, T-1] (entries in stored order
    unless k drops some, which needs rank order); for scored rows also
    teacher_logprob and sampling_logprob [B, T-1], the teacher's and the
    sampler's logprob of each completion token; for sampled rows
    sampled_ids, sampled_weights [B, T-1, M] (the distinct drawn ids, their
    empirical probabilities), sampled_logprobs [B, T-1, M] (-inf in empty
    slots) where the set stores them, and sampled_coverage [B, T-1] (the
    teacher's mass on the drawn ids) where the set has it. Label ids at or above `vocab_limit` (the
    teacher's padded vocabulary slots) are emptied: they carry no mass the
    student could match. `assistant_only` (windows of chat text, which need
    the assistant_mask column) counts a position only when the token it
    predicts is the assistant's; samples and scored rows count their
    completion tokens only, always.
    """
    if rows is None:
        rows = np.arange(len(next(iter(columns.values()))[1]) - 1)
    if kind == "samples":
        (prompt, p_off), (completion, c_off) = columns[fmt.PROMPT_IDS], columns[fmt.COMPLETION_IDS]
        prompt_lengths = p_off[rows + 1] - p_off[rows]
        lengths = prompt_lengths + c_off[rows + 1] - c_off[rows]
        first = np.maximum(prompt_lengths - 1, 0)   # prompt tokens are not targets
    else:
        tokens, t_off = columns[fmt.INPUT_IDS]
        lengths = t_off[rows + 1] - t_off[rows]
        first = np.zeros(len(rows), np.int64)
        if kind == "scored":   # the labels cover the last positions of each row: its completion
            c_off = columns[fmt.COVERAGE][1]
            first = lengths - 1 - (c_off[rows + 1] - c_off[rows])
    B, T = len(rows), int(lengths.max())
    ids = np.zeros((B, T), np.int64)
    if kind == "samples":
        r, t, flat, _ = _spread(p_off, rows)
        ids[r, t] = prompt[flat]
        r, t, flat, _ = _spread(c_off, rows)
        ids[r, t + prompt_lengths[r]] = completion[flat]
    else:
        r, t, flat, _ = _spread(t_off, rows)
        ids[r, t] = tokens[flat]
    step = np.arange(T)
    attn = (step < lengths[:, None]).astype(np.int64)
    mask = (step[:-1] >= first[:, None]) & (step[:-1] < (lengths - 1)[:, None])
    if assistant_only and kind in fmt.WINDOW_KINDS:
        if fmt.ASSISTANT_MASK not in columns:
            raise FormatError("assistant-only training needs labels that mark the assistant's tokens (the "
                              f"{fmt.ASSISTANT_MASK} column of chat label sets, format 2.4)")
        marks, m_off = columns[fmt.ASSISTANT_MASK]
        if (m_off[rows + 1] - m_off[rows] != lengths).any():
            raise FormatError(f"{fmt.ASSISTANT_MASK} and {fmt.INPUT_IDS} differ in length")
        assistant = np.zeros((B, T), bool)
        assistant[r, t] = marks[_spread(m_off, rows)[2]]
        mask &= assistant[:, 1:]   # position t predicts token t + 1: it counts when that token is the assistant's
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
           "targets": torch.from_numpy(ids[:, 1:].copy()), "mask": torch.from_numpy(mask)}
    if kind in fmt.TOPK_KINDS:
        (top_ids, _), (top_lp, _), (cover, p_off) = (columns[fmt.TOPK_IDS], columns[fmt.TOPK_LOGPROBS],
                                                      columns[fmt.COVERAGE])
        K = k or top_ids.shape[1]
        r, t, pos, _ = _spread(p_off, rows)
        t = t + first[r]
        tids = np.zeros((B, T - 1, K), np.int64)
        tlp = np.zeros((B, T - 1, K), np.float32)
        cov = np.ones((B, T - 1), np.float32)
        tids[r, t] = top_ids[pos, :K]
        tlp[r, t] = top_lp[pos, :K]
        dropped = np.exp(top_lp[pos, K:].astype(np.float64)).sum(1)   # mass of entries beyond k
        cov[r, t] = np.clip(cover[pos] - dropped, 0, 1)
        if vocab_limit is not None:
            outside = tids >= vocab_limit
            tids[outside] = 0
            tlp[outside] = -np.inf
        out.update(topk_ids=torch.from_numpy(tids), topk_logprobs=torch.from_numpy(tlp), coverage=torch.from_numpy(cov))
        if kind == "scored":
            for name, column in (("teacher_logprob", fmt.TARGET_LOGPROB), ("sampling_logprob", fmt.SAMPLING_LOGPROB)):
                values = np.zeros((B, T - 1), np.float32)
                values[r, t] = columns[column][0][pos]
                out[name] = torch.from_numpy(values)
    if kind == "sampled":
        (per_position, p_off), (drawn, _) = columns[fmt.SAMPLED_LENGTHS], columns[fmt.SAMPLED_IDS]
        r, t, pos, _ = _spread(p_off, rows)
        n = per_position[pos]                                   # distinct ids of each selected position
        starts = np.cumsum(n) - n
        entry = np.repeat(np.arange(len(pos)), n)
        slot = np.arange(int(n.sum())) - np.repeat(starts, n)
        flat = np.repeat((np.cumsum(per_position) - per_position)[pos], n) + slot
        stored = columns[fmt.SAMPLED_LOGPROBS][0]
        logprobs = stored[flat] if stored.size == drawn.size else None   # stored at T != 1, or when asked for
        if proposal_temperature != 1.0 and logprobs is None:
            raise FormatError("sampled labels drawn at a proposal temperature need the drawn ids' logprobs")
        M = int(n.max()) if len(n) else 1
        sids = np.zeros((B, T - 1, M), np.int64)
        sw = np.zeros((B, T - 1, M), np.float32)
        sids[r[entry], t[entry], slot] = drawn[flat]
        sw[r[entry], t[entry], slot] = sampled_weights(columns[fmt.SAMPLED_COUNTS][0][flat], logprobs, starts,
                                                       proposal_temperature)
        slp = None
        if logprobs is not None:
            slp = np.full((B, T - 1, M), -np.inf, np.float32)
            slp[r[entry], t[entry], slot] = logprobs
        if vocab_limit is not None:
            outside = sids >= vocab_limit
            sids[outside], sw[outside] = 0, 0.0
            if slp is not None:
                slp[outside] = -np.inf
        out.update(sampled_ids=torch.from_numpy(sids), sampled_weights=torch.from_numpy(sw))
        if slp is not None:
            out["sampled_logprobs"] = torch.from_numpy(slp)
        if fmt.COVERAGE in columns:   # format 2.2: the teacher's mass on each position's drawn ids
            cov = np.ones((B, T - 1), np.float32)
            cov[r, t] = columns[fmt.COVERAGE][0][pos]
            out["sampled_coverage"] = torch.from_numpy(cov)
    return out


class UnitPlan:
    """The loader's work list as arrays. The units (row groups) of the
    selected shards are numbered 0..U-1 in set, shard, row-group order;
    `unit(u)` maps numbers back to (set, shard, row group) by a binary search
    over cumulative counts. An epoch's order is a keyed permutation of
    [0, U): a 4-round Feistel network over the next even power of two,
    walking values >= U on through it, keyed by (seed, epoch), so position p
    of the order is computed alone and a consumer computes only its own."""

    ROUNDS = 4

    def __init__(self, readers: list[ShardReader], selection: list[tuple[int, int, int]]):
        """`selection`: (set, first shard, end shard) ranges of the sets' shards, in order."""
        self.ranges = np.array([(d, start) for d, start, _ in selection], np.int64).reshape(-1, 2)
        self.range_first = np.cumsum([0] + [stop - start for _, start, stop in selection])   # each range's first shard
        self.first = np.zeros(int(self.range_first[-1]) + 1, np.int64)   # each selected shard's first unit, and U
        for r, (d, start, stop) in enumerate(selection):
            groups = readers[d].shards[start:stop].column("row_groups")
            unknown = np.flatnonzero(groups < 0)   # written before the manifest counted them: read each footer
            groups = groups.copy() if len(unknown) else groups
            for i in unknown:
                groups[i] = readers[d].open_shard(readers[d].shards[int(start + i)]).num_row_groups
            self.first[self.range_first[r] + 1:self.range_first[r + 1] + 1] = groups
        np.cumsum(self.first, out=self.first)
        self.size = int(self.first[-1])
        self.half = max(1, (max(self.size - 1, 1).bit_length() + 1) // 2)   # the permutation's domain: 4^half >= U

    def unit(self, u: np.ndarray) -> list[tuple[int, int, int]]:
        """(set, shard, row group) of the units numbered u."""
        i = np.searchsorted(self.first, u, side="right") - 1   # the selected shard
        r = np.searchsorted(self.range_first, i, side="right") - 1   # its range: (set, first shard)
        d, shard = self.ranges[r, 0], self.ranges[r, 1] + i - self.range_first[r]
        return list(zip(d.tolist(), shard.tolist(), (u - self.first[i]).tolist()))

    def order(self, positions: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        """The units at `positions` of epoch `epoch`'s order (the identity without shuffle)."""
        positions = np.asarray(positions, np.uint64)
        if not shuffle:
            return positions.astype(np.int64)
        keys = np.random.default_rng([seed, epoch]).integers(0, 1 << 62, self.ROUNDS, dtype=np.uint64)
        out = self._feistel(positions, keys)
        walking = out >= self.size
        while walking.any():   # out of [0, U): on through the permutation until inside (a bijection of [0, U))
            out[walking] = self._feistel(out[walking], keys)
            walking = out >= self.size
        return out.astype(np.int64)

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> np.uint64(self.half), x & mask
        with np.errstate(over="ignore"):   # the round function (splitmix64's finalizer) wraps in uint64 on purpose
            for k in keys:
                z = right ^ k
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
        return (left << np.uint64(self.half)) | right


@dataclass
class LoaderState:
    """Positions of every consumer, kept by the training loop from the batches it receives."""
    slots: dict[int, list[int]] = field(default_factory=dict)
    next_local: int = 0
    num_local: int = 1

    def update(self, meta: dict) -> None:
        self.slots[int(meta["slot"])] = list(meta["position"])
        self.num_local = int(meta["num_local"])
        self.next_local = (int(meta["local"]) + 1) % self.num_local

    def state_dict(self) -> dict:
        return {"slots": {str(k): v for k, v in self.slots.items()}, "next_local": self.next_local, "num_local": self.num_local}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls({int(k): v for k, v in d["slots"].items()}, int(d["next_local"]), int(d["num_local"]))

    def merge(self, other: "LoaderState") -> None:
        self.slots.update(other.slots)


class LabelStream(torch.utils.data.IterableDataset):
    """Batches from label sets, split across ranks and DataLoader workers.
    Use with DataLoader(stream, batch_size=None, num_workers=W)."""

    def __init__(self, readers: list[ShardReader], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 group_units: int = 4, rank: int = 0, world_size: int = 1, max_epochs: int | None = None,
                 k: int | None = None, vocab_limit: int | None = None, shards: list[tuple[int, int, int]] | None = None,
                 cross=None, byte_lengths: np.ndarray | None = None, assistant_only: bool = False):
        """`shards`: (set, first shard, end shard) ranges to read (default:
        every shard of every set; holdout_split makes them). `byte_lengths`:
        bytes of each token id; batches then carry `target_bytes`
        (cross-tokenizer batches always do), so evaluation reports bits per
        byte, a unit that compares across tokenizers. `assistant_only`: count
        only the positions that predict an assistant's token (set_assistant_only)."""
        self.readers, self.batch_size, self.seed, self.shuffle = readers, batch_size, seed, shuffle
        self.byte_lengths = byte_lengths
        self.group_units, self.rank, self.world_size, self.max_epochs = group_units, rank, world_size, max_epochs
        self.kind, self.k, self.vocab_limit = readers[0].kind, k, vocab_limit
        self.cross = cross   # a student_train.xtok.CrossTokenizer: batches in the student's own tokenization
        self.proposal_temperature = float(readers[0].manifest.get("sampling", {}).get("proposal_temperature", 1.0))
        # The loader's columns that every set has (a sampled set's coverage came with format 2.2).
        names = set.intersection(*(set(fmt.schema(r.kind, r.vocab_size, r.encoding).names) for r in readers))
        self.columns = [c for c in fmt.record_kind(self.kind).loader_columns if c in names]
        self.assistant_only = False
        self.set_assistant_only(assistant_only)
        # Entry order matters only when k keeps a rank prefix of what is stored.
        self.rank_order = k is not None and k < readers[0].k
        self.plan = UnitPlan(readers, shards if shards is not None else [(d, 0, len(r.shards)) for d, r in enumerate(readers)])
        if not self.plan.size:
            where = ", ".join(str(r.dir) for r in readers)
            raise FormatError(f"{where}: {'the label set is empty' if shards is None else 'the selected shards are empty'} "
                              "(0 rows); nothing to read")
        self.start = LoaderState()
        self._open: tuple = (None, None)   # (dir, shard) -> its open ParquetFile, the last one read

    def load_state_dict(self, state: dict) -> None:
        self.start = LoaderState.from_dict(state)

    def set_assistant_only(self, on: bool, option: str = "--assistant-only") -> None:
        """Count only the positions that predict an assistant's token (`option`
        names the setting in errors). Windows of chat text need the sets'
        assistant_mask (format 2.4); samples and scored rows count only their
        completions anyway, so for them nothing changes."""
        if on and self.kind in fmt.WINDOW_KINDS:
            for r in self.readers:
                if not r.encoding.assistant_mask:
                    raise FormatError(f"{option}: {r.dir} does not mark the assistant's tokens (made from text, not from "
                                      f"--messages-field, or before format 2.4); regenerate it from the conversations "
                                      "with --messages-field, or train on every position")
            if fmt.ASSISTANT_MASK not in self.columns:
                self.columns.append(fmt.ASSISTANT_MASK)
        self.assistant_only = bool(on)

    def _consumer(self) -> tuple[int, int, int, int]:
        info = torch.utils.data.get_worker_info()
        num_local = info.num_workers if info else 1
        worker = info.id if info else 0
        # After a resume the DataLoader asks worker 0 first; give it the role
        # of the consumer whose batch was due next, so the order is unchanged.
        offset = self.start.next_local if self.start.num_local == num_local else 0
        local = (worker + offset) % num_local
        return self.rank * num_local + local, self.world_size * num_local, local, num_local

    def consumer_units(self, epoch: int, slot: int, n_slots: int, first: int = 0,
                       count: int | None = None) -> list[tuple[int, int, int]]:
        """(set, shard, row group) of this consumer's units `first`.. (`count` of them, default all) in
        `epoch`: positions slot, slot + n_slots, ... of the epoch's order."""
        total = max(0, -(-(self.plan.size - slot) // n_slots))
        j = np.arange(first, total if count is None else min(total, first + count), dtype=np.int64)
        return self.plan.unit(self.plan.order(slot + n_slots * j, self.seed, epoch, self.shuffle))

    def _columns(self, units) -> dict:
        """The decoded columns of `units`, joined."""
        parts = []
        for d, s, g in units:
            # Consecutive units often share a shard: open (stat, footer, metadata check) it once.
            if self._open[0] != (d, s):
                self._open = ((d, s), self.readers[d].open_shard(self.readers[d].shards[s]))
            parts.append(self.readers[d].read_row_group(s, g, self.columns, self._open[1], rank_order=self.rank_order))
        return concat_columns(parts)

    def _batch(self, pieces: list[tuple[dict, np.ndarray]]) -> dict:
        """Collate rows picked from one or (a batch spanning groups) several groups' columns."""
        columns, rows = pieces[0] if len(pieces) == 1 else (
            concat_columns([take_rows(c, r) for c, r in pieces]), None)
        if self.cross is not None:
            return self.cross.collate(columns, rows, self.k, self.vocab_limit, self.proposal_temperature,
                                      self.assistant_only)
        batch = collate(columns, self.kind, rows, self.k, self.vocab_limit, self.proposal_temperature,
                        self.assistant_only)
        if self.byte_lengths is not None:
            lengths = torch.from_numpy(self.byte_lengths)
            batch["target_bytes"] = lengths[batch["targets"].clamp(0, len(lengths) - 1)] * batch["mask"]
        return batch

    def _groups(self, epoch: int, slot: int, n_slots: int, first: int = 0):
        """(index, columns, row order) of this consumer's shuffle groups in `epoch`, from group `first`."""
        if self.plan.size < n_slots:
            raise FormatError(f"{self.plan.size} row groups cannot feed {n_slots} consumers "
                              f"(ranks x DataLoader workers); use fewer workers or more, smaller row groups")
        mine = -(-(self.plan.size - slot) // n_slots)   # this consumer's units this epoch
        for gi in range(first, -(-mine // self.group_units)):
            columns = self._columns(self.consumer_units(epoch, slot, n_slots, gi * self.group_units, self.group_units))
            order = np.arange(len(next(iter(columns.values()))[1]) - 1)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch, slot, gi]).shuffle(order)
            yield gi, columns, order

    def rows(self, epoch: int):
        """One epoch of single examples (dicts of arrays), for this DataLoader
        worker, in the order batches would take them."""
        slot, n_slots, _, _ = self._consumer()
        for _, columns, order in self._groups(epoch, slot, n_slots):
            for i in order:
                yield {name: values[offsets[i]:offsets[i + 1]] for name, (values, offsets) in columns.items()}

    def __iter__(self):
        slot, n_slots, local, num_local = self._consumer()
        epoch, group, row = self.start.slots.get(slot, [0, 0, 0])
        pieces, pending = [], 0   # rows of the batch being filled, per group they come from
        while self.max_epochs is None or epoch < self.max_epochs:
            for gi, columns, order in self._groups(epoch, slot, n_slots, group):
                while row < len(order):
                    take = order[row:row + self.batch_size - pending]
                    pieces.append((columns, take))
                    pending, row = pending + len(take), row + len(take)
                    if pending == self.batch_size:
                        yield (self._batch(pieces),
                               {"slot": slot, "local": local, "num_local": num_local, "position": [epoch, gi, row]})
                        pieces, pending = [], 0
                row = 0
            epoch, group = epoch + 1, 0
        if pieces:
            yield (self._batch(pieces), {"slot": slot, "local": local, "num_local": num_local, "position": [epoch, 0, 0]})


def take_batches(stream: LabelStream, n: int):
    """The first n batches of a stream (fewer if it ends), without their positions."""
    import itertools
    return (batch for batch, _ in itertools.islice(iter(torch.utils.data.DataLoader(stream, batch_size=None)), n))


def holdout_split(readers: list[ShardReader], holdout: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(train shards, eval shards) as (set, first shard, end shard) ranges: the
    last `holdout` shards of the sets, taken in order, are held out."""
    total = sum(len(r.shards) for r in readers)
    if holdout >= total and holdout > 0:
        raise FormatError(f"--eval-holdout {holdout} leaves no training shards (the labels have {total})")
    train, held, left = [], [], total - max(holdout, 0)   # shards still to give to training
    for d, r in enumerate(readers):
        n = len(r.shards)
        cut = min(n, max(left, 0))
        train += [(d, 0, cut)] if cut else []
        held += [(d, cut, n)] if cut < n else []
        left -= n
    return train, held
