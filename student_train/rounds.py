"""On-policy distillation in batch rounds: `student-train rounds`.

Each round: the sampler (the current student, or the teacher for an
off-policy baseline) writes completions of the prompts at temperature 1
(`labelgen generate --mode sample`: each token's sampling logprob is kept),
the teacher scores them offline (`--mode score`: its top-k, and its logprob
of every completion token), and the student trains `max_steps` steps on
them (`student-train train --loss opd`); the next round samples from the
student this round ends with. With held-out prompts, the student's own
completions of them are scored after every round (and before the first):
the sampled estimate of its reverse KL to the teacher, E_y~student[log
p_student(y) - log p_teacher(y)] per token, and the teacher's mean logprob
of what it writes.

    OUT/rounds.json            the config (a rerun under another is refused)
    OUT/initial/eval-*         the starting student on the held-out prompts
    OUT/round-NNN/samples      completions; scored: the teacher's labels; train: the
                               student's run (its last checkpoint is the next sampler);
                               eval-samples, eval-scored; round.json: the round's figures
    OUT/rounds.jsonl           one line per finished round

Every stage is cached: a finished label set or training run is reused, an
interrupted one resumes, so the same command run again continues where it
stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from labelgen import format as fmt
from labelgen import stopping
from labelgen.errors import OptionError
from labelgen.run.rundir import Mismatch, RunDir, RunKind
from labelgen.store import storage
from student_train.checkpoint import checkpoint_dir, complete
from student_train.config import RoundsConfig, renamed_for

LOG_FILE = "rounds.jsonl"
RECORD, INITIAL = "rounds.json", "initial"   # the config (a rerun under another is refused); the student before round 0
ROUND_DIRS = "round-*"
ROUNDS = RunKind("rounds run", (RECORD, LOG_FILE, INITIAL, ROUND_DIRS), marker=(RECORD,), harmless=(RECORD,),
                 unit="round", unit_pattern=ROUND_DIRS, record=RECORD, local_only=True)


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:03d}"
# Settings that change where or how fast the rounds run, not what they make: a rerun may change them.
EXECUTION_ONLY = ("progress", "overwrite", "resume", "device", "loader_workers", "batch_tokens", "skip_bad")
# Settings rounds.json did not record before they existed, at the default they then had.
ADDED_LATER = {"ce_weight": 0.0, "ce_weight_end": None}
OLD_NAMES = renamed_for(RoundsConfig)   # a record written before a setting's rename
EVAL_SEED = 7919   # the held-out completions of every round and every run share their seeds


def log(msg: str) -> None:
    print(f"[rounds {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _generate(cfg: RoundsConfig, out: Path, **kw) -> tuple[dict, float]:
    """A label set in `out`, made once: (its manifest, the seconds it took when made)."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    if (out / fmt.MANIFEST_NAME).is_file():   # made by an earlier run of the command: its time is not known here
        return fmt.read_manifest(out), 0.0
    gen = GenerateConfig(out=str(out), backend=cfg.backend, batch_tokens=cfg.batch_tokens, device=cfg.device,
                         skip_bad=cfg.skip_bad, resume=True, progress=cfg.progress, **kw)
    t0 = time.time()
    with stopping.raise_on_preemption():   # a preemption signal stops the stage; its finished shards are kept
        m = run(gen)
    return m, time.time() - t0


def _sample(cfg: RoundsConfig, sampler: str, prompts: tuple[str, ...], out: Path, n: int, seed: int):
    return _generate(cfg, out, teacher=sampler, inputs=prompts, mode="sample", n=n, temperature=1.0, top_p=1.0,
                     max_new_tokens=cfg.max_new_tokens, seed=seed,
                     prompt_field=None if cfg.messages_field else (cfg.prompt_field or "prompt"),
                     messages_field=cfg.messages_field, id_field=cfg.id_field)


def _score(cfg: RoundsConfig, samples: Path, out: Path, round_index: int):
    return _generate(cfg, out, teacher=cfg.teacher, inputs=(str(samples),), mode="score", k=cfg.k, round=round_index)


def on_policy_figures(scored: Path) -> dict:
    """The sampler's reverse KL to the teacher and both logprobs, per completion token, from a scored set."""
    from labelgen.tools.inspection import inspect
    r = inspect(scored)
    return {"reverse_kl": r["reverse_kl"], "teacher_logprob": r["teacher_logprob_mean"],
            "student_logprob": r["sampler_logprob_mean"], "tokens": r["positions"]}


def held_out_figures(cfg: RoundsConfig, student: str, where: Path) -> dict | None:
    """`student`'s completions of the held-out prompts in `where`, scored by the
    teacher: on_policy_figures and the seconds it took (None without --eval-prompts)."""
    if not cfg.eval_prompts:
        return None
    t0 = time.time()
    _sample(cfg, student, cfg.eval_prompts, where / "eval-samples", cfg.eval_n, EVAL_SEED)
    _score(cfg, where / "eval-samples", where / "eval-scored", 0)
    return {**on_policy_figures(where / "eval-scored"), "seconds": time.time() - t0}


def _train(cfg: RoundsConfig, labels: Path, student: str, out: Path) -> tuple[str | None, dict]:
    """The round's training run (resumed if cut): (its last checkpoint, figures
    from its metrics log), or (None, {stopped_by}) when a preemption signal stopped it."""
    from student_train.train import train
    final = checkpoint_dir(out, cfg.max_steps)
    if not complete(final):
        result = train(cfg.train_config(str(labels), student, str(out)))
        if result["stopped_by"]:
            return None, result
    lines = [json.loads(x) for x in storage.read_text(out / "metrics.jsonl").splitlines() if x.strip()]
    figures = {"train_loss": lines[-1]["loss"], "train_ce": lines[-1]["ce"]}
    for key in ("staleness", "clipped", "advantage", "forward_kl"):
        if key in lines[-1]:   # the last logged step's: how far the student has moved from the sampler
            figures[key] = lines[-1][key]
    return str(final), figures


def compare(mine: dict, out: Path):
    """Why the rounds run recorded in `out` is not this one (a Mismatch), or None."""
    def why(previous: dict) -> Mismatch | None:
        # A setting added since the record was written counts at its default.
        # A setting renamed since counts under its new name.
        previous = {OLD_NAMES.get(k, k): v for k, v in previous.items()}
        theirs = {**ADDED_LATER, **{k: v for k, v in previous.items() if k not in EXECUTION_ONLY}}
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return Mismatch("--out", f"{out} holds rounds run with other settings (changed: {', '.join(changed)})",
                        "choose another --out") if changed else None
    return why


def run_rounds(cfg: RoundsConfig) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OptionError("student-train rounds runs as one process (it samples, scores and trains in turn); "
                         "not under torchrun")
    with RunDir(cfg.out, ROUNDS) as rd:
        claim(rd, cfg)
        return _run_rounds(cfg, rd.local)


def claim(rd: RunDir, cfg: RoundsConfig) -> None:
    """The work directory holds this config's rounds (another's is refused unless --overwrite)."""
    mine = {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_ONLY}
    rd.claim(resume=True, overwrite=cfg.overwrite, compare=compare(mine, rd.local))
    rd.record(mine)


def check_out(cfg: RoundsConfig) -> Path:
    """Claim the work directory without running the rounds (for a caller that seeds a stage, as the report does)."""
    with RunDir(cfg.out, ROUNDS) as rd:
        claim(rd, cfg)
    return rd.local


def _run_rounds(cfg: RoundsConfig, out: Path) -> dict:
    student, done = cfg.student, []
    initial = held_out_figures(cfg, student, out / INITIAL)
    if initial:
        log(f"start: reverse KL {initial['reverse_kl']:.4f}, teacher logprob {initial['teacher_logprob']:.4f} "
            f"on {initial['tokens']:,} held-out completion tokens")
    for r in range(cfg.rounds):
        where = round_dir(out, r)
        record_file = where / "round.json"
        if record_file.is_file():   # a finished round: its student is its training run's last checkpoint
            done.append(json.loads(storage.read_text(record_file, 1 << 20)))
            student = str(checkpoint_dir(where / "train", cfg.max_steps))
            continue
        sampler = student if cfg.sampler == "student" else cfg.teacher
        samples, sample_s = _sample(cfg, sampler, cfg.prompts, where / "samples", cfg.n, cfg.seed + 1_000_003 * r)
        labels, score_s = where / "samples", 0.0
        if cfg.loss != "sft":   # sft trains on the completions as they are
            _, score_s = _score(cfg, where / "samples", where / "scored", r)
            labels = where / "scored"
        t0 = time.time()
        student, figures = _train(cfg, labels, student, where / "train")
        if student is None:   # preempted: the step in progress is checkpointed
            return {**figures, "out": str(out), "round": r}
        train_s = time.time() - t0
        record = {"round": r, "student": student, "completions": samples["counts"]["rows"],
                  "completion_tokens": samples["counts"]["positions"],
                  "sample_seconds": sample_s, "score_seconds": score_s, "train_seconds": train_s, **figures}
        record["eval"] = held_out_figures(cfg, student, where)
        storage.write_bytes(record_file, json.dumps(record, indent=1).encode())
        done.append(record)
        storage.write_bytes(out / LOG_FILE, "".join(json.dumps(x) + "\n" for x in done).encode())
        ev = record["eval"]
        log(f"round {r + 1}/{cfg.rounds}: {record['completion_tokens']:,} completion tokens, trained "
            f"{cfg.max_steps} steps" + (f", staleness {record['staleness']:.4f} at the end" if "staleness" in record else "")
            + (f"; held out: reverse KL {ev['reverse_kl']:.4f}, teacher logprob {ev['teacher_logprob']:.4f}" if ev else ""))
    storage.write_bytes(out / LOG_FILE, "".join(json.dumps(x) + "\n" for x in done).encode())   # also when all were cached
    return {"out": str(out), "student": student, "initial": initial, "rounds": done, "stopped_by": None}
