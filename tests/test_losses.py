import math

import pytest
import torch

from student_train.losses import ramp, cross_entropy, full_kd, topk_kd


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
    with pytest.raises(ValueError, match="--kd-temperature: 2 cannot soften the mass outside the top k under --tail tail, "):
        topk_kd(student, ids, lp, cov, mask, tail="tail", temperature=2.0)


def test_alpha_schedule_is_linear_from_start_to_end():
    assert ramp(0, 1.0, 0.0, 0, 10) == 1.0
    assert ramp(5, 1.0, 0.0, 0, 10) == pytest.approx(0.5)
    assert ramp(10, 1.0, 0.0, 0, 10) == 0.0
    assert ramp(7, 0.3, None, 0, 10) == 0.3


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a parameter: the loss paths run on numbers chosen by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.logits)


def target_tail_case():
    """One window of 3 tokens, 2 predicted positions, V = 5, teacher top-2 = ids
    (0, 2) with p (0.5, 0.3): coverage 0.8, 0.2 missing. Position 0's next token
    is 2 (among the top-2), position 1's is 3 (not)."""
    z = [[2.0, 1.0, 0.0, -1.0, 0.5], [0.3, -0.2, 1.1, 0.4, -0.7], [0.0] * 5]   # the last position predicts nothing
    lp = [[math.log(0.5), math.log(0.3)]] * 2
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "targets": torch.tensor([[2, 3]]), "mask": torch.ones(1, 2, dtype=torch.bool),
             "topk_ids": torch.tensor([[[0, 2], [0, 2]]]), "topk_logprobs": torch.tensor([lp]),
             "coverage": torch.tensor([[0.8, 0.8]])}

    def q(row):
        e = [math.exp(x) for x in z[row]]
        return [x / sum(e) for x in e]
    # Position 0: the missing 0.2 joins token 2 -> p = {0: 0.5, 2: 0.5}.
    kl0 = 0.5 * math.log(0.5 / q(0)[0]) + 0.5 * math.log(0.5 / q(0)[2])
    # Position 1: token 3 gets a bucket of its own -> p = {0: 0.5, 2: 0.3, 3: 0.2}.
    kl1 = 0.5 * math.log(0.5 / q(1)[0]) + 0.3 * math.log(0.3 / q(1)[2]) + 0.2 * math.log(0.2 / q(1)[3])
    return z, batch, (kl0 + kl1) / 2


def test_the_missing_mass_on_the_actual_token_matches_a_hand_computed_kl_in_both_paths():
    from student_train.config import TrainConfig
    from student_train.hf import DistillLoss
    from student_train.objective import loss_step
    z, batch, expected = target_tail_case()
    direct = topk_kd(torch.tensor([z[:2]]), batch["topk_ids"], batch["topk_logprobs"], batch["coverage"],
                     batch["mask"], tail="target", targets=batch["targets"])
    assert direct.item() == pytest.approx(expected, rel=1e-5)
    cfg = TrainConfig(labels=("l",), student_config="s.json", out="o", tail="target", ce_weight=0.0)
    for settings in (cfg, DistillLoss(loss="kd", tail="target", ce_weight=0.0)):   # student-train, the Trainer API
        model = FixedLogits([z])
        kd = loss_step(model, batch, settings, alpha=0.0)["kd"]
        assert kd.item() == pytest.approx(expected, rel=1e-5), type(settings).__name__
        kd.backward()
        assert torch.isfinite(model.logits.grad).all() and model.logits.grad[0, 2].abs().sum() == 0
    # Where the teacher's top-k covers everything, the target gets nothing and the loss is the tail loss.
    full_cov = {**batch, "coverage": torch.tensor([[1.0, 1.0]])}
    args = (torch.tensor([z[:2]]), batch["topk_ids"], batch["topk_logprobs"], full_cov["coverage"], batch["mask"])
    assert topk_kd(*args, tail="target", targets=batch["targets"]).item() == \
        pytest.approx(topk_kd(*args, tail="tail").item(), rel=1e-5)


def test_target_tail_refuses_reverse_kl_a_temperature_and_missing_targets():
    from student_train.config import TrainConfig
    student, _, ids, lp, cov, mask = rand_case()
    with pytest.raises(ValueError, match="--kd-kind: must be forward or jsd with --tail target"):
        TrainConfig(labels=("l",), student_config="s.json", out="o", tail="target", kd_kind="reverse")
    with pytest.raises(ValueError, match="--kd-temperature: 2 cannot soften .* under --tail target, .* pass --tail renorm"):
        topk_kd(student, ids, lp, cov, mask, tail="target", temperature=2.0, targets=ids[..., 0])
    with pytest.raises(ValueError, match="needs the actual next tokens"):
        topk_kd(student, ids, lp, cov, mask, tail="target")
    jsd = topk_kd(student, ids, lp, cov, mask, kind="jsd", tail="target", targets=ids[..., 3])
    jsd.backward()
    assert jsd.item() > 0 and torch.isfinite(student.grad).all()


def test_expected_calibration_error_matches_a_hand_count_and_does_not_depend_on_batching():
    from student_train.losses import calibration_gaps, expected_calibration_error
    logit = lambda p: [math.log(p), math.log(1 - p)]   # top-1 probability p on token 0
    # top-1 prob 0.95 right, 0.95 wrong (bin 14), 0.6 right (bin 9), 0.55 wrong (bin 8), and a masked position.
    logits = torch.tensor([[logit(0.95), logit(0.95), logit(0.6), logit(0.55), logit(0.99)]])
    targets = torch.tensor([[0, 1, 0, 1, 1]])
    mask = torch.tensor([[True, True, True, True, False]])
    expected = abs(0.5 - 0.95) * 2 / 4 + abs(1 - 0.6) / 4 + abs(0 - 0.55) / 4
    assert expected_calibration_error(calibration_gaps(logits, targets, mask)) == pytest.approx(expected, rel=1e-5)
    # Split 1 + 3 positions: averaging the gaps by tokens gives the same error.
    first = calibration_gaps(logits[:, :1], targets[:, :1], mask[:, :1])
    rest = calibration_gaps(logits[:, 1:], targets[:, 1:], mask[:, 1:])
    assert expected_calibration_error((first * 1 + rest * 3) / 4) == pytest.approx(expected, rel=1e-5)


def test_on_policy_kd_matches_a_hand_computed_batch_with_a_clipped_and_an_unclipped_token():
    from student_train.losses import on_policy_kd
    # One row of 3 positions over a 3-token vocabulary; position 0 is a prompt position (not counted).
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[False, True, True]])
    logp1, logp2 = 1 - math.log(math.e + 2), 2 - math.log(math.e ** 2 + 2)        # log p(y) at positions 1, 2
    sampler = torch.tensor([[-9.0, logp1, logp2 - 0.5]])   # position 1 on-policy (r = 1); position 2: r = e^0.5
    teacher = torch.tensor([[-1.0, -0.5, -0.2]])
    loss, stats = on_policy_kd(logits, targets, teacher, sampler, mask, clip=0.2)
    a1, a2 = -0.5 - logp1, -0.2 - logp2                     # both > 0; r2 = 1.65 > 1.2: its term is clipped
    assert a1 > 0 and a2 > 0
    assert loss.item() == pytest.approx(-(1.0 * a1 + 1.2 * a2) / 2, abs=1e-6)
    assert stats["clipped"].item() == pytest.approx(0.5) and stats["advantage"].item() == pytest.approx((a1 + a2) / 2, abs=1e-6)
    assert stats["staleness"].item() == pytest.approx((0.0 - 0.5) / 2, abs=1e-6)   # mean of log p_old - log p
    loss.backward()
    soft1 = torch.softmax(torch.tensor([1.0, 0.0, 0.0]), -1)
    expected1 = -0.5 * 1.0 * a1 * (torch.tensor([1.0, 0.0, 0.0]) - soft1)    # d(-r A / 2)/dz = -(r A / 2)(onehot - softmax)
    assert torch.allclose(logits.grad[0, 1], expected1, atol=1e-6)
    assert torch.allclose(logits.grad[0, 2], torch.zeros(3))   # clipped: no gradient
    assert torch.allclose(logits.grad[0, 0], torch.zeros(3))   # prompt position: never counts
    # A token the teacher finds unlikely (A < 0) is pushed down even when r > 1 + clip: the min keeps r A.
    logits.grad = None
    teacher = torch.tensor([[-1.0, -0.5, -3.0]])
    loss, stats = on_policy_kd(logits, targets, teacher, sampler, mask, clip=0.2)
    a2 = -3.0 - logp2
    r2 = math.exp(0.5)
    assert loss.item() == pytest.approx(-(a1 + r2 * a2) / 2, abs=1e-6) and stats["clipped"].item() == 0
    loss.backward()
    soft2 = torch.softmax(torch.tensor([0.0, 2.0, 0.0]), -1)
    assert torch.allclose(logits.grad[0, 2], -0.5 * r2 * a2 * (torch.tensor([0.0, 1.0, 0.0]) - soft2), atol=1e-6)
