"""`labelgen export LABELS --to axolotl OUT.jsonl`: top-k labels of chat
conversations in the form Axolotl's KD plugin reads.

Axolotl's `axolotl.integrations.kd.chat_template` strategy takes rows of
chat `messages` plus a `logprobs` field: one list per token of the
conversation after the first, each a list of {"token": "token_id:N",
"logprob": x} for the teacher's top entries predicting that token (vLLM's
`prompt_logprobs` without its leading None). It tokenizes the messages with
the chat template itself and aligns the lists to the last tokens. So the
export needs the conversations: it re-reads the inputs the labels were made
from (recorded in the manifest, or --input), checks that the template
renders each to exactly the labelled ids, and streams one shard at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen.format import FormatError
from labelgen.generate.inputs import FieldSpec, InputError, expand_paths, read_records
from labelgen.shards import ShardReader
from labelgen.store import fsutil, storage


def stitch(windows: list[dict]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """An example's windows (any stride) as one sequence: its ids and, for
    each token after the first, the (ids, logprobs) of the entries predicting
    it, best first, dropped slots left out."""
    windows = sorted(windows, key=lambda w: int(w[fmt.WINDOW_OFFSET]))
    ids: list[int] = []
    entries: list[tuple[np.ndarray, np.ndarray]] = []
    for w in windows:
        start, inp = int(w[fmt.WINDOW_OFFSET]), w[fmt.INPUT_IDS]
        if start > len(ids) or (start < len(ids) and not np.array_equal(ids[start:start + len(inp)], inp[:len(ids) - start])):
            raise FormatError(f"example {w[fmt.EXAMPLE_ID]!r}: windows do not join up at offset {start}")
        for t in range(len(ids) - start, len(inp)):       # tokens this window adds
            if t == 0:
                ids.append(int(inp[0]))                    # the very first token: nothing predicts it
                continue
            kept = np.isfinite(w[fmt.TOPK_LOGPROBS][t - 1])
            ids.append(int(inp[t]))
            entries.append((w[fmt.TOPK_IDS][t - 1][kept], w[fmt.TOPK_LOGPROBS][t - 1][kept]))
    return np.asarray(ids), entries


def axolotl_row(messages: list, field: str, entries) -> dict:
    return {field: messages,
            "logprobs": [[{"token": f"token_id:{int(i)}", "logprob": float(lp)} for i, lp in zip(ids, lps)]
                         for ids, lps in entries]}


def export_axolotl(label_dir: str | Path, out: str | Path, inputs: list[str] | None = None) -> dict:
    """Write OUT (JSONL, atomically); returns {"rows", "tokens"}."""
    from transformers import AutoTokenizer
    reader = ShardReader(label_dir)
    reader.check_files()
    m, where = reader.manifest, str(reader.dir)
    cfg = m.get("config") or {}
    if reader.kind != "topk" or not cfg.get("messages_field"):
        raise FormatError(f"{where}: Axolotl's KD plugin reads top-k labels of chat messages; this label set holds "
                          f"{reader.kind} labels{'' if cfg.get('messages_field') else ' not made with --messages-field'}")
    tokenizer = AutoTokenizer.from_pretrained(storage.local_dir(reader.dir / fmt.TOKENIZER_DIR), trust_remote_code=False)
    files = expand_paths(list(inputs or cfg.get("inputs") or []))
    names = _labelled_names(reader.dir, files)
    spec = FieldSpec(messages_field=cfg["messages_field"], id_field=cfg.get("id_field"))
    records = enumerate(read_records(files, spec, names=names))
    per_shard = int(cfg["rows_per_shard"])
    stats = {"rows": 0, "tokens": 0}
    with fsutil.atomic_writer(Path(out), text=True) as f:
        # Shards in input order: each footer names its slice of the input (read once).
        for index, si, shard in sorted((_shard_index(reader, sh), si, sh) for si, sh in enumerate(reader.shards)):
            rows: dict[str, list[dict]] = {}
            pf = reader.open_shard(shard)
            for rg in range(pf.num_row_groups):
                for row in fmt.rows_from_decoded(reader.read_row_group(si, rg, None, pf)):
                    rows.setdefault(row[fmt.EXAMPLE_ID], []).append(row)
            for n, rec in records:   # the shard's slice of the input, in input order
                if not isinstance(rec, InputError) and rec.example_id in rows:
                    ids, entries = stitch(rows.pop(rec.example_id))
                    text = tokenizer.apply_chat_template(rec.messages, tokenize=False, add_generation_prompt=False)
                    if not np.array_equal(tokenizer(text, add_special_tokens=False)["input_ids"], ids):
                        raise FormatError(f"{rec.where}: the chat template no longer renders this conversation to "
                                          "the labelled tokens (inputs or template changed since generation?)")
                    f.write(json.dumps(axolotl_row(rec.messages, cfg["messages_field"], entries)) + "\n")
                    stats["rows"] += 1
                    stats["tokens"] += len(ids)
                if n + 1 >= (index + 1) * per_shard:
                    break
            if rows:
                shown = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
                raise FormatError(f"{where}/{shard['name']}: example {next(iter(rows))!r} is not in the inputs "
                                  f"({shown}); pass the inputs the labels were made from (--input)")
    return stats


def _labelled_names(label_dir: Path, files: list[Path]) -> list[str] | None:
    """The input files as the labelling run spelled them (its run.json), when
    `files` are the same files, maybe moved or spelled otherwise (matched in
    order, by size): default example ids embed those spellings."""
    try:
        labelled = json.loads(storage.read_text(label_dir / fmt.RUN_FILE)).get("inputs") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if len(labelled) != len(files) or not all(isinstance(v, list) and v and v[0] == f.stat().st_size
                                               for v, f in zip(labelled.values(), files)):
        return None
    return list(labelled)


def _shard_index(reader: ShardReader, shard: dict) -> int:
    info = fmt.read_file_metadata(reader.open_shard(shard).schema_arrow.metadata, str(reader.shard_path(shard)))
    return int(info.get("shard_index", 0))
