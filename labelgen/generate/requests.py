"""What the teacher is asked per mode: windows packed into batches, prompts
into sampling requests, and the rows each answer becomes."""

from __future__ import annotations

import hashlib

import numpy as np

from labelgen import format as fmt
from labelgen.backends import SampleRequest, Teacher
from labelgen.generate.config import GenerateConfig


def derive_seed(seed: int, example_id: str, sample_index: int) -> int:
    """A 63-bit seed per completion: reruns reproduce it, and neighbouring
    examples get unrelated streams (a shared request seed makes a weak teacher
    write near-identical text for every prompt)."""
    h = hashlib.sha256(f"{seed}\0{example_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def topk_batches(items: list, cfg: GenerateConfig):
    """Windows sorted by length, packed so padded tokens stay under batch_tokens."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i][2]))
    batch: list = []
    for i in order:
        if batch and (len(batch) + 1) * len(items[batch[0]][2]) > cfg.batch_tokens:
            yield [items[j] for j in batch]
            batch = []
        batch.append(i)
    if batch:
        yield [items[j] for j in batch]


def truncate(logprobs: np.ndarray, coverage: np.ndarray, keep_mass: float,
             min_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive truncation of [positions, k] logprobs (rank order): each
    position keeps its entries, best first, until those kept hold `keep_mass`
    or the next falls below `min_prob` (the top-1 always stays). Returns the
    logprobs with dropped entries at -inf and the coverage of the kept ones."""
    p = np.exp(logprobs.astype(np.float64))
    before = np.cumsum(p, axis=1) - p                  # mass kept ahead of each entry
    keep = (before < keep_mass) & (p >= min_prob)
    keep[:, 0] = True
    keep = np.cumprod(keep, axis=1).astype(bool)       # a prefix: stop at the first entry that fails
    dropped = np.where(keep, 0.0, p).sum(1)
    return (np.where(keep, logprobs, -np.inf).astype(np.float32),
            np.clip(coverage - dropped, 0, 1).astype(np.float32))


# Each mode's step returns (rows, the length of every sequence the teacher ran).


def window_row(item: tuple) -> dict:
    """A window item (example_id, offset, ids, assistant mask or None) as the columns its row starts with."""
    ex, off, w, mask = item
    return {fmt.EXAMPLE_ID: ex, fmt.WINDOW_OFFSET: off, fmt.INPUT_IDS: w,
            **({} if mask is None else {fmt.ASSISTANT_MASK: mask})}


def score_batch(teacher: Teacher, batch: list, cfg: GenerateConfig) -> tuple[list[dict], list[int]]:
    labels = teacher.score([item[2] for item in batch], cfg.k)
    rows = [{**window_row(item), fmt.TOPK_IDS: t.ids, fmt.TOPK_LOGPROBS: t.logprobs, fmt.COVERAGE: t.coverage,
             fmt.TARGET_LOGPROB: t.target_logprob, fmt.TARGET_RANK: t.target_rank} for item, t in zip(batch, labels)]
    return rows, [len(item[2]) for item in batch]


def score_completions(teacher: Teacher, batch: list, cfg: GenerateConfig) -> tuple[list[dict], list[int]]:
    """Score items (example_id, sample_index, prompt + completion ids, prompt
    length, sampling logprobs): the teacher scores every position, the rows
    keep the completion tokens' only."""
    labels = teacher.score([ids for _, _, ids, _, _ in batch], cfg.k)
    rows = []
    for (ex, j, ids, plen, sampling), t in zip(batch, labels):
        c = slice(plen - 1, None)   # position plen - 1 predicts the first completion token
        rows.append({fmt.EXAMPLE_ID: ex, fmt.SAMPLE_INDEX: j, fmt.ROUND: cfg.round, fmt.INPUT_IDS: ids,
                     fmt.TOPK_IDS: t.ids[c], fmt.TOPK_LOGPROBS: t.logprobs[c], fmt.COVERAGE: t.coverage[c],
                     fmt.TARGET_LOGPROB: t.target_logprob[c], fmt.TARGET_RANK: t.target_rank[c],
                     fmt.SAMPLING_LOGPROB: sampling})
    return rows, [len(ids) for _, _, ids, _, _ in batch]


def draw_batch(teacher: Teacher, batch: list, cfg: GenerateConfig) -> tuple[list[dict], list[int]]:
    seeds = [derive_seed(cfg.seed, ex, off) for ex, off, _, _ in batch]
    labels = teacher.draw([item[2] for item in batch], cfg.draws, cfg.proposal_temperature, seeds)
    # The drawn ids' logprobs are stored for a tempered proposal's importance weights, or when asked for.
    keep_logprobs = cfg.proposal_temperature != 1.0 or cfg.draw_logprobs
    rows = [{**window_row(item), fmt.SAMPLED_IDS: s.ids, fmt.SAMPLED_COUNTS: s.counts, fmt.SAMPLED_LENGTHS: s.lengths,
             fmt.SAMPLED_LOGPROBS: s.logprobs if keep_logprobs else s.logprobs[:0], fmt.COVERAGE: s.coverage}
            for item, s in zip(batch, labels)]
    return rows, [len(item[2]) for item in batch]


def windows_only(batch: list) -> tuple[list[dict], list[int]]:
    return [window_row(item) for item in batch], [len(item[2]) for item in batch]


def sample_batches(items: list, cfg: GenerateConfig):
    """(item, sample_index) requests, sorted by prompt length, batched so that
    prompt + completion tokens stay under batch_tokens."""
    reqs = [(it, j) for it in items for j in range(cfg.samples_per_prompt)]
    reqs.sort(key=lambda r: -len(r[0][2]))
    batch: list = []
    for r in reqs:
        if batch and (len(batch) + 1) * (len(batch[0][0][2]) + cfg.max_new_tokens) > cfg.batch_tokens:
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


def sample_batch(teacher: Teacher, tokenizer, batch: list, cfg: GenerateConfig) -> tuple[list[dict], list[int]]:
    temperature = 0.0 if cfg.mode == "greedy" else cfg.temperature
    seeds = [derive_seed(cfg.seed, ex, j) for (ex, _, _), j in batch]
    comps = teacher.sample([SampleRequest(ids, s, temperature, cfg.top_p, cfg.max_new_tokens)
                            for ((_, _, ids), _), s in zip(batch, seeds)])
    rows = [{fmt.EXAMPLE_ID: ex, fmt.SAMPLE_INDEX: j, fmt.PROMPT: prompt, fmt.PROMPT_IDS: ids,
             fmt.COMPLETION: tokenizer.decode(c.ids, skip_special_tokens=True), fmt.COMPLETION_IDS: c.ids,
             fmt.COMPLETION_LOGPROBS: c.logprobs, fmt.FINISH_REASON: c.finish_reason, fmt.SEED: s}
            for ((ex, prompt, ids), j), c, s in zip(batch, comps, seeds)]
    return rows, [len(ids) + len(c.ids) for ((_, _, ids), _), c in zip(batch, comps)]
