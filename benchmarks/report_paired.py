"""The paired study: which labels to store, told apart with confidence
intervals. Every method of a comparison trains, per seed, from the same
initialisation and the same batch order (the label sets share their row-group
layout, so the loader's keyed shuffle deals the same windows in the same
order: checked by the "pairing" stage), so what is reported is each method's
per-seed difference from the reference (KD on the stored top-4096) and from CE
only, with a 95 % t interval over seeds.

    bash jobs/report.sh --smollm2 --paired               # resumable; stages cached
    bash jobs/report.sh --smollm2 --paired --cached-only # the tables from the stages finished so far

Three parts, run in this order (each seed-major, so a cut run has whole seeds):
  small   -- the report's student (2 layers x 128, tied: the embedding is 94 % of it), 100 steps;
  weak    -- the weak-teacher claim: a teacher smaller and weaker than the student (a 2 x 64 model
             trained briefly on the labelled text with SmolLM2's tokenizer) labels the same text;
             students train with CE only and with CE + KD at several mixes, beside the same mixes
             from SmolLM2-135M-Instruct;
  large   -- a student whose transformer body outweighs its embedding (LARGE below), trained
             until its held-out CE flattens, for the decisive rows.

Finished stages are also written to benchmarks/evidence/paired/ (small JSON
files, committed), so the study goes on across machines: a later run reads
them back and only runs what is missing (a label set whose directory is gone
is made again when a student still needs it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from report_kit import (FULL, PAIRED_MARK, QUICK, STUDENT, Stages, label_specs, log, make_label_set, replace_section,
                        slug, split_text, train_student)
ARCHIVE = Path(__file__).resolve().parent / "evidence" / "paired"
SEEDS = 5


def aligned_rows(k_ref: int, max_seq_len: int) -> int:
    """Rows a row group of every training set holds: as many full top-`k_ref` rows as stay under the writer's
    ROW_GROUP_VALUES (ids and logprobs of every position, and the per-position columns), so the values limit never
    cuts a group early and every set has the same row groups. (8 did not: top-4096 groups were cut at 5 rows.)"""
    from labelgen.shards.writer import ROW_GROUP_VALUES
    per_row = 2 * (max_seq_len - 1) * k_ref + 4 * max_seq_len
    return max(1, min(128, (ROW_GROUP_VALUES - 1) // per_row))

# The student whose body outweighs its embedding: 24 layers of 192 (d_ff 512, head_dim 64) hold 10.6M parameters
# against a tied embedding of 49,152 x 192 = 9.4M (53 % body). Of the shapes timed on 2 cores (fwd + bwd + AdamW,
# 8 x 256 tokens) it was the cheapest with the body ahead: 3.1 s/step (2 x 128: 1.6 s; 20 x 256: 5.7 s;
# 12 x 320: 4.0 s with the body behind; 40 x 128: 3.0 s, 56 % body, but 40 layers of width 128).
LARGE = {"model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 24,
         "num_attention_heads": 3, "num_key_value_heads": 3, "max_position_embeddings": 1024,
         "tie_word_embeddings": True}
WEAK = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 1024,
        "tie_word_embeddings": True}

METHODS = {   # name -> (label set, TrainConfig settings)
    "CE only": ("tokens", dict(loss="ce")),
    "reference: top-4096 (tail)": ("top4096", dict(loss="kd", tail="tail")),
    "sampled N=12": ("sampled12", dict(loss="kd")),
    "sampled N=50": ("sampled50", dict(loss="kd")),
    "top-64 (target)": ("top4096", dict(loss="kd", k=64, tail="target")),
    "top-64 (tail)": ("top4096", dict(loss="kd", k=64, tail="tail")),
}
BYTES_OF = {"reference: top-4096 (tail)": "top4096", "sampled N=12": "sampled12 (bytes)",
            "sampled N=50": "sampled50 (bytes)",
            "top-64 (target)": "top64 (bytes)", "top-64 (tail)": "top64 (bytes)"}
REF, CE = "reference: top-4096 (tail)", "CE only"
# The comparisons the choice of what to store turns on: (a, b) reports a - b.
PAIRS = [("sampled N=12", "sampled N=50"), ("sampled N=50", "top-64 (target)"), ("sampled N=12", "top-64 (target)"),
         ("top-64 (target)", "top-64 (tail)"), ("sampled N=50", REF), ("sampled N=12", REF),
         ("top-64 (target)", REF), ("top-64 (tail)", REF)]
# The weak-teacher mixes: ce_weight (and a schedule ce_weight -> ce_weight_end over the run). SmolLM2's
# ce_weight 0 is the small part's reference student (the same run), CE only the small part's CE only.
MIXES = {"ce_weight 0 (KD only)": dict(ce_weight=0.0), "ce_weight 0.5": dict(ce_weight=0.5),
         "ce_weight 0.9": dict(ce_weight=0.9), "ce_weight 0 -> 1": dict(ce_weight=0.0, ce_weight_end=1.0)}


@dataclasses.dataclass(frozen=True)
class Student:
    name: str
    config: dict
    steps: int
    lr: float
    evals: int   # held-out evaluations over the run (the curve's points)


def students(quick: bool) -> dict[str, Student]:
    if quick:
        return {"small": Student("small", STUDENT, 4, 3e-3, 2), "large": Student("large", STUDENT, 4, 1e-3, 2)}
    return {"small": Student("small", STUDENT, 100, 3e-3, 5), "large": Student("large", LARGE, 200, 1e-3, 10)}


def body_share(config: dict, vocab: int) -> dict:
    """Parameters of a student config split into its (tied) embedding and its transformer body."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, "vocab_size": vocab}))
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    if not config.get("tie_word_embeddings"):
        emb += model.get_output_embeddings().weight.numel()
    return {"parameters": total, "embedding": emb, "body": total - emb}


# -- statistics ----------------------------------------------------------------------------------------------------

# Student's t, two-sided 95 %: t_{0.975, df} for df = 1..30 (beyond, the normal's 1.96 within 2 %).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, 95 % half-width, sd) of paired differences; half-width nan for one value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, t975(n - 1) * sd / math.sqrt(n), sd


def seeds_for(sd: float, half: float) -> int | None:
    """Seeds a paired difference of spread `sd` needs for a 95 % half-width of `half`."""
    if not sd == sd:
        return None
    n = 2
    while t975(n - 1) * sd / math.sqrt(n) > half:
        n += 1
        if n > 10_000:
            return None
    return n


# -- stages --------------------------------------------------------------------------------------------------------

class ArchivedStages(Stages):
    """Stages cached in the work directory and mirrored to ARCHIVE (committed): a stage found in either is done."""

    def __init__(self, work: Path, total: int, archive: Path):
        super().__init__(work, total)
        self.archive = archive

    def __call__(self, name, fn, cached_only=False, rerun=None):
        here, kept = self.dir / f"{slug(name)}.json", self.archive / f"{slug(name)}.json"
        if not here.is_file() and kept.is_file():
            shutil.copyfile(kept, here)
        if here.is_file() and rerun is not None and rerun(json.loads(here.read_text())):
            here.unlink()   # cached, but what it made is gone and is needed again
        result = super().__call__(name, fn, cached_only)
        if result is not None and here.is_file() and not kept.is_file():
            self.archive.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(here, kept)
        return result


def train_one(labels: dict, set_name: str, kw: dict, out: Path, eval_dir: str, scale, st: Student,
              student_json: Path, seed: int) -> dict:
    """One student of `st`'s size, steps and learning rate, resumable from its last checkpoint (report_kit's)."""
    return train_student(labels, set_name, {**kw, "seed": seed}, out, eval_dir,
                         dataclasses.replace(scale, student_steps=st.steps), student_json, lr=st.lr, evals=st.evals)


def batch_digest(label_dir: str, seed: int, batch_size: int, n: int = 6) -> str:
    """sha256 of the input ids of the first `n` training batches a seed deals from a label set."""
    import hashlib
    from student_train.data import LabelStream, open_label_sets, take_batches
    h = hashlib.sha256()
    stream = LabelStream(open_label_sets([label_dir]), batch_size, seed=seed)
    for batch in take_batches(stream, n):
        h.update(batch["input_ids"].numpy().tobytes())
    return h.hexdigest()


def run_paired(args, teacher: str, work: Path) -> Path:
    scale = QUICK if args.quick else FULL
    sts = students(args.quick)
    n_seeds = args.paired_seeds or SEEDS
    archive = Path(args.archive) if args.archive else (ARCHIVE if not args.quick else work / "archive")
    split = split_text(scale, work)
    specs = label_specs(split["files"], scale)
    text = specs["tokens"]["inputs"]
    k_ref = scale.reference_k
    aligned = {"encoding": {"row_group_rows": aligned_rows(k_ref, scale.max_seq_len)}}
    sets = {"tokens": {**specs["tokens"], **aligned}, "top4096": {**specs[f"top{k_ref}"], **aligned},
            "sampled12": dict(inputs=text, mode="sampled", draws=12, **aligned),
            "sampled50": dict(inputs=text, mode="sampled", draws=50, **aligned),
            "eval": specs["eval"], "top64 (bytes)": specs["top64 (bytes)"],
            "sampled12 (bytes)": dict(inputs=specs["top64 (bytes)"]["inputs"], mode="sampled", draws=12),
            "sampled50 (bytes)": dict(inputs=specs["top64 (bytes)"]["inputs"], mode="sampled", draws=50)}
    total = len(sets) + 6 + n_seeds * (len(METHODS) * 2 + 2 * len(MIXES) - 1)
    stage = ArchivedStages(work, total, archive)
    labels: dict = {}
    gone = lambda r: not (Path(r["dir"]) / "manifest.json").is_file()   # noqa: E731

    def label_set(name: str, teacher_dir: str = teacher, spec: dict | None = None, need: bool = True):
        if name not in labels:
            labels[name] = stage(f"paired labels: {name}", lambda: make_label_set(
                teacher_dir, work / "labels" / slug(name), spec or sets[name], scale), args.cached_only,
                rerun=gone if need else None)
        return labels[name]

    for st in sts.values():
        path = work / f"student_{st.name}.json"
        if not path.is_file():
            path.write_text(json.dumps(st.config))
    results: dict = {}   # (part, method, seed) -> stage result

    def student(part: str, st: Student, method: str, set_name: str, kw: dict, seed: int):
        key = f"paired {part}: {method}, seed {seed}"
        done_before = (stage.dir / f"{slug(key)}.json").is_file() or (archive / f"{slug(key)}.json").is_file()
        if not done_before and (args.cached_only or label_set(set_name) is None or label_set("eval") is None):
            stage.done += 1
            return None
        r = stage(key, lambda: {**train_one(labels, set_name, {k: v for k, v in kw.items()}, work / "students" / slug(key),
                                            labels["eval"]["dir"], scale, st, work / f"student_{st.name}.json", seed),
                                "digest": batch_digest(labels[set_name]["dir"], seed, scale.batch_size)},
                  args.cached_only)
        if r is not None:
            results[(part, method, seed)] = r
        return r

    if not args.cached_only:   # the design's premise, checked before a student trains on it
        digests = {name: stage(f"paired pairing: {name}", lambda name=name: {"digest": batch_digest(
            label_set(name)["dir"], 0, scale.batch_size)})["digest"] for name in ("tokens", "top4096", "sampled12",
                                                                                  "sampled50")}
        if len(set(digests.values())) > 1:
            raise SystemExit(f"the training label sets deal different batches for one seed ({digests}): their row "
                             "groups differ, so the methods would not be paired; nothing trained")
    parts = args.paired_parts or ["small", "weak", "large"]
    # byte sets first (cheap), so the table has its bytes column whatever else is cached
    for name in dict.fromkeys(BYTES_OF.values()):   # the reference's is its training set's, read from its stage
        label_set(name, need=False)
    if "small" in parts:
        for seed in range(n_seeds):
            for method, (set_name, kw) in METHODS.items():
                student("small", sts["small"], method, set_name, kw, seed)
    weak_dir = None
    if "weak" in parts:
        # made on another machine, its checkpoint is not here: trained again (same seed, same batches)
        weak = stage("paired weak teacher", lambda: train_weak_teacher(labels, label_set, work, scale, args.quick),
                     args.cached_only, rerun=None if args.cached_only else lambda r: not Path(r["teacher"]).is_dir())
        weak_dir = weak["teacher"] if weak is not None else None
        for seed in range(n_seeds):
            for mix, kw in MIXES.items():
                if kw != {"ce_weight": 0.0}:
                    student("weak", sts["small"], f"SmolLM2 top-4096, {mix}", "top4096",
                            dict(loss="kd", tail="tail", **kw), seed)
                if weak_dir:
                    label_set("weak top4096", weak_dir, {**sets["top4096"]})
                    student("weak", sts["small"], f"weak teacher top-4096, {mix}", "weak top4096",
                            dict(loss="kd", tail="tail", **kw), seed)
    if "large" in parts:
        for seed in range(n_seeds):
            for method, (set_name, kw) in METHODS.items():
                student("large", sts["large"], method, set_name, kw, seed)
    split_info = {st.name: body_share(st.config, 49152 if not args.quick else _vocab(teacher)) for st in sts.values()}
    weak_info = stage.dir / "paired_weak_teacher.json"
    weak_info = json.loads(weak_info.read_text()) if weak_info.is_file() else None
    return write_paired(args, teacher, scale, sts, labels, results, split_info, weak_info, n_seeds)


def _vocab(teacher: str) -> int:
    return json.loads((Path(teacher) / "config.json").read_text())["vocab_size"]


def train_weak_teacher(labels: dict, label_set, work: Path, scale, quick: bool) -> dict:
    """The weak teacher: WEAK trained with CE on the labelled text (the tokens set: SmolLM2's tokenizer)."""
    steps = 4 if quick else 150
    st = Student("weak", WEAK, steps, 3e-3, 2)
    path = work / "student_weak.json"
    path.write_text(json.dumps(WEAK))
    label_set("tokens")
    label_set("eval")
    r = train_one(labels, "tokens", dict(loss="ce"), work / "weak_teacher", labels["eval"]["dir"], scale, st, path, 0)
    return {"teacher": r["checkpoint"], "steps": steps, "final": r["final"], "curve": r["curve"]}


# -- the tables ----------------------------------------------------------------------------------------------------

def fmt_ci(m: float, h: float, spec: str, unit: str = "") -> str:
    """`m ± h`: the mean in `spec` (a sign where it asks for one), the half-width without a sign."""
    return f"{m:{spec}}{unit}" if h != h else f"{m:{spec}} ± {h:{spec.lstrip('+')}}{unit}"


def write_paired(args, teacher: str, scale, sts: dict, labels: dict, results: dict, split_info: dict,
                 weak_info: dict | None, n_seeds: int) -> Path:
    name = Path(teacher).name
    lines = [f"## Paired seeds: which labels to store ({name})", "",
             f"Produced by `{args.command}` (benchmarks/report_paired.py; stage results in "
             "benchmarks/evidence/paired/) on 2 CPU cores. Teacher: " + name + "; text: the Python standard "
             "library's source, the first 50 files cut to 4,000 characters labelled, evaluated on the teacher's "
             "top-4096 of 8 held-out files (as above). **Paired**: per seed, every method trains from the same "
             "initialisation and the same batch order (its label set has the same row groups; the digest of each "
             "student's first 6 batches is compared below), so each figure is a mean over seeds of a per-seed "
             "difference, ± its 95 % t interval. Recovered share: (CE only − method) / (CE only − reference) in "
             "held-out CE, per seed.", ""]
    for part, st in sts.items():
        if part == "weak":
            continue
        got = {m: {s: results[(part, m, s)] for s in range(n_seeds) if (part, m, s) in results} for m in METHODS}
        sp = split_info[part]
        lines += [f"### {'Small' if part == 'small' else 'Larger'} student: {st.config['num_hidden_layers']} layers "
                  f"x {st.config['hidden_size']}, {st.steps} steps (lr {st.lr:g})", "",
                  f"{sp['parameters'] / 1e6:.1f}M parameters: embedding (tied) {sp['embedding'] / 1e6:.1f}M, "
                  f"body {sp['body'] / 1e6:.1f}M ({100 * sp['body'] / sp['parameters']:.0f} % of the student). "
                  f"Batches of {scale.batch_size} windows of {scale.max_seq_len} tokens.", ""]
        lines += method_table(got, labels, n_seeds)
        lines += pair_table(got)
        lines += pairing_check(got)
        if part == "large":
            lines += curves_note(got, args.out)
    if any(k[0] == "weak" for k in results):
        lines += weak_table(results, n_seeds, weak_info, sts["small"])
    lines.append("")
    report = Path(args.out) / "results.md"
    replace_section(report, PAIRED_MARK, "\n".join(lines))
    log(f"paired tables: {len(results)} students")
    return report


def recovered(got: dict, m: str, s: int) -> float | None:
    ce, ref = got[CE].get(s), got[REF].get(s)
    if ce is None or ref is None or s not in got[m]:
        return None
    gap = ce["final"]["eval_ce"] - ref["final"]["eval_ce"]
    return 100 * (ce["final"]["eval_ce"] - got[m][s]["final"]["eval_ce"]) / gap if gap > 1e-3 else None


def method_table(got: dict, labels: dict, n_seeds: int) -> list[str]:
    lines = ["| method | seeds | bytes/position | held-out CE | recovered (points) | vs reference (nats) | "
             "vs CE only (nats) | seeds for ±3 points |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        seeds = sorted(got[m])
        if not seeds:
            lines.append(f"| {m} | 0 | | not run yet | | | | |")
            continue
        ce_m = ci([got[m][s]["final"]["eval_ce"] for s in seeds])
        rec = [r for s in seeds if (r := recovered(got, m, s)) is not None]
        rec_ci = ci(rec) if rec else None
        vs_ref = [got[m][s]["final"]["eval_ce"] - got[REF][s]["final"]["eval_ce"] for s in seeds if s in got[REF]]
        vs_ce = [got[m][s]["final"]["eval_ce"] - got[CE][s]["final"]["eval_ce"] for s in seeds if s in got[CE]]
        b = labels.get(BYTES_OF.get(m, ""))
        bcell = f"{b['bytes_per_position']:.1f}" if b and b.get("bytes_per_position") else "—"
        need = seeds_for(rec_ci[2], 3.0) if rec_ci and m not in (REF, CE) else None
        lines.append(f"| {m} | {len(seeds)} | {bcell} | {fmt_ci(ce_m[0], ce_m[1], '.3f')} | "
                     + (fmt_ci(rec_ci[0], rec_ci[1], '.1f') if rec_ci and m not in (REF, CE) else "—") + " | "
                     + (fmt_ci(*ci(vs_ref)[:2], '+.3f') if vs_ref and m != REF else "—") + " | "
                     + (fmt_ci(*ci(vs_ce)[:2], '+.3f') if vs_ce and m != CE else "—") + " | "
                     + (str(need) if need else "—") + " |")
    return lines + [""]


def pair_table(got: dict) -> list[str]:
    lines = ["The comparisons the choice turns on (a − b, paired by seed; positive points: a keeps more of the "
             "reference's gain; positive nats: a's held-out CE is higher, i.e. worse):", "",
             "| a − b | seeds | recovered (points) | held-out CE (nats) | resolved to ±3 points | seeds for ±3 points |",
             "|---|---:|---:|---:|---|---:|"]
    for a, b in PAIRS:
        seeds = [s for s in sorted(got[a]) if s in got[b]]
        if not seeds:
            continue
        if b == REF:
            pts = [r - 100 for s in seeds if (r := recovered(got, a, s)) is not None]
        else:
            pts = [ra - rb for s in seeds if (ra := recovered(got, a, s)) is not None
                   and (rb := recovered(got, b, s)) is not None]
        nats = [got[a][s]["final"]["eval_ce"] - got[b][s]["final"]["eval_ce"] for s in seeds]
        p, n = ci(pts) if pts else (float("nan"),) * 3, ci(nats)
        resolved = "yes" if p[1] <= 3.0 else ("no" if p[1] == p[1] else "—")
        need = seeds_for(p[2], 3.0)
        lines.append(f"| {a} − {b} | {len(seeds)} | {fmt_ci(p[0], p[1], '+.1f')} | {fmt_ci(n[0], n[1], '+.3f')} | "
                     f"{resolved} | {need or '—'} |")
    return lines + [""]


def pairing_check(got: dict) -> list[str]:
    """One line: whether every method of a seed read the same first batches (same digest)."""
    by_seed: dict = {}
    for m, runs in got.items():
        for s, r in runs.items():
            by_seed.setdefault(s, set()).add(r.get("digest"))
    bad = [s for s, d in by_seed.items() if len(d) > 1]
    return [("Pairing check: every method of a seed read the same first 6 batches (input-id digest) — "
             + ("all seeds." if not bad else f"**not** for seeds {bad}.")), ""]


def curves_note(got: dict, out: str) -> list[str]:
    """The larger student's held-out CE curves (one line per method, mean over seeds) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = 0
    flat = []
    for m, runs in got.items():
        if not runs:
            continue
        steps = [p[0] for p in next(iter(runs.values()))["curve"]]
        mean = [sum(r["curve"][i][1] for r in runs.values() if len(r["curve"]) > i) / len(runs) for i in range(len(steps))]
        ax.plot(steps, mean, marker=".", label=f"{m} ({len(runs)} seeds)")
        drawn += 1
        if len(mean) >= 3:
            flat.append((m, mean[-3] - mean[-1], mean[0] - mean[-1]))
    if not drawn:
        plt.close(fig)
        return []
    ax.set_xlabel("step")
    ax.set_ylabel("held-out CE (nats/token)")
    ax.set_title("larger student: held-out CE, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "results_paired_large_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    text = ("How flat the curves end: the fall over the last two evaluations as a share of the whole fall — "
            + "; ".join(f"{m} {100 * d / t:.0f} %" for m, d, t in flat if t > 0) + ".")
    return [f"![larger student: held-out CE]({path.name})", "", text, ""]


def weak_table(results: dict, n_seeds: int, weak_info: dict | None, st: Student) -> list[str]:
    runs: dict = {}
    for (part, m, s), r in results.items():
        if part == "weak":
            runs.setdefault(m, {})[s] = r
        elif part == "small" and m in (CE, REF):   # the same runs: CE only, and SmolLM2's KD at ce_weight 0
            runs.setdefault(CE if m == CE else "SmolLM2 top-4096, ce_weight 0 (KD only)", {})[s] = r
    ce = runs.get("CE only", {})
    lines = ["### The weak-teacher claim", ""]
    if weak_info:
        lines += [f"Weak teacher: Llama {WEAK['num_hidden_layers']} x {WEAK['hidden_size']} "
                  f"({body_share(WEAK, 49152)['parameters'] / 1e6:.1f}M parameters), trained {weak_info['steps']} "
                  f"steps with CE on the labelled text (SmolLM2's tokenizer); held-out CE "
                  f"{weak_info['final']['eval_ce']:.3f} nats, against SmolLM2-135M-Instruct's 2.363. Students: the "
                  f"small student above ({body_share(st.config, 49152)['parameters'] / 1e6:.1f}M parameters, "
                  f"{st.steps} steps), KD on each teacher's stored top-4096 with the tail bucket, mixed with CE as "
                  "ce_weight x CE + (1 − ce_weight) x KD (`--ce-weight`; the schedule moves it linearly over the run, "
                  "`--ce-weight-end`). Difference from CE only of the same seed (negative: KD helped).", ""]
    lines += ["| teacher, mix | seeds | held-out CE | vs CE only (nats) | helps? |", "|---|---:|---:|---:|---|"]
    for m in ["CE only"] + [f"{t}, {mix}" for t in ("weak teacher top-4096", "SmolLM2 top-4096") for mix in MIXES]:
        got = runs.get(m, {})
        if not got:
            lines.append(f"| {m} | 0 | not run yet | | |")
            continue
        seeds = sorted(got)
        ce_m = ci([got[s]["final"]["eval_ce"] for s in seeds])
        d = [got[s]["final"]["eval_ce"] - ce[s]["final"]["eval_ce"] for s in seeds if s in ce]
        dc = ci(d) if d and m != "CE only" else None
        helps = "—" if not dc or dc[1] != dc[1] else ("yes" if dc[0] + dc[1] < 0 else "no" if dc[0] - dc[1] > 0
                                                      else "not resolved")
        lines.append(f"| {m} | {len(seeds)} | {fmt_ci(ce_m[0], ce_m[1], '.3f')} | "
                     + (fmt_ci(dc[0], dc[1], '+.3f') if dc else "—") + f" | {helps} |")
    return lines + [""]
