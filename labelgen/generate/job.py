"""The generation job: a teacher over a corpus or prompt set -> label shards.

    labelgen generate --teacher DIR --input data/ --out labels/ --mode topk --k 64

Three stages run concurrently so the teacher never waits on input or disk:
a reader thread (reader.py: read + tokenize + window), the teacher in the
main thread (batches.py: what it is asked per mode), and a writer thread
(encode + compress + write) behind a bounded queue (pipeline.py). resume.py
says which run a directory holds and which shards are finished; finalize.py
merges the workers' partial manifests; rundir.py owns the output (lock, policy,
commit order, bucket staging).

Input records are cut into shards of `rows_per_shard` records in input order,
so shard i is a pure function of (its input slice, the config). Worker w of N
takes the shards i with i % N == w; a rerun skips finished shards; a shard
only appears under its final name once complete; the manifest comes last.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from labelgen import format as fmt
from labelgen.backends import Teacher, check_backend, load_teacher, model_config, not_a_model
from labelgen.errors import OptionError
from labelgen.format import Encoding
from labelgen.generate.config import DEFAULT_MAX_SEQ_LEN, GenerateConfig
from labelgen.generate.inputs import InputError, expand_paths
from labelgen.generate.mfu import meter_for
from labelgen.generate.pipeline import Progress, StageThread, get_from, put_to, take
from labelgen.generate.requests import (draw_batch, sample_batch, sample_batches, score_batch, score_completions,
                                        topk_batches, truncate, windows_only)
from labelgen.generate.resume import compare, complete_manifest, identity, input_identity, inputs_digest, owned_tmp
from labelgen.generate.sinks import GENERATE, sink_for
from labelgen.generate.work import read_shards, samples_input
from labelgen.run.rundir import RunDir, canonical_path, writable_location
from labelgen.store.storage import StorePath
from labelgen.shards import ShardFile, ShardInfo, build_manifest
from labelgen.store import fsutil, storage

QUEUE_DEPTH = 4


def load_tokenizer(path: str, need_model: bool = True):
    from transformers import AutoTokenizer
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        raise OptionError(f"--teacher: {path} is a GGUF file; convert it once with `labelgen convert-gguf {path} DIR` "
                         "and pass --teacher DIR")
    if need_model and not (p / "config.json").is_file():
        raise not_a_model("--teacher", path)
    if not need_model and not any((p / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        raise OptionError(f"--teacher: {path} holds neither a model nor a tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise OptionError(f"--teacher: cannot load the tokenizer from {path} ({e})") from None


def run(cfg: GenerateConfig, teacher: Teacher | None = None) -> dict:
    """Run the job; returns the manifest (or the worker's partial manifest).
    `teacher` reuses an already loaded backend (it must be cfg.teacher).
    --out may be a bucket URI (the run directory stages it: rundir.py).
    With --tp, rank 0 runs the job and the other ranks only their share of
    the teacher (backends/tensor_parallel.py); they return {"tp_follower": rank}."""
    if cfg.tp > 1 and teacher is None:
        from labelgen.backends.tensor_parallel import Group
        with Group(cfg.tp, cfg.device) as group:
            return _run(cfg, None, group) if group.leader else _follow(cfg, group)
    return _run(cfg, teacher, None)


def _follow(cfg: GenerateConfig, group) -> dict:
    from labelgen.backends.hf import HFTeacher
    from labelgen.backends.tensor_parallel import LOAD
    if group.receive()[0] == LOAD:   # the leader found work to do (else: STOP)
        HFTeacher(cfg.teacher, load_tokenizer(cfg.teacher), cfg.dtype, cfg.device, group=group).serve()
    return {"tp_follower": group.rank}


def preflight(cfg: GenerateConfig) -> tuple[GenerateConfig, list[Path], object, dict | None]:
    """Everything a run checks before it takes its output, without a teacher's
    weights or a GPU: the output's location, the inputs, the teacher's
    tokenizer and config, the settings resolved against them (`--dry-run`
    runs this; a queued GPU job then refuses nothing this passes). Returns
    (the resolved config, the input files, the tokenizer, score mode's source)."""
    where = writable_location(cfg.out)
    # A resumed run is the same run however its paths were spelled (dir/ or dir, relative or absolute).
    cfg = dataclasses.replace(cfg, inputs=tuple(map(canonical_path, cfg.inputs)), out=str(where) if isinstance(
        where, StorePath) else canonical_path(cfg.out), teacher=canonical_path(cfg.teacher))
    # Fails on a missing input before anything is loaded (score mode's input, a label set, is checked below).
    files = expand_paths(list(cfg.inputs)) if cfg.mode != "score" else []
    tokenizer = load_tokenizer(cfg.teacher, need_model=cfg.mode != "tokens")
    sampled_by = None
    if cfg.mode == "score":   # the input is a samples label set (a directory or a URI): its shards are the input files
        samples = samples_input(cfg, tokenizer)
        files = [samples.dir / s["name"] for s in samples.shards]
        sampled_by = {"labels": str(samples.dir), "fingerprint": samples.manifest.get("fingerprint"),
                      "model": (samples.manifest.get("teacher") or {}).get("path"),
                      "sampling": samples.manifest.get("sampling")}
    check_backend(cfg)
    return resolve(cfg, tokenizer), files, tokenizer, sampled_by


def _run(cfg: GenerateConfig, teacher: Teacher | None, group) -> dict:
    rd = RunDir(cfg.out, GENERATE, worker=(cfg.worker_index, cfg.num_workers))
    cfg, files, tokenizer, sampled_by = preflight(cfg)
    inputs = input_identity(files)
    with rd:
        previous = rd.claim(cfg.resume or cfg.num_workers > 1, cfg.overwrite, compare(cfg, inputs, rd.spelling))
        name = fmt.MANIFEST_NAME if cfg.num_workers == 1 else fmt.partial_manifest_name(cfg.worker_index, cfg.num_workers)
        # Finished before from the same inputs (with --inputs-changed each shard is checked against its records).
        if previous and not cfg.inputs_changed and (done := complete_manifest(rd.where, name)) is not None:
            return {**done, "summary": {"seconds": 0.0, "teacher_tokens": 0, "tokens_per_second": 0.0, "complete": True}}
        for stale in {name, fmt.MANIFEST_NAME}:   # a manifest that may no longer describe the set goes first
            storage.delete(rd.where / stale)
        rd.record(identity(cfg, inputs))
        rd.prepare_staging(owned_tmp(cfg))
        sink = sink_for(rd, cfg)
        own = teacher is None
        teacher = load_teacher(cfg, tokenizer, group) if own else teacher
        try:
            m = _generate(cfg, teacher, tokenizer, files, rd.local, sink, name, sampled_by)
        finally:
            if own:
                teacher.close()
        if cfg.num_workers == 1:   # what the run took, beside its identity (a worker's is in its log)
            rd.record({**identity(cfg, inputs), "summary": m["summary"]})
        return m


def _generate(cfg: GenerateConfig, teacher: Teacher, tokenizer, files: list[Path], out: Path, sink, name: str,
              sampled_by: dict | None = None) -> dict:
    """The pipeline, writing shards into `out`; `sink` knows which are finished
    and commits those finished now (and the manifest, called `name`, last)."""
    enc = Encoding(**cfg.encoding)
    id_bound = max(teacher.logits_size, teacher.vocab_size)
    t0 = time.time()
    inputs = input_identity(files)
    progress = Progress(cfg, sum(size for size, _ in inputs.values()))

    work_q: queue.Queue = queue.Queue(maxsize=2)
    write_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    reader = StageThread(read_shards, cfg, files, tokenizer, teacher.max_positions, sink.done, work_q)
    writer = StageThread(write_shards, cfg, out, id_bound, enc, sink.closed, write_q)
    shards: dict[int, ShardInfo] = {}
    counts = {"examples": 0, "skipped": 0}
    total_shards = 0
    meter = meter_for(cfg, teacher)
    try:
        while True:
            work = get_from(work_q, reader)
            if work is None:
                break
            if isinstance(work, int):          # the reader's last word: how many shards exist
                total_shards = work
                continue
            counts["examples"] += work.examples
            if work.done:   # finished by an earlier run
                shards[work.index], skipped = sink.info(work.index)
                counts["skipped"] += skipped
                progress.update(work.examples, 0, work.input_bytes)
                continue
            counts["skipped"] += work.skipped
            put_to(write_q, ("open", work.index, work.digest), writer)
            batches = topk_batches(work.items, cfg) if cfg.windowed or cfg.mode == "score" else sample_batches(work.items, cfg)
            for batch in batches:
                if cfg.mode == "tokens":
                    rows, lengths = windows_only(batch)
                elif cfg.mode == "topk":
                    rows, lengths = score_batch(teacher, batch, cfg)
                elif cfg.mode == "sampled":
                    rows, lengths = draw_batch(teacher, batch, cfg)
                elif cfg.mode == "score":
                    rows, lengths = score_completions(teacher, batch, cfg)
                else:
                    rows, lengths = sample_batch(teacher, tokenizer, batch, cfg)
                put_to(write_q, ("rows", work.index, rows), writer)
                progress.update(0, sum(lengths))
                if meter is not None:
                    meter.add(lengths)
            put_to(write_q, ("close", work.index, {"examples": work.examples, "skipped": work.skipped,
                                                   "input_sha256": work.digest}), writer)
            progress.update(work.examples, 0, work.input_bytes)
        put_to(write_q, None, writer)
        writer.join_checked()
        shards.update(sink.finish(writer.result, total_shards))
    except BaseException:
        writer.stop()
        reader.stop()
        sink.stop()
        raise
    finally:
        progress.close()
    if cfg.num_workers == 1 and not any(s.rows for s in shards.values()):
        raise InputError(f"{', '.join(cfg.inputs)}: all {counts['skipped']} input record(s) were bad and skipped "
                         "(--skip-bad); nothing to label, no label set written")
    manifest = _manifest(cfg, out, teacher, tokenizer, enc, id_bound, shards, counts, total_shards, inputs, sampled_by)
    manifest = sink.publish(manifest, name)
    elapsed = time.time() - t0
    manifest["summary"] = {"seconds": round(elapsed, 2), "teacher_tokens": progress.tokens,
                           "tokens_per_second": progress.tokens / elapsed if elapsed else 0.0,
                           **(meter.summary(progress.tokens, elapsed) if meter is not None else {})}
    return manifest


def resolve(cfg: GenerateConfig, tokenizer) -> GenerateConfig:
    """Fill settings that depend on the teacher and check them against it."""
    mcfg = model_config(cfg.teacher)
    positions = int(getattr(mcfg, "max_position_embeddings", 0) or 1 << 30)
    vocab = getattr(mcfg, "vocab_size", None) or len(tokenizer)
    if cfg.max_seq_len is None:
        cfg = dataclasses.replace(cfg, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, positions))
    if cfg.windowed and cfg.max_seq_len > positions:
        raise OptionError(f"--max-seq-len {cfg.max_seq_len} exceeds the teacher's {positions} positions")
    if cfg.mode in ("topk", "score") and cfg.k > vocab:
        raise OptionError(f"--k {cfg.k} is larger than the teacher's vocabulary ({vocab})")
    if cfg.truncates and not cfg.encoding.get("variable_k"):
        cfg = dataclasses.replace(cfg, encoding={**cfg.encoding, "variable_k": True})
    if cfg.windowed and cfg.messages_field and "assistant_mask" not in cfg.encoding:   # conversations: mark the assistant's tokens
        cfg = dataclasses.replace(cfg, encoding={**cfg.encoding, "assistant_mask": True})
    if cfg.encoding.get("assistant_mask") and not getattr(tokenizer, "is_fast", False):
        raise OptionError(f"--messages-field: finding the assistant's tokens needs a fast tokenizer (character offsets); "
                          f"{cfg.teacher}'s is a slow one: save it as a fast tokenizer, or pass --encoding "
                          "assistant_mask=false to label without the mask")
    return cfg


def _manifest(cfg, out, teacher: Teacher, tokenizer, enc, id_bound, shards, counts, total_shards, inputs: dict,
              sampled_by: dict | None = None) -> dict:
    """The manifest (a worker's partial manifest with several workers); worker 0 saves the tokenizer beside the shards."""
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
    if sampled_by is not None:   # score mode: where the completions came from
        header["scored"] = {"round": cfg.round, "samples": sampled_by}
    if cfg.mode == "sampled":
        header["sampling"] = {"draws": cfg.draws, "proposal_temperature": cfg.proposal_temperature, "seed": cfg.seed,
                              "seed_rule": "sha256(seed, example_id, window_offset)[:8] & (2**63-1), one stream per window"}
    manifest = build_manifest(cfg.kind, cfg.entries, id_bound, enc, ordered, header)
    if cfg.num_workers > 1:
        # The inputs it was made from: finalize refuses a worker's part made before the inputs changed.
        manifest["worker"] = {"index": cfg.worker_index, "num_workers": cfg.num_workers, "total_shards": total_shards,
                              "inputs_sha256": inputs_digest(inputs)}
    return manifest

# ---------------------------------------------------------------- writer


def write_shards(cfg: GenerateConfig, out: Path, id_bound: int, enc: Encoding, on_close, write_q: queue.Queue,
                 stop: threading.Event) -> dict[int, ShardInfo]:
    """Write the shards the main thread sends; `on_close(index, info, counts)`
    hears of each as it is finished (the bucket uploader)."""
    done: dict[int, ShardInfo] = {}
    current: ShardFile | None = None
    k = cfg.entries
    # Encoding (sorting, quantising) runs on a few threads: one thread cannot
    # keep up with a GPU teacher.
    threads = min(4, os.cpu_count() or 1)
    encoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="labelgen-encode")
    try:
        while (msg := take(write_q, stop)) is not None:
            op, index, payload = msg   # payload: rows, or the shard's counts on close
            if op == "open":   # payload: the digest of the shard's input records
                current = ShardFile(out / fmt.shard_name(index), cfg.kind, k, id_bound, enc,
                                    extra_meta={"config_hash": cfg.output_hash(), "shard_index": index,
                                                "input_sha256": payload}, encoder=encoder, in_flight=2 * threads)
            elif op == "rows":
                for row in payload:
                    if cfg.truncates:   # here, not in the teacher loop: it waits on nothing
                        row[fmt.TOPK_LOGPROBS], row[fmt.COVERAGE] = truncate(
                            row[fmt.TOPK_LOGPROBS], row[fmt.COVERAGE], cfg.keep_mass, cfg.min_prob)
                    current.write(row)
            else:
                done[index] = current.close(counts={k: v for k, v in payload.items() if k != "input_sha256"})
                current = None
                on_close(index, done[index], payload)
    finally:
        if current is not None:
            current.abort()
        encoder.shutdown(wait=True, cancel_futures=True)
    return done
