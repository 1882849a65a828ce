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

import json
import shutil
from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen.format import FormatError
from labelgen.inputs import InputError, expand_paths, file_kind, jsonl_lines
from labelgen.shards import ShardWriter


def _entries(pos: dict, where: str) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(ids, logprobs) best first, and the vLLM ranks given."""
    ids, lps, ranks = [], [], {}
    for key, value in pos.items():
        try:
            tid = int(key)
            lp = float(value["logprob"] if isinstance(value, dict) else value)
            if isinstance(value, dict) and value.get("rank") is not None:
                ranks[tid] = int(value["rank"])
        except (TypeError, ValueError, KeyError):
            raise InputError(f"{where}: entry {key!r}: {value!r} is not a token id with a logprob") from None
        ids.append(tid)
        lps.append(lp)
    order = np.lexsort((np.asarray(ids), -np.asarray(lps)))
    return np.asarray(ids, np.int64)[order], np.asarray(lps, np.float32)[order], ranks


def row_from_prompt_logprobs(obj, k: int, where: str) -> dict:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with prompt_token_ids and prompt_logprobs")
    ids, plp = obj.get("prompt_token_ids"), obj.get("prompt_logprobs")
    if not isinstance(ids, list) or not isinstance(plp, list) or not all(isinstance(i, int) for i in ids):
        raise InputError(f"{where}: needs prompt_token_ids (a list of ints) and prompt_logprobs (a list)")
    if len(ids) < 2 or len(plp) != len(ids):
        raise InputError(f"{where}: {len(plp)} prompt_logprobs entries for {len(ids)} prompt_token_ids "
                         "(need one per token, at least 2 tokens)")
    P = len(ids) - 1
    top_ids, top_lp = np.zeros((P, k), np.int64), np.zeros((P, k), np.float32)
    target_lp, target_rank = np.zeros(P, np.float32), np.zeros(P, np.int64)
    for i in range(1, len(ids)):
        at = f"{where}: prompt_logprobs[{i}]"
        if not isinstance(plp[i], dict):
            raise InputError(f"{at}: expected a mapping of token id to logprob, got {type(plp[i]).__name__}")
        e_ids, e_lps, ranks = _entries(plp[i], at)
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
                           overwrite: bool = False, rows_per_shard: int = 1000) -> dict:
    """Write the label set; returns its manifest."""
    from transformers import AutoTokenizer
    if k < 1:
        raise ValueError(f"--k: must be >= 1, got {k}")
    files = expand_paths(inputs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer: cannot load {tokenizer_dir} ({fmt.one_line(e)})") from None
    header = {"teacher": {"source": "vLLM prompt_logprobs", "inputs": [str(p) for p in files]},
              "tokenizer": fmt.tokenizer_fingerprint(tokenizer), "counts": {}}
    vocab = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)
    out = Path(out)
    writer = ShardWriter(out, "topk", k, vocab, header=header, max_rows=rows_per_shard,
                         exist="overwrite" if overwrite else "error")
    try:
        for path in files:
            if file_kind(path) not in ("jsonl", "jsonl.zst"):
                raise InputError(f"{path}: vLLM prompt_logprobs are read from JSONL (or .jsonl.zst) files")
            for n, line in jsonl_lines(path):
                if isinstance(line, InputError):
                    raise line
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                try:
                    writer.write(row_from_prompt_logprobs(obj, k, f"{path}:{n}"))
                except FormatError as e:
                    raise FormatError(f"{path}:{n}: {e}") from None
        tokenizer.save_pretrained(out / fmt.TOKENIZER_DIR)   # before the manifest: a complete set carries it
        return writer.close()
    except BaseException:
        # Nothing here can be resumed: leave no shards behind (the directory was empty or replaced).
        writer.abort()
        shutil.rmtree(out, ignore_errors=True)
        raise
