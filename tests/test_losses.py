import math

import pytest
import torch

from student_train.losses import alpha_at, cross_entropy, full_kd, topk_kd


def rand_case(B=2, T=5, V=11, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g) * 2
    t_lp = torch.log_softmax(teacher, -1)
    top = t_lp.topk(K, -1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    return student, teacher, top.indices, top.values, top.values.exp().sum(-1), mask


def brute(student, teacher_lp_full, ids, kind, tail, T=1.0, beta=0.5):
    """Loop-per-position reference with plain Python math."""
    B, L, V = student.shape
    out = []
    for b in range(B):
        for t in range(L):
            s = [float(x) / T for x in student[b, t]]
            tl = [float(teacher_lp_full[b, t, i]) for i in ids[b, t]]
            if tail == "renorm":
                zt = [x / T for x in tl]
                p = [math.exp(x) / sum(math.exp(y) for y in zt) for x in zt]
                zs = [s[i] for i in ids[b, t]]
                q = [math.exp(x) / sum(math.exp(y) for y in zs) for x in zs]
            else:
                p = [math.exp(x) for x in tl]
                p.append(max(0.0, 1 - sum(p)))
                full = [math.exp(x) / sum(math.exp(y) for y in s) for x in s]
                q = [full[i] for i in ids[b, t]]
                q.append(1 - sum(q))
            if kind == "forward":
                d = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
            elif kind == "reverse":
                d = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q) if qi > 0)
            else:
                m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
                d = beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0) + \
                    (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0)
            out.append(d)
    return torch.tensor(out).reshape(B, L)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tail", ["renorm", "tail"])
def test_topk_kd_matches_a_brute_force_reference(kind, tail):
    student, teacher, ids, lp, cov, mask = rand_case()
    T = 2.0 if tail == "renorm" else 1.0
    got = topk_kd(student, ids, lp, cov, mask, kind=kind, tail=tail, temperature=T, beta=0.3)
    ref = brute(student.detach(), torch.log_softmax(teacher, -1), ids, kind, tail, T=T, beta=0.3)
    expected = (ref * mask).sum() / mask.sum() * T ** 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_topk_kl_equals_full_kl_when_k_is_vocab():
    student, teacher, _, _, _, mask = rand_case(K=11)
    t_lp = torch.log_softmax(teacher, -1)
    top = t_lp.topk(11, -1)
    full = full_kd(student, teacher, mask)
    for tail in ("renorm", "tail"):
        k = topk_kd(student, top.indices, top.values, top.values.exp().sum(-1), mask, tail=tail)
        assert k.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)


def test_cross_entropy_matches_torch():
    student, _, _, _, _, mask = rand_case()
    targets = torch.randint(0, 11, (2, 5))
    ref = torch.nn.functional.cross_entropy(student[mask], targets[mask])
    assert cross_entropy(student, targets, mask).item() == pytest.approx(ref.item(), rel=1e-6)


def test_losses_are_zero_with_a_gradient_when_everything_is_masked():
    student, teacher, ids, lp, cov, mask = rand_case()
    none = torch.zeros_like(mask)
    for loss in (topk_kd(student, ids, lp, cov, none), topk_kd(student, ids, lp, cov, none, tail="tail"),
                 cross_entropy(student, ids[..., 0], none), full_kd(student, teacher, none)):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(student.grad).all()


def test_gradients_are_finite_with_empty_slots_and_full_coverage():
    student, teacher, ids, lp, cov, mask = rand_case()
    lp = lp.clone()
    lp[0, 0, 2:] = -float("inf")        # fewer than K real entries
    cov = cov.clone()
    cov[0, 1] = 1.0                     # nothing outside the top-k
    for kind in ("forward", "reverse", "jsd"):
        for tail in ("renorm", "tail"):
            student.grad = None
            loss = topk_kd(student, ids, lp, cov, mask, kind=kind, tail=tail)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(student.grad).all(), (kind, tail)


def test_empty_slots_count_on_neither_side():
    """A position with fewer real entries than K (adaptive truncation) gives the
    loss it would give stored with just those entries: the student's logits at
    the empty slots' filler ids are left out of its side too."""
    student, _, ids, lp, cov, mask = rand_case()
    padded = lp.clone()
    padded[..., 3:] = -float("inf")
    for kind in ("forward", "reverse", "jsd"):
        for tail in ("renorm", "tail"):
            short = topk_kd(student, ids[..., :3], lp[..., :3], cov, mask, kind=kind, tail=tail)
            full = topk_kd(student, ids, padded, cov, mask, kind=kind, tail=tail)
            assert full.item() == pytest.approx(short.item(), rel=1e-5, abs=1e-6), (kind, tail)


def test_tail_refuses_a_temperature():
    student, _, ids, lp, cov, mask = rand_case()
    with pytest.raises(ValueError, match="temperature must be 1 with --tail tail"):
        topk_kd(student, ids, lp, cov, mask, tail="tail", temperature=2.0)


def test_alpha_schedule_is_linear_from_start_to_end():
    assert alpha_at(0, 1.0, 0.0, 0, 10) == 1.0
    assert alpha_at(5, 1.0, 0.0, 0, 10) == pytest.approx(0.5)
    assert alpha_at(10, 1.0, 0.0, 0, 10) == 0.0
    assert alpha_at(7, 0.3, None, 0, 10) == 0.3
