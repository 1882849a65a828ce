"""Three seeds of the methods the real-teacher report has to tell apart:
CE only, the top-4096 reference, sampled N = 12 and N = 50 with and without
the tail bucket (and N = 12's bucket shared by exact logprobs), N = 20 and
24 (the most draws near 16 B/position), top-64
(target) and (tail). Mean +- sd of held-out CE, KL, ECE and the recovered
share of the seed-matched reference gain, and whether each method's
difference to the reference exceeds 2 standard errors.

    bash jobs/report.sh --smollm2 --seeds               # resumable; shares the report's cache
    bash jobs/report.sh --smollm2 --seeds --cached-only # the table from the stages finished so far

Stages are the report's own (benchmarks/report_kit.py: same names, same
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

from report_kit import (FULL, QUICK, SEEDS_MARK, STUDENT, Stages, label_specs, log, make_label_set, replace_section, slug,
                        split_text, train_student)

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
        "sampled KD (N=20)": ("sampled20", dict(loss="kd"), "sampled20"),
        "sampled KD (N=24)": ("sampled24", dict(loss="kd"), "sampled24"),
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


def coverage_bytes(labels: dict) -> dict:
    """Label set -> its coverage column's compressed bytes per position (sets that have one)."""
    from labelgen.tools.inspection import inspect
    out = {}
    for name, info in labels.items():
        if info and name.startswith("sampled"):
            col = inspect(info["dir"])["bytes_by_column"].get("coverage", 0)
            if col:
                out[name] = col / info["positions"]
    return out


def needed_bytes(info: dict, kw: dict, coverage_pp: float) -> float:
    """Bytes per position a method needs: a sampled set's coverage column (`coverage_pp`) counts only for the
    tail bucket."""
    return info["bytes_per_position"] - (0.0 if kw.get("tail") == "tail" else coverage_pp)


BUDGET, WITHIN = 16.0, 5.0   # the goal: sampled labels at <= 16 B/position within 5 % of the reference gain


def goal(summary: dict) -> str:
    """The goal's paragraph, from the measured rows: reached or not, what 3
    seeds resolve here, and what the tail bucket did."""
    head = (f"**Goal: sampled labels at ≤ {BUDGET:.0f} B/position within {WITHIN:.0f} % of the reference gain "
            f"(mean of {len(SEEDS)} seeds).** ")
    sampled = {n: v for n, v in summary.items() if n.startswith("sampled")}
    fits = {n: v for n, v in sampled.items() if v[0] <= BUDGET}
    if not fits:
        return head + "No sampled row within the budget has been run yet."

    def delta(v):   # mean and standard error of the seed-matched Δ CE
        d, sd = mean_sd(v[3])
        return d, sd / math.sqrt(len(v[3])) if len(v[3]) > 1 else float("nan")

    name, best = max(fits.items(), key=lambda x: x[1][1])
    d, se = delta(best)
    said = (f"{name} at {best[0]:.1f} B recovers {best[1]:.0f} ± {best[2]:.0f} % (held-out CE {d:+.3f} ± {se:.3f} nats "
            "from the reference)")
    if best[1] >= 100 - WITHIN:
        return head + f"Reached: {said}."
    text = head + f"Not reached: the best within it, {said}."
    ses = [v[2] / math.sqrt(len(v[3])) for v in sampled.values() if len(v[3]) > 1]   # recovered share's SE
    if ses:
        close = [n for n, v in sampled.items() if len(v[3]) > 1 and abs(delta(v)[0]) <= 2 * delta(v)[1]]
        behind = [n for n, v in sampled.items() if len(v[3]) > 1 and delta(v)[0] > 2 * delta(v)[1]]
        best_se = best[2] / math.sqrt(len(best[3])) if len(best[3]) > 1 else float("inf")
        text += (f" With {len(SEEDS)} seeds the standard error of a sampled row's recovered share is "
                 f"{min(ses):.0f}-{max(ses):.0f} points here (one seed of a method moves it by up to "
                 f"{max(max(v[4]) - min(v[4]) for v in sampled.values()):.0f})"
                 + (f", so {WITHIN:.0f} points is below what this run length resolves" if 2 * best_se > WITHIN else "")
                 + ". Within 2 standard errors of the reference: "
                 + (", ".join(f"{n} ({sampled[n][0]:.1f} B)" for n in close) or "none")
                 + "; measurably behind it: " + (", ".join(f"{n} ({sampled[n][0]:.1f} B)" for n in behind) or "none")
                 + ".")
    text += (" The estimator is unbiased at every N: what more draws buy is a smaller variance per step, which "
             "AdamW's per-coordinate step turns into direction (*What Adam does with each gradient*, above).")
    tails = [(n, n + " + tail bucket") for n in sampled if n + " + tail bucket" in sampled]
    if tails:
        helped = [n for n, t in tails if sampled[t][1] > sampled[n][1]]
        text += (" The tail bucket " + ("helped " + ", ".join(helped) if helped else "did not help")
                 + ": " + "; ".join(f"{n} {sampled[n][1]:.0f} % without it, {sampled[t][1]:.0f} % with it"
                                    for n, t in tails) + ".")
    return text


def write_seeds(args, teacher: str, scale, runs: dict, labels: dict, results: dict) -> Path:
    ref = f"reference: top-{scale.reference_k} KD (tail)"
    base = results["CE only"]
    lines = [f"## Three seeds: sampled labels with and without a tail bucket ({Path(teacher).name})", "",
             f"Produced by `{args.command}` on {os.cpu_count()} CPU cores: the report's students (same teacher, text, "
             "student and steps as above), each method with seeds " + ", ".join(map(str, SEEDS)) + " (the student's "
             "initialisation and batch order). Seed 0 is this command's own student (the stage the full report shares); "
             "where the table above comes from an earlier run of the report its seed-0 rows can differ from these: at "
             "this run length a change in the code's arithmetic moves a student as a seed does. "
             "Recovered: (CE only - method) / (CE only - reference) in held-out CE, "
             "per seed against the same seed's CE-only and reference students. Δ CE: the method's held-out CE minus "
             "the reference's, seed-matched; **>2 SE** where its mean exceeds twice its standard error.", "",
             "| student | seeds | bytes/position | held-out CE | KL to teacher | ECE | recovered | per seed | "
             "Δ CE vs reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cov_pp = coverage_bytes(labels)   # label set -> its coverage column's bytes per position
    summary: dict = {}   # name -> (bytes/position, recovered mean, sd, seed-matched Δ CE, recovered per seed)
    for name, (_, _, bytes_of) in runs.items():
        got = results[name]
        if not got:
            lines.append(f"| {name} | 0 | | not run yet | | | | | |")
            continue
        seeds = sorted(got)
        stat = {key: mean_sd([got[s][key] for s in seeds]) for key in ("eval_ce", "eval_kl", "eval_ece")
                if all(got[s].get(key) is not None for s in seeds)}
        matched = [s for s in seeds if s in base and s in results[ref]]
        rec = [(base[s]["eval_ce"] - got[s]["eval_ce"]) / (base[s]["eval_ce"] - results[ref][s]["eval_ce"])
               for s in matched if base[s]["eval_ce"] - results[ref][s]["eval_ce"] > 1e-3]
        delta = [got[s]["eval_ce"] - results[ref][s]["eval_ce"] for s in matched]
        bpp = labels.get(bytes_of, {}) if bytes_of else {}
        bytes_pp = needed_bytes(bpp, runs[name][1], cov_pp.get(bytes_of, 0.0)) \
            if bpp and bpp.get("bytes_per_position") else None
        if bytes_pp is not None and rec:
            summary[name] = (bytes_pp, *(100 * v for v in mean_sd(rec)), delta, [100 * v for v in rec])
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
        bytes_cell = f"{bytes_pp:.1f}" if bytes_pp is not None else "—"
        lines.append(f"| {name} | {len(seeds)} | {bytes_cell} | {cells['eval_ce']} | {cells['eval_kl']} | "
                     f"{cells['eval_ece']} | {rec_cell} | {' / '.join(f'{100 * v:.0f}' for v in rec)} | {delta_cell} |")
    lines += ["", "Bytes/position are what each method needs stored: the sampled sets here carry the coverage column "
              "the tail bucket reads (`--encoding sampled_coverage=true`); the rows that do not read it count the set "
              "without that column (its compressed bytes, measured in the set, taken off: "
              + ", ".join(f"{n} {b:.2f} B" for n, b in cov_pp.items()) + ")."]
    lines += ["", goal(summary)]
    if any(len(results[name]) < len(SEEDS) for name in runs):
        lines += ["", f"Rows with fewer than {len(SEEDS)} seeds: the run was cut there; the same command finishes them "
                      "(finished stages are cached)."]
    lines.append("")
    report = Path(args.out) / "results.md"
    replace_section(report, SEEDS_MARK, "\n".join(lines))
    log(f"seeds table: {sum(len(r) for r in results.values())} students")
    return report
