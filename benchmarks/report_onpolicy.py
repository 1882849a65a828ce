"""On-policy distillation in batch rounds against off-policy labels, on a
real teacher (SmolLM2-135M-Instruct by default), on 2 CPU cores.

    bash jobs/report_onpolicy.sh --teacher /work/smollm2            (~1 h on 2 cores)
    bash jobs/report_onpolicy.sh --teacher /work/smollm2 --quick    (a smoke test)

The student is the teacher with most of its middle layers removed (it shares
the tokenizer; its completions are cheap to sample on CPU), healed by a short
off-policy KD warm-up on the teacher's own completions: every method starts
from that student. Prompts are instructions about the Python standard
library's functions, written from their names (a few hundred held out).
Each method is one `student-train rounds` run from the warm student with the
same prompts, rounds and optimizer steps:

  OPD              the student samples, the teacher scores, --loss opd
  OPD, 1 round     the same number of samples drawn all at once from the starting student (stale)
  off-policy KD    the teacher samples and scores its own completions, --loss kd
  SFT              the teacher's completions, --loss sft

so every method trains on the same number of completion tokens the teacher
scored (or wrote). After every round the student completes the held-out
prompts (temperature 1, the same seeds for every method) and the teacher
scores them: the student's on-policy reverse KL to the teacher and the
teacher's mean logprob of what it writes. Every stage is cached in --work.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect as pyinspect
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from labelgen.store import fsutil
from report_kit import Stages, completed, log

MODULES = ("os", "os.path", "json", "re", "math", "random", "itertools", "functools", "collections", "datetime",
           "time", "string", "textwrap", "shutil", "pathlib", "subprocess", "statistics", "heapq", "bisect", "copy",
           "csv", "hashlib", "base64", "struct", "zlib", "gzip", "glob", "fnmatch", "tempfile", "logging", "argparse",
           "operator", "decimal", "fractions", "uuid", "urllib.parse", "html", "difflib", "pprint", "enum",
           "dataclasses", "contextlib", "threading", "queue", "sqlite3", "unicodedata", "calendar", "secrets", "io",
           "sys", "inspect", "traceback", "zipfile", "tarfile", "array", "weakref", "types", "codecs", "locale")
TEMPLATES = ("What does the Python function {name} do?",
             "Write a short Python example that uses {name}.",
             "Explain when to use {name} in Python, in two sentences.",
             "What arguments does {name} take in Python?")
REAL_MARK = "<!-- on-policy section: bash jobs/report_onpolicy.sh -->"
KEEP_LAYERS = tuple(range(0, 6)) + tuple(range(24, 30))   # of SmolLM2-135M's 30


@dataclass(frozen=True)
class Scale:
    heldout: int = 200
    warm_prompts: int = 384
    round_prompts: int = 64
    n: int = 2
    rounds: int = 4
    steps: int = 16
    warm_steps: int = 150
    batch_size: int = 8
    max_new_tokens: int = 48
    k: int = 64
    lr: float = 1e-4
    warm_lr: float = 3e-4


FULL = Scale()
QUICK = Scale(heldout=8, warm_prompts=16, round_prompts=8, n=1, rounds=2, steps=2, warm_steps=4, batch_size=4,
              max_new_tokens=8, k=16)


def names() -> list[str]:
    """Public functions and classes of the standard library modules above, sorted."""
    out = []
    for mod in MODULES:
        m = importlib.import_module(mod)
        for n, obj in sorted(vars(m).items()):
            if n.startswith("_") or not (pyinspect.isfunction(obj) or pyinspect.isbuiltin(obj) or pyinspect.isclass(obj)):
                continue
            if (getattr(obj, "__module__", None) or mod).split(".")[0] not in (mod.split(".")[0], "posixpath", "_" + mod):
                continue   # re-exported from elsewhere
            out.append(f"{mod}.{n}")
    return sorted(set(out))


def write_prompts(work: Path, scale: Scale) -> dict:
    """Held-out, warm-up and round prompts (chat messages), disjoint; an
    unchanged file keeps its modification time, so resumed stages accept it."""
    ordered = sorted(names(), key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    text = [TEMPLATES[i % len(TEMPLATES)].format(name=n) for i, n in enumerate(ordered)]
    rows = [{"id": n, "messages": [{"role": "user", "content": t}], "prompt": t} for n, t in zip(ordered, text)]
    need = scale.heldout + scale.warm_prompts + scale.round_prompts
    if len(rows) < need:
        raise SystemExit(f"only {len(rows)} prompts from the standard library; the scale needs {need}")
    cuts = {"heldout": rows[:scale.heldout], "warm": rows[scale.heldout:scale.heldout + scale.warm_prompts],
            "rounds": rows[scale.heldout + scale.warm_prompts:need]}
    files = {}
    for name, part in cuts.items():
        files[name] = work / f"prompts_{name}.jsonl"
        body = "".join(json.dumps(r) + "\n" for r in part)
        if not files[name].is_file() or files[name].read_text() != body:
            fsutil.atomic_write_bytes(files[name], body.encode())
    return {"files": {k: str(v) for k, v in files.items()}, "available": len(rows)}


def build_student(teacher: str, out: Path) -> dict:
    """The teacher with only KEEP_LAYERS left (an HF directory with its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (out / "config.json").is_file():
        m = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
        layers = m.model.layers
        keep = [i for i in KEEP_LAYERS if i < len(layers)]
        m.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.layer_idx = i
        m.config.num_hidden_layers = len(keep)
        if getattr(m.config, "layer_types", None):
            m.config.layer_types = [m.config.layer_types[i] for i in keep]
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
        if (Path(teacher) / "generation_config.json").is_file():
            shutil.copy(Path(teacher) / "generation_config.json", tmp)
        tmp.rename(out)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return {"dir": str(out), "layers": m.config.num_hidden_layers, "parameters": sum(p.numel() for p in m.parameters())}


def rounds_config(teacher: str, student: str, prompts: str, out: Path, scale: Scale, **kw):
    """The prompts as chat messages (the teacher's template), or as plain text for a teacher without one."""
    from transformers import AutoTokenizer
    from student_train.config import RoundsConfig
    chat = bool(getattr(AutoTokenizer.from_pretrained(teacher), "chat_template", None))
    base = dict(teacher=teacher, student=student, prompts=(prompts,), out=str(out), rounds=scale.rounds, n=scale.n,
                max_new_tokens=scale.max_new_tokens, k=scale.k, id_field="id",
                **({"messages_field": "messages"} if chat else {"prompt_field": "prompt"}),
                max_steps=scale.steps, batch_size=scale.batch_size, lr=scale.lr, log_every=1, progress=False,
                device="cpu", batch_tokens=8192)
    return RoundsConfig(**{**base, **kw})


def methods(scale: Scale) -> dict:
    """name -> RoundsConfig settings; all at the same prompts, rounds x steps and completion tokens."""
    return {
        "OPD (reverse KL + forward KL)": dict(sampler="student", loss="opd", opd_forward_kl=1.0),
        "OPD (reverse KL only)": dict(sampler="student", loss="opd", opd_forward_kl=0.0),
        "off-policy KD (teacher's completions)": dict(sampler="teacher", loss="kd"),
        "SFT (teacher's completions)": dict(sampler="teacher", loss="sft"),
        "OPD, 1 round (stale samples)": dict(sampler="student", loss="opd", opd_forward_kl=1.0, rounds=1,
                                             n=scale.n * scale.rounds, max_steps=scale.steps * scale.rounds),
        "OPD (reverse KL only), 1 round (stale samples)": dict(sampler="student", loss="opd", opd_forward_kl=0.0,
                                                              rounds=1, n=scale.n * scale.rounds,
                                                              max_steps=scale.steps * scale.rounds),
    }


def run_method(name: str, kw: dict, teacher: str, student: str, files: dict, work: Path, scale: Scale,
               shared: Path | None) -> dict:
    from student_train.rounds import check_out, run_rounds
    out = work / "runs" / "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    cfg = rounds_config(teacher, student, files["rounds"], out, scale, eval_prompts=(files["heldout"],), **kw)
    if shared is not None and not (out / "initial").exists():
        # Every method starts from the same student: its held-out evaluation is made once.
        check_out(cfg)
        shutil.copytree(shared, out / "initial")
    t0 = time.time()
    r = completed(run_rounds(cfg), f"rounds in {cfg.out}")
    return {"config": cfg.to_dict(), "initial": r["initial"], "rounds": r["rounds"], "seconds": time.time() - t0}


def standard_error(scored: Path, resamples: int = 1000) -> float:
    """Bootstrap standard error (over completions) of the reverse-KL estimate of a scored held-out set."""
    import numpy as np
    from labelgen.shards import ShardReader
    rows = list(ShardReader(scored).rows(columns=["target_logprob", "sampling_logprob"]))
    diff = np.array([float((r["sampling_logprob"] - r["target_logprob"]).sum()) for r in rows])
    n = np.array([len(r["target_logprob"]) for r in rows])
    pick = np.random.default_rng(0).integers(0, len(rows), (resamples, len(rows)))
    return float(np.std(diff[pick].sum(1) / n[pick].sum(1)))


def table(results: dict, scale: Scale, teacher_name: str, student: dict, warm: dict, reference: dict,
          work: Path) -> list[str]:
    names_ = list(results)
    first = results[names_[0]]["initial"]
    start_dir = Path(results[names_[0]]["config"]["out"]) / "initial" / "eval-scored"

    def rkl(figures: dict, scored: Path) -> str:
        return f"{figures['reverse_kl']:.3f} ± {standard_error(scored):.3f}"
    lines = [REAL_MARK, "",
             f"### On-policy distillation in batch rounds ({teacher_name} teacher, CPU)", "",
             f"Teacher: {teacher_name}. Student: the teacher with {student['layers']} of its 30 layers kept "
             f"({student['parameters'] / 1e6:.0f}M parameters, the same tokenizer), healed by {warm['steps']} steps of "
             f"off-policy KD on the teacher's completions of {warm['prompts']} prompts. Prompts: instructions about "
             f"Python standard-library functions (`benchmarks/report_onpolicy.py`): {scale.round_prompts} for training, "
             f"{scale.heldout} held out. Every method: {scale.rounds} rounds x {scale.steps} steps of {scale.batch_size} "
             f"completions ({scale.n} per prompt per round, {scale.max_new_tokens} new tokens at most, temperature 1), "
             f"top-{scale.k} teacher labels, lr {scale.lr:g}; the 1-round runs draw all their completions "
             f"({scale.n * scale.rounds} per prompt) from the starting student and train {scale.steps * scale.rounds} steps "
             "on them. Held out: the student completes every held-out prompt (temperature 1, the same seeds for every "
             "method and round) and the teacher scores it; reverse KL is E[log p_student - log p_teacher] per completion "
             "token (lower is better), teacher logprob the teacher's mean logprob of the student's tokens. The first row is "
             "the teacher's own completions of the same prompts: where a student that matched it would land (reverse KL 0, "
             "teacher logprob minus the teacher's entropy per token): the closer a student's teacher logprob comes to it, "
             "the likelier the teacher finds its text.",
             "",
             "| method | after round | completion tokens trained on | held-out reverse KL | teacher logprob | wall time (min) | staleness at round end |",
             "|---|---|---|---|---|---|---|",
             f"| the teacher itself (reference) | | | {abs(reference['reverse_kl']):.3f} ± {standard_error(work / 'teacher-reference' / 'eval-scored'):.3f} | "
             f"{reference['teacher_logprob']:.3f} | | |",
             f"| start (every method) | 0 | 0 | {rkl(first, start_dir)} | {first['teacher_logprob']:.3f} | | |"]
    for name in names_:
        tokens, minutes = 0, 0.0
        for rec in results[name]["rounds"]:
            tokens += rec["completion_tokens"]
            minutes += (rec["sample_seconds"] + rec["score_seconds"] + rec["train_seconds"]) / 60
            ev = rec["eval"]
            stale = f"{rec['staleness']:.4f}" if "staleness" in rec else ""
            after = (rec["round"] + 1) * (scale.rounds // len(results[name]["rounds"]))
            scored = Path(results[name]["config"]["out"]) / f"round-{rec['round']:03d}" / "eval-scored"
            lines.append(f"| {name} | {after} | {tokens:,} | {rkl(ev, scored)} | {ev['teacher_logprob']:.3f} | "
                         f"{minutes:.1f} | {stale} |")
    lines += ["", "± : the bootstrap standard error of the held-out reverse KL over the completions. "
              "Wall time: sampling, scoring and training of the rounds so far (held-out evaluation not counted). "
              "Staleness: at the last training step of the round, the mean of log p_sampler - log p_student over the "
              "batch's completion tokens (an estimate of KL(sampler || student)).", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--teacher-name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--work", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="markdown file to write the table into (replacing its section)")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    import tempfile
    scale = QUICK if args.quick else FULL
    work = Path(args.work or Path(tempfile.gettempdir()) / f"labelgen-onpolicy{'-quick' if args.quick else ''}")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    all_methods = methods(scale)
    stages = Stages(work, 4 + len(all_methods))
    files = stages("prompts", lambda: write_prompts(work, scale))["files"]
    student = stages("student", lambda: build_student(args.teacher, work / "student"))

    def warm_up() -> dict:
        from student_train.rounds import run_rounds
        cfg = rounds_config(args.teacher, student["dir"], files["warm"], work / "warm", scale, sampler="teacher",
                            loss="kd", rounds=1, n=1, max_steps=scale.warm_steps, lr=scale.warm_lr)
        r = completed(run_rounds(cfg), "warm-up")
        return {"student": r["student"], "steps": scale.warm_steps, "prompts": scale.warm_prompts,
                "round": r["rounds"][0]}
    warm = stages("warm-up", warm_up)

    def teacher_reference() -> dict:
        """The teacher's own completions of the held-out prompts: reverse KL 0, and the teacher logprob a
        student that matched it would reach (minus the teacher's entropy per token)."""
        from student_train.rounds import held_out_figures
        cfg = rounds_config(args.teacher, student["dir"], files["rounds"], work / "teacher-reference", scale,
                            eval_prompts=(files["heldout"],))
        return held_out_figures(cfg, args.teacher, work / "teacher-reference")
    reference = stages("teacher on the held-out prompts", teacher_reference)
    results, shared = {}, None
    for name, kw in all_methods.items():
        results[name] = stages(name, lambda name=name, kw=kw: run_method(name, kw, args.teacher, warm["student"], files,
                                                                            work, scale, shared))
        shared = Path(results[name]["config"]["out"]) / "initial"
    lines = table(results, scale, args.teacher_name, student, warm, reference, work)
    print("\n".join(lines))
    if args.out:
        path = Path(args.out)
        text = path.read_text() if path.is_file() else ""
        section = "\n".join(lines).rstrip() + "\n"
        if REAL_MARK in text:
            head, _, rest = text.partition(REAL_MARK)
            nxt = rest.find("\n<!-- ", 1)
            text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
        else:
            text = text.rstrip() + "\n\n" + section
        fsutil.atomic_write_bytes(path, text.encode())
        log(f"wrote the table into {path}")


if __name__ == "__main__":
    main()
