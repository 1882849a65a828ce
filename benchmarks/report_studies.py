"""The studies of the real-teacher report (report_teacher.py) beyond its
method table: the gradient and optimizer studies (why sampled labels lose at
few draws), the tail study (where the missing mass goes) and the
cross-tokenizer runs (a student with its own tokenizer)."""

from __future__ import annotations

import math
from pathlib import Path

from report_kit import RealScale, slug, train_student


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

CROSS_METHODS = (("CE only", "reference", dict(loss="ce")),
                 ("top-64 KD (tail), alpha=0.5", "reference", dict(loss="kd", k=64, ce_weight=0.5)),
                 ("sampled KD (N=12), alpha=0.5", "sampled12", dict(loss="kd", ce_weight=0.5)))
CROSS_STAGES = len(CROSS_METHODS) + 1   # and the share of aligned positions


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
    ref = f"top{scale.reference_k}"
    out = {}
    for method, label_set, kw in CROSS_METHODS:
        label_dir = labels[ref if label_set == "reference" else label_set]["dir"]
        name = f"own tokenizer: {method}"
        out[name] = stage(name, lambda label_dir=label_dir, kw=kw, name=name: train_student(
            {"set": {"dir": label_dir}}, "set", {**kw, "student_tokenizer": str(own)}, work / "students" / slug(name),
            eval_dir, scale, student_json))

    def aligned_share():
        x = CrossTokenizer(load_tokenizer_for(None, Path(labels[ref]["dir"])), load_tokenizer_for(None, own, "--student-tokenizer"))
        aligned = counted = 0
        for batch, _ in LabelStream(open_label_sets([eval_dir]), 8, shuffle=False, max_epochs=1, cross=x, k=64):
            aligned, counted = aligned + int(batch["kd_mask"].sum()), counted + int(batch["mask"].sum())
        return {"aligned": aligned / max(counted, 1), "vocab": len(load_tokenizer_for(None, own, "--student-tokenizer"))}
    out["alignment"] = stage("own tokenizer: aligned positions", aligned_share)
    return out
