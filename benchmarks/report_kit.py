"""The machinery every report on a real teacher shares (report_teacher.py,
report_seeds.py, report_onpolicy.py, report.py): its scales, the stages
cached as JSON in the work directory, the label sets and the student each
method trains, and the splicing of a section into docs/results.md with its
plots. The studies are report_studies.py; the method table report_teacher.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from labelgen.store import fsutil


STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024,
           "tie_word_embeddings": True}

REAL_MARK = "<!-- real-teacher section: bash jobs/report.sh --smollm2 -->"

PAIRED_MARK = "<!-- paired section: bash jobs/report.sh --smollm2 --paired (benchmarks/report_paired.py) -->"

SEEDS_MARK = "<!-- seeds section: bash jobs/report.sh --smollm2 --seeds (benchmarks/report_seeds.py) -->"

@dataclass(frozen=True)
class RealScale:
    label_docs: int = 50
    """Training files labelled (each cut to label_chars): ~40k positions."""
    label_chars: int = 4000
    heldout_docs: int = 8
    prompts: int = 96
    """Prompts (the first prompt_chars of training files) the teacher completes for SFT."""
    prompt_chars: int = 240
    completion_tokens: int = 192
    byte_docs: int = 8
    """Files labelled directly at k = 8 and 64 to measure their bytes and teacher time."""
    reference_k: int = 4096
    student_steps: int = 100
    batch_size: int = 8
    max_seq_len: int = 256
    eval_batches: int = 3
    grad_batches: int = 4

FULL = RealScale()

QUICK = RealScale(label_docs=4, label_chars=1500, heldout_docs=2, prompts=4, completion_tokens=16, byte_docs=2,
                  reference_k=256, student_steps=4, eval_batches=1, grad_batches=1)

def log(msg: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)

def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")

class Stages:
    """Stages cached as JSON in WORK/stages/: a finished stage is read back,
    not redone; each one prints what runs and how many are left."""

    def __init__(self, work: Path, total: int):
        self.dir, self.total, self.done, self.t0 = work / "stages", total, 0, time.time()
        self.seconds = 0.0   # what the stages took when they ran, cached ones included
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, fn, cached_only: bool = False) -> dict | None:
        """The stage's result; with cached_only, None for a stage not finished before."""
        self.done += 1
        path = self.dir / f"{slug(name)}.json"
        where = f"[stage {self.done}/{self.total}, {(time.time() - self.t0) / 60:.1f} min in]"
        if path.is_file():
            log(f"{where} {name}: cached")
            result = json.loads(path.read_text())
            self.seconds += result.get("seconds") or 0.0
            return result
        if cached_only:
            return None
        log(f"{where} {name}: running ({self.total - self.done} stages after it)")
        t0 = time.time()
        result = {**fn(), "seconds": None}
        result["seconds"] = time.time() - t0
        fsutil.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
        log(f"{where} {name}: done in {result['seconds'] / 60:.1f} min")
        self.seconds += result["seconds"]
        return result

def split_text(scale: RealScale, work: Path) -> dict:
    """Python's standard library source: the last 5% of files held out (the
    first heldout_docs of them are the evaluation text), the first
    label_docs files labelled, prompts from the starts of training files."""
    from labelgen.tools.demo import read_corpus
    texts = read_corpus(None, 6 << 20)
    n_held = max(2, len(texts) // 20)
    train, held = texts[:-n_held], texts[-n_held:]
    files = {"text": work / "labels_text.jsonl", "bytes_text": work / "bytes_text.jsonl",
             "heldout": work / "heldout.jsonl", "prompts": work / "prompts.jsonl"}
    jl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)   # noqa: E731
    contents = {"text": jl({"text": t[: scale.label_chars]} for t in train[: scale.label_docs]),
                "bytes_text": jl({"text": t[: scale.label_chars]} for t in train[: scale.byte_docs]),
                "heldout": jl({"text": t[: scale.label_chars]} for t in held[: scale.heldout_docs]),
                "prompts": jl({"prompt": t[: scale.prompt_chars]} for t in train[: scale.prompts])}
    for name, body in contents.items():
        # Unchanged files keep their modification time, so a resumed label set accepts them.
        if not files[name].is_file() or files[name].read_text() != body:
            fsutil.atomic_write_bytes(files[name], body.encode())
    return {"files": files, "train_docs": len(train), "heldout_docs": scale.heldout_docs, "all_heldout": n_held,
            "other_text": train[scale.label_docs:]}

def label_specs(files: dict, scale: RealScale) -> dict:
    """GenerateConfig settings of every label set, by name."""
    text, k_ref = (str(files["text"]),), scale.reference_k
    return {
        "tokens": dict(inputs=text, mode="tokens"),
        f"top{k_ref}": dict(inputs=text, mode="topk", k=k_ref),
        "top64 (bytes)": dict(inputs=(str(files["bytes_text"]),), mode="topk", k=64),
        "top8 (bytes)": dict(inputs=(str(files["bytes_text"]),), mode="topk", k=8),
        "min-prob 1e-3": dict(inputs=text, mode="topk", k=k_ref // 4, min_prob=1e-3),   # p >= 1e-3: at most 1,000
        # with the teacher's mass on the drawn ids (+1 B/position), which the tail-bucket rows (--seeds) need;
        # N = 20 and 24 are --seeds' only
        **{f"sampled{n}": dict(inputs=text, mode="sampled", draws=n, encoding={"sampled_coverage": True})
           for n in (50, 12, 20, 24)},
        "samples": dict(inputs=(str(files["prompts"]),), mode="sample", prompt_field="prompt", n=1, temperature=1.0,
                        max_new_tokens=scale.completion_tokens, max_seq_len=None, batch_tokens=16384),
        "eval": dict(inputs=(str(files["heldout"]),), mode="topk", k=k_ref),
    }

def make_label_set(teacher: str, out: Path, kw: dict, scale: RealScale) -> dict:
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    from labelgen.tools.inspection import inspect
    summary = {}
    if not (out / "manifest.json").is_file():
        summary = run(GenerateConfig(**{**dict(teacher=teacher, out=str(out), max_seq_len=scale.max_seq_len, batch_tokens=4096,
                                     rows_per_shard=64, progress=False, device="cpu", resume=True), **kw})).get("summary", {})
    m = json.loads((out / "manifest.json").read_text())
    info = inspect(str(out))
    keep = ("bytes", "bytes_per_position", "coverage_mean", "coverage_p5", "target_in_topk", "unique_per_position",
            "entries_per_position")
    return {"dir": str(out), "positions": m["counts"]["positions"], "rows": m["counts"]["rows"],
            "teacher_seconds": summary.get("seconds") if m["mode"] != "tokens" else None,
            **{k: (float(info[k]) if info.get(k) is not None else None) for k in keep}}

def completed(result: dict, what: str) -> dict:
    """A training run's result, or the report's exit when a signal stopped it
    early (the run keeps its checkpoint; no stage records a partial student)."""
    if result.get("stopped_by"):
        raise SystemExit(f"{what}: stopped by {result['stopped_by']} at step {result.get('step')}; "
                         "rerun the same command to resume")
    return result

def train_student(labels: dict, label_set: str, kw: dict, out: Path, eval_dir: str, scale: RealScale,
                  student_json: Path, lr: float = 3e-3, evals: int = 5) -> dict:
    """One student, resumable from its last checkpoint; its final evaluation and held-out curve (`evals`
    evaluations over the run)."""
    from student_train.config import TrainConfig
    from student_train.train import train
    steps = scale.student_steps
    completed(train(TrainConfig(labels=(labels[label_set]["dir"],), out=str(out), student_config=str(student_json),
                                max_steps=steps, batch_size=scale.batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                                eval_labels=(eval_dir,), eval_every=max(1, steps // evals),
                                eval_batches=scale.eval_batches, save_every=max(1, steps // 4),
                                log_every=max(1, steps // 10), progress=False, device="cpu", resume=True, **kw)),
              f"student {out.name}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in rows if "eval_ce" in r]
    from student_train.checkpoint import latest_checkpoint
    last = latest_checkpoint(out)
    for old in out.glob("step_*"):   # keep the final checkpoint only
        if old != last:
            shutil.rmtree(old)
    return {"final": {k: v for k, v in evals[-1].items() if k.startswith("eval_")},
            "curve": [(r["step"], r["eval_ce"]) for r in evals], "checkpoint": str(last),
            "tokens_per_s": sum(r.get("tokens_per_s", 0) for r in rows) / max(1, sum("tokens_per_s" in r for r in rows))}

SECTION_ORDER = (REAL_MARK, PAIRED_MARK, SEEDS_MARK, "<!-- toy section: bash jobs/report.sh -->",
                 "<!-- cross-tokenizer section: bash jobs/report.sh --cross-tokenizer -->")

def replace_section(report: Path, mark: str, body: str) -> None:
    """Write `body` as results.md's section `mark`, keeping the others, in SECTION_ORDER."""
    text = report.read_text() if report.is_file() else ""
    sections, current = {}, SEEDS_MARK   # text before any mark (as before the paired section was added)
    for line in text.splitlines(keepends=True):
        if line.strip() in SECTION_ORDER:
            current = line.strip()
        else:
            sections[current] = sections.get(current, "") + line
    sections[mark] = body.rstrip("\n") + "\n\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write_bytes(report, "".join(m + "\n" + sections[m] for m in SECTION_ORDER
                                              if sections.get(m, "").strip()).encode())

def plot_bytes_vs_gain(points: list[tuple[str, float | None, float | None]], path: Path, ylabel: str, title: str) -> None:
    """(method, bytes per position, share of the gain recovered) as a labelled scatter, bytes on a log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    floor = -0.5   # methods far worse than CE only (renormalised top-k) would squash the others into a line
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    clipped = 0
    for method, x, y in points:
        if x is not None and y is not None:
            if y >= floor:
                ax.scatter(x, y)
                ax.annotate(method, (x, y), fontsize=6)
                continue
            ax.scatter(x, floor, marker="v")   # labels stacked upwards so they do not overlap
            ax.annotate(f"{method} ({y:.0%}, off the axis)", (x, floor), xytext=(4, 4 + 9 * clipped),
                        textcoords="offset points", fontsize=6)
            clipped += 1
    ax.set_ylim(bottom=floor - 0.05)
    ax.set_xscale("log")
    ax.set_xlabel("label bytes per position")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare(args) -> tuple[str, Path]:
    """(the teacher, the work directory) of a real-teacher report: SmolLM2
    fetched there if asked (jobs/fetch_smollm2.sh); the directory kept
    between runs (stages resume) unless --fresh."""
    name = "smollm2" if args.smollm2 else Path(args.teacher).name
    work = Path(args.work or Path(tempfile.gettempdir()) / f"labelgen-report-{slug(name)}{'-quick' if args.quick else ''}")
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher
    if args.smollm2:
        teacher = str(work / "SmolLM2-135M-Instruct")
        subprocess.run(["bash", "jobs/fetch_smollm2.sh", teacher], check=True,
                       env={**os.environ, "BIN": str(Path(sys.executable).parent)})
    log(f"work directory {work} (rerun the same command to resume; --fresh starts over)")
    return teacher, work
