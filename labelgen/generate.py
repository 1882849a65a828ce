"""The generation job: a teacher over a corpus or prompt set -> label shards.

    labelgen generate --teacher DIR --input data/ --out labels/ --mode topk --k 64

Three stages run concurrently so the teacher never waits on input or disk:
a reader thread (read + tokenize + window), the teacher in the main thread,
and a writer thread (encode + compress + write) behind a bounded queue.

Input records are cut into shards of `rows_per_shard` records in input order,
so shard i is a pure function of (its input slice, the config). Worker w of N
takes the shards i with i % N == w; a rerun skips finished shards; a shard
only appears under its final name once complete; the manifest comes last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labelgen import format as fmt
from labelgen import fsutil, storage
from labelgen.backends import SampleRequest, Teacher, load_teacher
from labelgen.config import DEFAULT_MAX_SEQ_LEN, EXECUTION_ONLY, GenerateConfig
from labelgen.format import Encoding, FormatError
from labelgen.inputs import FieldSpec, InputError, ReadPosition, Record, expand_paths, read_records
from labelgen.shards import (ShardFile, ShardInfo, build_manifest, prepare_output_dir, shard_counts,
                             shard_info_from_file)

QUEUE_DEPTH = 4


def derive_seed(seed: int, example_id: str, sample_index: int) -> int:
    """A 63-bit seed per completion: reruns reproduce it, and neighbouring
    examples get unrelated streams (a shared request seed makes a weak teacher
    write near-identical text for every prompt)."""
    h = hashlib.sha256(f"{seed}\0{example_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def windows(ids: np.ndarray, size: int, stride: int) -> list[tuple[int, np.ndarray]]:
    """(offset, window) pairs covering `ids`; with stride = size - 1 every
    token after the first is predicted exactly once."""
    out, start = [], 0
    while True:
        out.append((start, ids[start:start + size]))
        if start + size >= len(ids):
            return out
        start += stride


@dataclass
class ShardWork:
    index: int
    items: list = field(default_factory=list)   # topk: (example_id, offset, ids); samples: (example_id, prompt, ids)
    examples: int = 0
    skipped: int = 0
    done: bool = False                          # already finished by an earlier run
    input_bytes: int = 0                        # how far the input had been read when the shard was cut


def load_tokenizer(path: str, need_model: bool = True):
    from transformers import AutoTokenizer
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        raise ValueError(f"--teacher: {path} is a GGUF file; convert it once with `labelgen convert-gguf {path} DIR` "
                         "and pass --teacher DIR")
    if need_model and not (p / "config.json").is_file():
        raise ValueError(f"--teacher: {path} is not a model directory (no config.json)")
    if not need_model and not any((p / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"--teacher: {path} holds neither a model nor a tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--teacher: cannot load the tokenizer from {path} ({e})") from None


def canonical_path(path: str) -> str:
    """One spelling per path: relative to the working directory when inside
    it, else absolute; no '.', '..' or trailing separators. Default example
    ids are built from input paths, so equal spellings keep them equal."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative == ".." or relative.startswith(".." + os.sep) else relative


def input_identity(files: list[Path]) -> dict[str, list[int]]:
    """[size, modification time] of every input file: a resume must read what the run began with."""
    return {str(p): [(st := p.stat()).st_size, st.st_mtime_ns] for p in files}


def _owned_tmp(cfg: GenerateConfig):
    """Which leftover tmp files this worker may remove: with several workers
    (started and stopped at different times), only those of its own shards."""
    if cfg.num_workers == 1:
        return None
    own = re.compile(r"^shard-(\d+)" + re.escape(fmt.SHARD_SUFFIX + fmt.TMP_SUFFIX) + "$")
    return lambda name: bool(m := own.match(name)) and int(m.group(1)) % cfg.num_workers == cfg.worker_index


def check_output_dir(cfg: GenerateConfig, files: list[Path]) -> None:
    """Refuse a non-empty output directory unless resuming the same run or
    overwriting; refuse to resume under a changed config or changed inputs."""
    out = Path(cfg.out)
    inputs = input_identity(files)
    run_file = out / fmt.RUN_FILE
    finished = sorted(out.glob("shard-*" + fmt.SHARD_SUFFIX)) if out.is_dir() else []
    # A run that failed before its first shard left only run.json: nothing to resume or lose.
    # Tmp files do not count either: another worker of the run may be writing run.json at this moment.
    started = out.is_dir() and any(p.name != fmt.RUN_FILE and not fsutil.is_lock_file(p)
                                   and not p.name.endswith(fmt.TMP_SUFFIX) for p in out.iterdir())
    if started and not cfg.overwrite:
        if not run_file.is_file():
            raise ValueError(f"--out: {out} is not empty and holds no labelgen run; choose another directory or pass --overwrite")
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--out: {run_file} is unreadable ({e}); choose another --out, or pass --overwrite "
                             f"to delete its {len(finished)} finished shard(s)") from None
        written = previous.get("format_version", "1.3 or older")
        if written != fmt.FORMAT_VERSION:
            raise ValueError(f"--out: {out} holds a run started by a labelgen writing format {written}, this one writes "
                             f"{fmt.FORMAT_VERSION}; finish it with that version, or pass --overwrite to delete its "
                             f"{len(finished)} finished shard(s) and start over")
        if previous.get("config_hash") != cfg.output_hash():
            prev_cfg = previous.get("config", {})
            changed = sorted(k for k, v in cfg.to_dict().items() if k not in EXECUTION_ONLY and prev_cfg.get(k) != v)
            raise ValueError(f"--out: {out} holds a run with a different config (changed: {', '.join(changed) or 'unknown'}); "
                             f"choose another --out, or pass --overwrite to delete its {len(finished)} finished shard(s) and start over")
        changed_inputs = [f for f, ident in previous.get("inputs", {}).items() if inputs.get(f) != ident]
        if changed_inputs:
            raise ValueError(f"--input: {changed_inputs[0]} changed (size or modification time) since this run started"
                             f"{f' ({len(changed_inputs) - 1} more)' if len(changed_inputs) > 1 else ''}; restore it, "
                             f"or pass --overwrite to delete the run's {len(finished)} finished shard(s) and start over")
        if not cfg.resume and cfg.num_workers == 1:
            raise ValueError(f"--out: {out} already holds this run; pass --resume to continue it "
                             f"(--overwrite would delete its {len(finished)} finished shard(s))")
    prepare_output_dir(out, "overwrite" if cfg.overwrite else "resume", owns=_owned_tmp(cfg))
    fsutil.atomic_write_bytes(run_file, json.dumps({"config_hash": cfg.output_hash(), "format_version": fmt.FORMAT_VERSION,
                                                 "config": cfg.to_dict(),
                                                 "inputs": inputs}, indent=2).encode())


def run(cfg: GenerateConfig, teacher: Teacher | None = None) -> dict:
    """Run the job; returns the manifest (or the worker's partial manifest).
    `teacher` reuses an already loaded backend (it must be cfg.teacher)."""
    # A resumed run is the same run however its paths were spelled (dir/ or dir, relative or absolute).
    cfg = dataclasses.replace(cfg, inputs=tuple(map(canonical_path, cfg.inputs)), out=canonical_path(cfg.out),
                              teacher=canonical_path(cfg.teacher))
    files = expand_paths(list(cfg.inputs))   # fails on a missing input before anything is loaded
    tokenizer = load_tokenizer(cfg.teacher, need_model=cfg.mode != "tokens")
    cfg = resolve(cfg, tokenizer)
    with fsutil.run_lock(Path(cfg.out), (cfg.worker_index, cfg.num_workers)):
        check_output_dir(cfg, files)
        if teacher is None and cfg.mode == "tokens":
            teacher = _TokenizerOnly(cfg.teacher, tokenizer)
        if teacher is None:
            teacher = load_teacher(cfg, tokenizer)
            try:
                return _generate(cfg, teacher, tokenizer, files)
            finally:
                teacher.close()
        return _generate(cfg, teacher, tokenizer, files)


def _generate(cfg: GenerateConfig, teacher: Teacher, tokenizer, files: list[Path]) -> dict:
    enc = Encoding(**cfg.encoding)
    id_bound = max(teacher.logits_size, teacher.vocab_size)
    out = Path(cfg.out)
    t0 = time.time()
    progress = _Progress(cfg, sum(size for size, _ in input_identity(files).values()))

    work_q: queue.Queue = queue.Queue(maxsize=2)
    write_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    reader = _Thread(_read_shards, cfg, files, tokenizer, teacher.max_positions, work_q)
    writer = _Thread(_write_shards, cfg, out, id_bound, enc, write_q)
    shards: dict[int, ShardInfo] = {}
    counts = {"examples": 0, "skipped": 0}
    total_shards = 0
    try:
        while True:
            work = _get(work_q, reader)
            if work is None:
                break
            if isinstance(work, int):          # the reader's last word: how many shards exist
                total_shards = work
                continue
            counts["examples"] += work.examples
            if work.done:   # finished by an earlier run: its skip count is in its footer
                path = out / fmt.shard_name(work.index)
                shards[work.index] = shard_info_from_file(path, cfg.kind)
                counts["skipped"] += shard_counts(path).get("skipped", 0)
                progress.update(work.examples, 0, work.input_bytes)
                continue
            counts["skipped"] += work.skipped
            _put(write_q, ("open", work.index, None), writer)
            batches = _topk_batches(work.items, cfg) if cfg.windowed else _sample_batches(work.items, cfg)
            for batch in batches:
                if cfg.mode == "tokens":
                    rows, tokens = _windows_only(batch)
                elif cfg.mode == "topk":
                    rows, tokens = _score(teacher, batch, cfg)
                elif cfg.mode == "sampled":
                    rows, tokens = _draw(teacher, batch, cfg)
                else:
                    rows, tokens = _sample(teacher, tokenizer, batch, cfg)
                _put(write_q, ("rows", work.index, rows), writer)
                progress.update(0, tokens)
            _put(write_q, ("close", work.index, {"examples": work.examples, "skipped": work.skipped}), writer)
            progress.update(work.examples, 0, work.input_bytes)
        _put(write_q, None, writer)
        writer.join_checked()
    except BaseException:
        writer.stop()
        reader.stop()
        raise
    finally:
        progress.close()
    shards.update(writer.result)
    if cfg.num_workers == 1 and not any(s.rows for s in shards.values()):
        raise InputError(f"{', '.join(cfg.inputs)}: all {counts['skipped']} input record(s) were bad and skipped "
                         "(--skip-bad); nothing to label, no label set written")
    manifest = _write_manifest(cfg, out, teacher, tokenizer, enc, id_bound, shards, counts, total_shards)
    elapsed = time.time() - t0
    manifest["summary"] = {"seconds": round(elapsed, 2), "teacher_tokens": progress.tokens,
                           "tokens_per_second": progress.tokens / elapsed if elapsed else 0.0}
    return manifest


def _model_config(path: str):
    """The model's HF config, or None for a tokenizer-only directory."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, trust_remote_code=False) if (Path(path) / "config.json").is_file() else None


def resolve(cfg: GenerateConfig, tokenizer) -> GenerateConfig:
    """Fill settings that depend on the teacher and check them against it."""
    mcfg = _model_config(cfg.teacher)
    positions = int(getattr(mcfg, "max_position_embeddings", 0) or 1 << 30)
    vocab = getattr(mcfg, "vocab_size", None) or len(tokenizer)
    if cfg.max_seq_len is None:
        cfg = dataclasses.replace(cfg, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, positions))
    if cfg.windowed and cfg.max_seq_len > positions:
        raise ValueError(f"--max-seq-len {cfg.max_seq_len} exceeds the teacher's {positions} positions")
    if cfg.mode == "topk" and cfg.k > vocab:
        raise ValueError(f"--k {cfg.k} is larger than the teacher's vocabulary ({vocab})")
    if cfg.truncates and not cfg.encoding.get("variable_k"):
        cfg = dataclasses.replace(cfg, encoding={**cfg.encoding, "variable_k": True})
    return cfg


def _write_manifest(cfg, out, teacher: Teacher, tokenizer, enc, id_bound, shards, counts, total_shards) -> dict:
    config_file = Path(cfg.teacher) / "config.json"
    header = {
        "mode": cfg.mode,
        "teacher": {"path": str(Path(cfg.teacher).resolve()),
                    "config_sha256": storage.sha256_file(config_file) if config_file.is_file() else None,
                    "vocab_size": teacher.vocab_size, "logits_size": teacher.logits_size, **teacher.info()},
        "tokenizer": fmt.tokenizer_fingerprint(tokenizer),
        "config": cfg.to_dict(),
        "config_hash": cfg.output_hash(),
        "counts": counts,
    }
    if cfg.kind == "samples":
        header["sampling"] = {"n": cfg.samples_per_prompt, "temperature": 0.0 if cfg.mode == "greedy" else cfg.temperature,
                              "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                              "seed_rule": "sha256(seed, example_id, sample_index)[:8] & (2**63-1)"}
    if cfg.worker_index == 0:   # the labels carry their tokenizer, so a student can be built from them anywhere
        fsutil.refuse_symlink(out / fmt.TOKENIZER_DIR)
        tokenizer.save_pretrained(out / fmt.TOKENIZER_DIR)
    ordered = [shards[i] for i in sorted(shards)]
    if cfg.mode == "sampled":
        header["sampling"] = {"draws": cfg.draws, "proposal_temperature": cfg.proposal_temperature, "seed": cfg.seed,
                              "seed_rule": "sha256(seed, example_id, window_offset)[:8] & (2**63-1), one stream per window"}
    manifest = build_manifest(cfg.kind, cfg.entries, id_bound, enc, ordered, header)
    if cfg.num_workers == 1:
        return fmt.write_manifest(out, manifest)
    manifest["worker"] = {"index": cfg.worker_index, "num_workers": cfg.num_workers, "total_shards": total_shards}
    return fmt.write_manifest(out, manifest, fmt.partial_manifest_name(cfg.worker_index, cfg.num_workers))


# ---------------------------------------------------------------- reader


def _read_shards(cfg: GenerateConfig, files: list[Path], tokenizer, max_positions: int, work_q: queue.Queue,
                 stop: threading.Event):
    spec = FieldSpec(cfg.text_field, cfg.prompt_field, cfg.messages_field, cfg.id_field)
    out = Path(cfg.out)
    work, records, index = None, [], -1
    position, read_before = ReadPosition(), 0   # input bytes read before the current record
    for n, rec in enumerate(read_records(files, spec, position)):
        if stop.is_set():
            return
        if n % cfg.rows_per_shard == 0:
            if work is not None:
                work.input_bytes = read_before
                if not _offer(work_q, _prepare(work, records, tokenizer, cfg, max_positions), stop):
                    return
            index, records = n // cfg.rows_per_shard, []
            mine = index % cfg.num_workers == cfg.worker_index
            work = ShardWork(index, done=_finished(out / fmt.shard_name(index), cfg)) if mine else None
        if work is not None:
            work.examples += 1
            if not work.done:
                records.append(rec)
        read_before = position.bytes
    if index < 0:
        raise InputError(f"{', '.join(cfg.inputs)}: no input records (--input); nothing to label")
    if work is not None:
        work.input_bytes = position.bytes
        if not _offer(work_q, _prepare(work, records, tokenizer, cfg, max_positions), stop):
            return
    for last in (index + 1, None):   # how many shards exist, then the end
        if not _offer(work_q, last, stop):
            return


def _prepare(work: ShardWork, records: list, tokenizer, cfg: GenerateConfig, max_positions: int) -> ShardWork:
    """Tokenize a shard's records in one batch call (the fast tokenizer then
    uses all cores) and cut them into teacher items; bad records fail the run
    or, with --skip-bad, are counted."""
    good = [r for r in records if not isinstance(r, InputError)]
    ids_of = dict(zip(map(id, good), _tokenize_batch(good, tokenizer, generation_prompt=not cfg.windowed)))
    for rec in records:
        try:
            if isinstance(rec, InputError):
                raise rec
            work.items.extend(_items(rec, ids_of[id(rec)], cfg, max_positions))
        except InputError as e:
            if not cfg.skip_bad:
                raise InputError(f"{e} (pass --skip-bad to skip bad records)") from None
            work.skipped += 1
    return work


def _finished(path: Path, cfg: GenerateConfig) -> bool:
    """A shard is finished when it exists under its final name and was made
    by this config (a stale shard from another config is redone)."""
    if not path.is_file():
        return False
    import pyarrow.parquet as pq
    try:
        meta = fmt.read_file_metadata(pq.read_schema(path).metadata, str(path))
    except Exception:
        return False
    return meta.get("config_hash") == cfg.output_hash()


def _tokenize_batch(records: list[Record], tokenizer, generation_prompt: bool) -> list[tuple[str, list[int]]]:
    """(text the teacher sees, its ids) per record; chat messages are rendered
    with the tokenizer's template (which brings its own special tokens), with
    the assistant's generation prompt appended when the teacher is to answer
    (sampling modes) and as they stand when the conversation is scored."""
    texts, plain = [], []
    for rec in records:
        if rec.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise InputError(f"{rec.where}: --messages-field needs a chat template and the teacher's tokenizer has none")
            texts.append(tokenizer.apply_chat_template(rec.messages, tokenize=False, add_generation_prompt=generation_prompt))
        else:
            texts.append(rec.text if rec.text is not None else rec.prompt)
        plain.append(rec.messages is None)
    if not texts:
        return []
    with_specials = tokenizer(texts)["input_ids"] if any(plain) else [None] * len(texts)
    without = tokenizer(texts, add_special_tokens=False)["input_ids"] if not all(plain) else [None] * len(texts)
    return [(t, a if p else b) for t, p, a, b in zip(texts, plain, with_specials, without)]


def _items(rec: Record, text_ids: tuple[str, list[int]], cfg: GenerateConfig, max_positions: int) -> list[tuple]:
    text, ids = text_ids
    if cfg.windowed:
        if len(ids) < 2:
            raise InputError(f"{rec.where}: text has {len(ids)} token(s); at least 2 are needed to predict one")
        arr = np.asarray(ids, dtype=np.int64)
        return [(rec.example_id, off, w) for off, w in windows(arr, cfg.max_seq_len, cfg.window_stride)]
    if len(ids) + cfg.max_new_tokens > max_positions:
        raise InputError(f"{rec.where}: prompt has {len(ids)} tokens; with --max-new-tokens {cfg.max_new_tokens} "
                         f"that exceeds the teacher's {max_positions} positions")
    return [(rec.example_id, text, list(ids))]


# ---------------------------------------------------------------- teacher


def _topk_batches(items: list, cfg: GenerateConfig):
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


def _score(teacher: Teacher, batch: list, cfg: GenerateConfig) -> tuple[list[dict], int]:
    labels = teacher.score([w for _, _, w in batch], cfg.k)
    rows = [{fmt.EXAMPLE_ID: ex, fmt.WINDOW_OFFSET: off, fmt.INPUT_IDS: w, fmt.TOPK_IDS: t.ids,
             fmt.TOPK_LOGPROBS: t.logprobs, fmt.COVERAGE: t.coverage, fmt.TARGET_LOGPROB: t.target_logprob,
             fmt.TARGET_RANK: t.target_rank} for (ex, off, w), t in zip(batch, labels)]
    return rows, sum(len(w) for _, _, w in batch)


def _draw(teacher: Teacher, batch: list, cfg: GenerateConfig) -> tuple[list[dict], int]:
    seeds = [derive_seed(cfg.seed, ex, off) for ex, off, _ in batch]
    labels = teacher.draw([w for _, _, w in batch], cfg.draws, cfg.proposal_temperature, seeds)
    rows = [{fmt.EXAMPLE_ID: ex, fmt.WINDOW_OFFSET: off, fmt.INPUT_IDS: w, fmt.SAMPLED_IDS: s.ids,
             fmt.SAMPLED_COUNTS: s.counts, fmt.SAMPLED_LENGTHS: s.lengths, fmt.SAMPLED_LOGPROBS: s.logprobs}
            for (ex, off, w), s in zip(batch, labels)]
    return rows, sum(len(w) for _, _, w in batch)


def _windows_only(batch: list) -> tuple[list[dict], int]:
    rows = [{fmt.EXAMPLE_ID: ex, fmt.WINDOW_OFFSET: off, fmt.INPUT_IDS: w} for ex, off, w in batch]
    return rows, sum(len(w) for _, _, w in batch)


class _TokenizerOnly:
    """The teacher of `--mode tokens`: a tokenizer and a context length, no model."""

    def __init__(self, path: str, tokenizer):
        mcfg = _model_config(path)
        self.vocab_size = len(tokenizer)
        self.logits_size = int(getattr(mcfg, "vocab_size", 0) or self.vocab_size)
        self.max_positions = int(getattr(mcfg, "max_position_embeddings", 0) or 1 << 30)

    def info(self) -> dict:
        return {"backend": "none (tokens only)"}

    def close(self) -> None:
        pass


def _sample_batches(items: list, cfg: GenerateConfig):
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


def _sample(teacher: Teacher, tokenizer, batch: list, cfg: GenerateConfig) -> tuple[list[dict], int]:
    temperature = 0.0 if cfg.mode == "greedy" else cfg.temperature
    seeds = [derive_seed(cfg.seed, ex, j) for (ex, _, _), j in batch]
    comps = teacher.sample([SampleRequest(ids, s, temperature, cfg.top_p, cfg.max_new_tokens)
                            for ((_, _, ids), _), s in zip(batch, seeds)])
    rows = [{fmt.EXAMPLE_ID: ex, fmt.SAMPLE_INDEX: j, fmt.PROMPT: prompt, fmt.PROMPT_IDS: ids,
             fmt.COMPLETION: tokenizer.decode(c.ids, skip_special_tokens=True), fmt.COMPLETION_IDS: c.ids,
             fmt.COMPLETION_LOGPROBS: c.logprobs, fmt.FINISH_REASON: c.finish_reason, fmt.SEED: s}
            for ((ex, prompt, ids), j), c, s in zip(batch, comps, seeds)]
    return rows, sum(len(ids) + len(c.ids) for ((_, _, ids), _), c in zip(batch, comps))


# ---------------------------------------------------------------- writer


def _write_shards(cfg: GenerateConfig, out: Path, id_bound: int, enc: Encoding, write_q: queue.Queue,
                  stop: threading.Event) -> dict[int, ShardInfo]:
    done: dict[int, ShardInfo] = {}
    current: ShardFile | None = None
    k = cfg.entries
    # Encoding (sorting, quantising) runs on a few threads: one thread cannot
    # keep up with a GPU teacher.
    threads = min(4, os.cpu_count() or 1)
    encoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="labelgen-encode")
    try:
        while (msg := _take(write_q, stop)) is not None:
            op, index, payload = msg   # payload: rows, or the shard's counts on close
            if op == "open":
                current = ShardFile(out / fmt.shard_name(index), cfg.kind, k, id_bound, enc,
                                    extra_meta={"config_hash": cfg.output_hash(), "shard_index": index}, encoder=encoder,
                                    in_flight=2 * threads)
            elif op == "rows":
                for row in payload:
                    if cfg.truncates:   # here, not in the teacher loop: it waits on nothing
                        row[fmt.TOPK_LOGPROBS], row[fmt.COVERAGE] = truncate(
                            row[fmt.TOPK_LOGPROBS], row[fmt.COVERAGE], cfg.keep_mass, cfg.min_prob)
                    current.write(row)
            else:
                done[index] = current.close(counts=payload)
                current = None
    finally:
        if current is not None:
            current.abort()
        encoder.shutdown(wait=True, cancel_futures=True)
    return done


# ---------------------------------------------------------------- plumbing


class _Thread(threading.Thread):
    """A worker thread whose exception re-raises in the main thread."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.fn, self.args, self.error, self.result = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args, self.stop_event)
        except BaseException as e:  # re-raised by the main thread
            self.error = e

    def join_checked(self):
        self.join()
        if self.error:
            raise self.error

    def stop(self):
        """Ask the thread to end and wait for it: it checks the event at
        every queue operation (`_offer`/`_take`), so it never waits on a queue
        that nobody serves any more (a reader blocked on a full queue once
        deadlocked Ctrl-C and a full disk)."""
        self.stop_event.set()
        self.join()


def _offer(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` on `q` unless `stop` is set first; True if it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _take(q: queue.Queue, stop: threading.Event):
    """The next item of `q`, or None once `stop` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def _get(q: queue.Queue, producer: _Thread):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if producer.error:
                raise producer.error
            if not producer.is_alive() and q.empty():
                raise RuntimeError("input reader stopped unexpectedly")


def _put(q: queue.Queue, item, consumer: _Thread):
    while True:
        if consumer.error:
            raise consumer.error
        try:
            return q.put(item, timeout=0.1)
        except queue.Full:
            continue


class _Progress:
    """Input read (the bar and its ETA: bytes, known without a counting
    pass), examples done and teacher tokens/s."""

    def __init__(self, cfg: GenerateConfig, input_bytes: int):
        self.tokens = self.examples = self.done = 0
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=input_bytes, unit="B", unit_scale=True, desc=f"labelgen {cfg.mode}", dynamic_ncols=True)
            self.t0 = time.time()

    def update(self, examples: int, tokens: int, input_bytes: int | None = None):
        self.tokens += tokens
        self.examples += examples
        if self.bar is not None:
            if input_bytes is not None and input_bytes > self.done:
                self.bar.update(input_bytes - self.done)
                self.done = input_bytes
            self.bar.set_postfix_str(f"{self.examples:,} ex, {self.tokens / max(time.time() - self.t0, 1e-9):,.0f} tok/s",
                                     refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- finalize


def finalize(label_dir: Path | str) -> dict:
    """Merge the workers' partial manifests into manifest.json; fail if any
    worker or any shard is missing."""
    out = Path(label_dir)
    if not out.is_dir():
        raise FormatError(f"{out}: no such label directory")
    with fsutil.run_lock(out):   # refused while any worker of the run still holds it
        return _finalize(out)


def unfinished_workers(label_dir: Path | str) -> tuple[list[int], int]:
    """(indices of the workers of the run in `label_dir` that have not written
    their partial manifest, how many workers the run has); reads only."""
    out = Path(label_dir)
    try:
        run = json.loads((out / fmt.RUN_FILE).read_text())
        n, config_hash = int(run["config"]["num_workers"]), run["config_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FormatError(f"{out}: no generation run here ({fmt.RUN_FILE} missing or unreadable)") from None
    done = set()
    for i in range(n):
        try:
            part = json.loads((out / fmt.partial_manifest_name(i, n)).read_text())
        except (OSError, ValueError):
            continue
        if part.get("config_hash") == config_hash:
            done.add(i)
    return sorted(set(range(n)) - done), n


def slurm_array(indices: list[int]) -> str:
    """0,3,5-7: the --array= expression of these task indices."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _finalize(out: Path) -> dict:
    partials = sorted(out.glob("manifest.worker-*-of-*.json"))
    if not partials:
        raise FormatError(f"{out}: no partial manifests (manifest.worker-*.json); did the workers finish?")
    parts = [json.loads(p.read_text()) for p in partials]
    n = parts[0]["worker"]["num_workers"]
    if any(p["worker"]["num_workers"] != n or p["config_hash"] != parts[0]["config_hash"] for p in parts):
        raise FormatError(f"{out}: partial manifests come from different runs (worker counts or configs differ)")
    seen = {p["worker"]["index"] for p in parts}
    missing_workers = sorted(set(range(n)) - seen)
    if missing_workers:
        raise FormatError(f"{out}: no manifest from worker(s) {', '.join(map(str, missing_workers))} of {n}; rerun them with --resume")
    total = max(p["worker"]["total_shards"] for p in parts)
    shards = {s["name"]: s for p in parts for s in p["shards"]}
    missing = [fmt.shard_name(i) for i in range(total) if fmt.shard_name(i) not in shards]
    if missing:
        raise FormatError(f"{out}: shard(s) missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    merged = {k: v for k, v in parts[0].items() if k not in ("worker", "fingerprint")}
    merged["shards"] = [shards[fmt.shard_name(i)] for i in range(total)]
    merged["counts"] = {k: sum(p["counts"].get(k, 0) for p in parts) for k in parts[0]["counts"]}
    merged["counts"]["rows"] = sum(s["rows"] for s in merged["shards"])
    if not merged["counts"]["rows"]:
        raise FormatError(f"{out}: the workers labelled no rows ({merged['counts'].get('skipped', 0)} input records "
                          "skipped as bad); nothing to finalize")
    merged["counts"]["positions"] = sum(s["positions"] for s in merged["shards"])
    merged["config"] = {**merged["config"], "num_workers": n, "worker_index": None}
    return fmt.write_manifest(out, merged)
