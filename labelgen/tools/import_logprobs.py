"""`labelgen import FILE.jsonl --tokenizer DIR --k K --out LABELS`: teacher
logprobs already saved from vLLM's `prompt_logprobs` as a label set.

Each input line is one scored sequence:

    {"prompt_token_ids": [ids], "prompt_logprobs": [null, {"<id>": {"logprob": x, "rank": r}, ...}, ...],
     "id": "optional example id"}

the shape vLLM's `RequestOutput` takes when saved as JSON: entry i is the
teacher's distribution of token i given the tokens before it (entry 0 is
null), holding its top entries plus the actual token (with its 1-based
rank). A value may also be the bare logprob. Entry i becomes position i-1 of
a topk row: its k most probable entries, their coverage, and the actual
token's logprob and rank. Rows are validated and written like `labelgen
generate`'s (atomic shards, manifest last); nothing loads a whole file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen.errors import OptionError
from labelgen.format import FormatError
from labelgen.generate.inputs import InputError, expand_paths, file_kind, jsonl_lines, parse_json
from labelgen.run.rundir import RunDir, RunKind
from labelgen.shards import ShardWriter

# vLLM returns the top n (max_logprobs, 20 by default) plus the actual token;
# past the format's own bound on k a position is not a vLLM record.
MAX_ENTRIES = 65_537
MASS_SLACK = 1e-3      # float error in the teacher's logprobs; more mass than 1 + this is not a distribution

# What an import writes: a label set, replaced with --overwrite (an import does not resume).
LABELS = RunKind("label set", fmt.LABEL_SET_FILES, marker=(fmt.MANIFEST_NAME, fmt.RUN_FILE, fmt.SHARD_GLOB), harmless=(),
                 unit="shard", unit_pattern=fmt.SHARD_GLOB, record=fmt.RUN_FILE, resumable=False)


def _entries(pos: dict, where: str, vocab: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(ids, logprobs) best first, and the vLLM ranks given; refuses what
    `labelgen validate` would refuse of the labels they make."""
    if len(pos) > MAX_ENTRIES:
        raise InputError(f"{where}: {len(pos):,} entries, more than any vLLM record holds ({MAX_ENTRIES:,})")
    ids, lps, ranks = [], [], {}
    for key, value in pos.items():
        try:
            tid = int(key)
            raw = value["logprob"] if isinstance(value, dict) else value
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise TypeError
            lp = float(raw)
        except (TypeError, ValueError, KeyError, OverflowError):
            raise InputError(f"{where}: entry {key!r}: {str(value)[:80]!r} is not a token id with a logprob") from None
        if not 0 <= tid < vocab:
            raise InputError(f"{where}: entry {key!r}: token id outside the tokenizer's vocabulary [0, {vocab})")
        if math.isnan(lp) or lp > MASS_SLACK:
            raise InputError(f"{where}: entry {key!r}: logprob {lp} is not a log-probability (NaN or above 0)")
        if isinstance(value, dict) and value.get("rank") is not None:
            rank = value["rank"]
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= vocab:
                raise InputError(f"{where}: entry {key!r}: rank {str(rank)[:40]} is not in [1, {vocab}]")
            ranks[tid] = rank
        ids.append(tid)
        lps.append(min(lp, 0.0))
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{where}: token id {dup} appears twice "
                         f"({', '.join(repr(k) for k in pos if int(k) == dup)})")
    mass = float(np.exp(np.asarray(lps, np.float64)).sum())
    if mass > 1 + MASS_SLACK:
        raise InputError(f"{where}: the entries hold probability {mass:.4f}, more than 1: not one distribution")
    order = np.lexsort((np.asarray(ids), -np.asarray(lps)))
    return np.asarray(ids, np.int64)[order], np.asarray(lps, np.float32)[order], ranks


def row_from_prompt_logprobs(obj, k: int, where: str, vocab: int) -> dict:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with prompt_token_ids and prompt_logprobs")
    ids, plp = obj.get("prompt_token_ids"), obj.get("prompt_logprobs")
    if not isinstance(ids, list) or not isinstance(plp, list) or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"{where}: needs prompt_token_ids (a list of ints) and prompt_logprobs (a list)")
    if len(ids) < 2 or len(plp) != len(ids):
        raise InputError(f"{where}: {len(plp)} prompt_logprobs entries for {len(ids)} prompt_token_ids "
                         "(need one per token, at least 2 tokens)")
    bad = next((j for j, i in enumerate(ids) if not 0 <= i < vocab), None)
    if bad is not None:
        raise InputError(f"{where}: prompt_token_ids[{bad}] = {str(ids[bad])[:40]} is outside the tokenizer's "
                         f"vocabulary [0, {vocab})")
    P = len(ids) - 1
    top_ids, top_lp = np.zeros((P, k), np.int64), np.zeros((P, k), np.float32)
    target_lp, target_rank = np.zeros(P, np.float32), np.zeros(P, np.int64)
    for i in range(1, len(ids)):
        at = f"{where}: prompt_logprobs[{i}]"
        if not isinstance(plp[i], dict):
            raise InputError(f"{at}: expected a mapping of token id to logprob, got {type(plp[i]).__name__}")
        e_ids, e_lps, ranks = _entries(plp[i], at, vocab)
        actual = ids[i]
        hit = np.flatnonzero(e_ids == actual)
        if not hit.size:
            raise InputError(f"{at}: no entry for the actual token {actual} (vLLM always includes it)")
        # vLLM adds the actual token when it is outside its top-k; it then sorts last.
        if len(e_ids) < k:
            raise InputError(f"{at}: {len(e_ids)} entries, fewer than --k {k}")
        top_ids[i - 1], top_lp[i - 1] = e_ids[:k], e_lps[:k]
        target_lp[i - 1] = e_lps[hit[0]]
        target_rank[i - 1] = ranks[actual] - 1 if actual in ranks else int(hit[0])
    return {fmt.EXAMPLE_ID: str(obj.get("id") or where), fmt.WINDOW_OFFSET: 0, fmt.INPUT_IDS: np.asarray(ids),
            fmt.TOPK_IDS: top_ids, fmt.TOPK_LOGPROBS: top_lp,
            fmt.COVERAGE: np.minimum(np.exp(top_lp.astype(np.float64)).sum(1), 1.0).astype(np.float32),
            fmt.TARGET_LOGPROB: target_lp, fmt.TARGET_RANK: target_rank}


def import_prompt_logprobs(inputs: list[str], out: str | Path, tokenizer_dir: str, k: int,
                           overwrite: bool = False, rows_per_shard: int = 1000, log=None) -> dict:
    """Write the label set; returns its manifest. An import is not resumed:
    stopped (a signal, an error) it removes what it wrote, and a directory
    that an import left without its manifest (kill -9) is started over."""
    from transformers import AutoTokenizer
    if k < 1:
        raise OptionError(f"--k: must be >= 1, got {k}")
    files = expand_paths(inputs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise OptionError(f"--tokenizer: cannot load {tokenizer_dir} ({fmt.one_line(e)})") from None
    header = {"teacher": {"source": "vLLM prompt_logprobs", "inputs": [str(p) for p in files]},
              "tokenizer": fmt.tokenizer_fingerprint(tokenizer), "counts": {}}
    vocab = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)
    out = Path(out)
    with RunDir(out, LABELS) as rd:
        if not overwrite and _interrupted_import(rd):
            (log or (lambda m: None))(f"{out}: an import stopped before its manifest; starting it over")
            overwrite = True
        rd.claim(resume=False, overwrite=overwrite)   # refuses, or leaves the directory empty
        writer = ShardWriter(out, "topk", k, vocab, header=header, max_rows=rows_per_shard)
        try:
            rd.record({"command": "import", "k": k})
            for path in files:
                if file_kind(path) not in ("jsonl", "jsonl.zst"):
                    raise InputError(f"{path}: vLLM prompt_logprobs are read from JSONL (or .jsonl.zst) files")
                for n, line in jsonl_lines(path):
                    if isinstance(line, InputError):
                        raise line
                    where = f"{path}:{n}"
                    try:
                        writer.write(row_from_prompt_logprobs(parse_json(line, where, unique_keys=True), k, where, vocab))
                    except FormatError as e:
                        raise FormatError(f"{where}: {e}") from None
                    except MemoryError:
                        raise InputError(f"{where}: too large to hold in memory") from None
            if writer.rows == 0:
                raise InputError(f"{', '.join(map(str, files))}: no records (blank or empty); nothing to import")
            tokenizer.save_pretrained(out / fmt.TOKENIZER_DIR)   # before the manifest: a complete set carries it
            return writer.close()
        except BaseException:
            writer.abort()
            rd.clear()   # nothing of a stopped import is kept (the directory was empty or held a label set replaced)
            raise


def _interrupted_import(rd: RunDir) -> bool:
    """The output holds what an import wrote, without the manifest that completes it."""
    record = rd.read_record()
    return bool(record) and record.get("command") == "import" and not (rd.where / fmt.MANIFEST_NAME).exists()
