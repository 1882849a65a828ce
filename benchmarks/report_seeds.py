"""Three seeds of the methods the real-teacher report has to tell apart:
CE only, the top-4096 reference, sampled N = 12 and N = 50 with and without
the tail bucket (and N = 12's bucket shared by exact logprobs), top-64
(target) and (tail). Mean +- sd of held-out CE, KL, ECE and the recovered
share of the seed-matched reference gain, and whether each method's
difference to the reference exceeds 2 standard errors.

    bash jobs/report.sh --smollm2 --seeds               # resumable; shares the report's cache
    bash jobs/report.sh --smollm2 --seeds --cached-only # the table from the stages finished so far

Stages are the report's own (benchmarks/report_teacher.py: same names, same
work directory): a student of seed 0 is the report's student, seed 1 its
run-to-run student; the full report reuses them. Students run seed by seed
(every method's seed 0, then seed 1, ...), the sampled-label questions first,
so a cut run has whole seeds for them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from report_teacher import (FULL, QUICK, SEEDS_MARK, STUDENT, Stages, label_specs, log, make_label_set, replace_section,
                            slug, split_text, train_student)

SEEDS = (0, 1, 2)


def seed_methods(k_ref: int) -> dict:
    """name -> (label set, TrainConfig settings, label set whose bytes it stands for), in the order they run."""
    ref = f"top{k_ref}"
    return {
        "CE only": ("tokens", dict(loss="ce"), None),
        f"reference: top-{k_ref} KD (tail)": (ref, dict(loss="kd", tail="tail"), ref),
        "sampled KD (N=12)": ("sampled12", dict(loss="kd"), "sampled12"),
        "sampled KD (N=12) + tail bucket": ("sampled12", dict(loss="kd", tail="tail"), "sampled12"),
        "sampled KD (N=12) + tail bucket, exact logprobs": ("sampled12 (logprobs)", dict(loss="kd", tail="tail"),
                                                            "sampled12 (logprobs)"),
        "sampled KD (N=50)": ("sampled50", dict(loss="kd"), "sampled50"),
        "sampled KD (N=50) + tail bucket": ("sampled50", dict(loss="kd", tail="tail"), "sampled50"),
        "top-64 KD (target)": (ref, dict(loss="kd", k=64, tail="target"), "top64 (bytes)"),
        "top-64 KD (tail)": (ref, dict(loss="kd", k=64, tail="tail"), "top64 (bytes)"),
    }


def student_stage(name: str, seed: int) -> str:
    """The report's stage (and directory) name of a student: seed 0 is the report's own run."""
    return name if seed == 0 else f"{name}, seed {seed}"


def run_seeds(args, teacher: str, work: Path) -> Path:
    import dataclasses
    scale = QUICK if args.quick else FULL
    if args.student_steps:
        scale = dataclasses.replace(scale, student_steps=args.student_steps)
    runs = seed_methods(scale.reference_k)
    sets = {n for set_name, _, bytes_of in runs.values() for n in (set_name, bytes_of) if n} | {"eval"}
    stage = Stages(work, total=len(runs) * len(SEEDS) + len(sets))
    split = split_text(scale, work)
    specs = label_specs(split["files"], scale)
    specs["sampled12 (logprobs)"] = {**specs["sampled12"], "draw_logprobs": True}
    labels: dict = {}

    def label_set(name: str):
        if name not in labels:
            labels[name] = stage(f"labels: {name}", lambda: make_label_set(teacher, work / "labels" / slug(name),
                                                                            specs[name], scale), args.cached_only)
        return labels[name]

    student_json = work / "student.json"
    if not student_json.is_file():
        student_json.write_text(json.dumps(STUDENT))
    eval_set = label_set("eval")
    results: dict = {name: {} for name in runs}
    for group in (list(runs)[:5], list(runs)[5:]):   # the N = 12 questions first, whole seeds at a time
        for seed in SEEDS:
            for name in group:
                set_name, kw, bytes_of = runs[name]
                for needed in (set_name, bytes_of):
                    if needed and label_set(needed) is None:
                        break
                else:
                    s_name = student_stage(name, seed)
                    done = stage(f"student: {s_name}", lambda set_name=set_name, kw=kw, s_name=s_name, seed=seed:
                                 train_student(labels, set_name, {**kw, "seed": seed} if seed else kw,
                                               work / "students" / slug(s_name), eval_set["dir"] if eval_set else "",
                                               scale, student_json), args.cached_only)
                    if done is not None:
                        results[name][seed] = done["final"]
    return write_seeds(args, teacher, scale, runs, labels, results)


def mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan"))


def write_seeds(args, teacher: str, scale, runs: dict, labels: dict, results: dict) -> Path:
    ref = f"reference: top-{scale.reference_k} KD (tail)"
    base = results["CE only"]
    lines = [f"## Three seeds: sampled labels with and without a tail bucket ({Path(teacher).name})", "",
             f"Produced by `{args.command}` on {os.cpu_count()} CPU cores: the report's students (same teacher, text, "
             "student and steps as above), each method with seeds " + ", ".join(map(str, SEEDS)) + " (the student's "
             "initialisation and batch order). Recovered: (CE only - method) / (CE only - reference) in held-out CE, "
             "per seed against the same seed's CE-only and reference students. Δ CE: the method's held-out CE minus "
             "the reference's, seed-matched; **>2 SE** where its mean exceeds twice its standard error.", "",
             "| student | seeds | bytes/position | held-out CE | KL to teacher | ECE | recovered | Δ CE vs reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (_, _, bytes_of) in runs.items():
        got = results[name]
        if not got:
            lines.append(f"| {name} | 0 | | not run yet | | | | |")
            continue
        seeds = sorted(got)
        stat = {key: mean_sd([got[s][key] for s in seeds]) for key in ("eval_ce", "eval_kl", "eval_ece")
                if all(got[s].get(key) is not None for s in seeds)}
        matched = [s for s in seeds if s in base and s in results[ref]]
        rec = [(base[s]["eval_ce"] - got[s]["eval_ce"]) / (base[s]["eval_ce"] - results[ref][s]["eval_ce"])
               for s in matched if base[s]["eval_ce"] - results[ref][s]["eval_ce"] > 1e-3]
        delta = [got[s]["eval_ce"] - results[ref][s]["eval_ce"] for s in matched]
        bpp = labels.get(bytes_of, {}) if bytes_of else {}
        def cell(m, sd, spec, unit=""):   # one seed: no spread to show
            return f"{m:{spec}}{unit}" if math.isnan(sd) else f"{m:{spec}} ± {sd:{spec}}{unit}"
        cells = {key: cell(*stat[key], spec) if key in stat else "—"
                 for key, spec in (("eval_ce", ".3f"), ("eval_kl", ".3f"), ("eval_ece", ".4f"))}
        rec_cell = cell(*(100 * v for v in mean_sd(rec)), ".0f", " %") if rec else "—"
        if len(delta) > 1 and name != ref:
            d, sd = mean_sd(delta)
            se = sd / math.sqrt(len(delta))
            delta_cell = f"{d:+.3f} ± {se:.3f}" + (" **>2 SE**" if abs(d) > 2 * se else "")
        else:
            delta_cell = "—"
        bytes_cell = f"{bpp['bytes_per_position']:.1f}" if bpp and bpp.get("bytes_per_position") else "—"
        lines.append(f"| {name} | {len(seeds)} | {bytes_cell} | {cells['eval_ce']} | {cells['eval_kl']} | "
                     f"{cells['eval_ece']} | {rec_cell} | {delta_cell} |")
    lines += ["", "Bytes are the label sets' own: the sampled sets here carry the coverage column the tail bucket needs "
              "(`--encoding sampled_coverage=true`, about 1 B/position over the default layout)."]
    if any(len(results[name]) < len(SEEDS) for name in runs):
        lines += ["", f"Rows with fewer than {len(SEEDS)} seeds: the run was cut there; the same command finishes them "
                      "(finished stages are cached)."]
    lines.append("")
    report = Path(args.out) / "results.md"
    replace_section(report, SEEDS_MARK, "\n".join(lines))
    log(f"seeds table: {sum(len(r) for r in results.values())} students")
    return report
