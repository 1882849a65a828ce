"""Each distillation loss against CE on the same student logits, measured side
by side in one run: forward + backward time (ratio to CE) and, under bf16,
the difference from the fp32 value. Synthetic logits and labels of the
shapes a real student sees (teacher-like top-k from a second random model).

    python benchmarks/bench_losses.py [--device cuda] [--vocab 49152] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from student_train import losses


def make_batch(B: int, T: int, V: int, k: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    teacher = torch.randn(B, T, V, generator=g) * 3
    lp = torch.log_softmax(teacher, -1)
    top = lp.topk(k, dim=-1)
    probs = lp.exp().reshape(-1, V)
    draws = torch.multinomial(probs, 50, replacement=True, generator=g).reshape(B, T, 50)
    targets = torch.multinomial(probs, 1, generator=g).reshape(B, T)
    return {k_: v.to(device) for k_, v in dict(
        student=torch.randn(B, T, V, generator=g), topk_ids=top.indices, topk_logprobs=top.values,
        coverage=top.values.exp().sum(-1), targets=targets, sampled_ids=draws,
        sampled_weights=torch.full(draws.shape, 1 / 50), teacher_target=lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        sampler_logprob=lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - 0.1,
        mask=torch.ones(B, T, dtype=torch.bool)).items()}


def cases(b: dict) -> dict:
    m = b["mask"]
    return {
        "CE": lambda z: losses.cross_entropy(z, b["targets"], m),
        "top-64 KD (tail)": lambda z: losses.topk_kd(z, b["topk_ids"], b["topk_logprobs"], b["coverage"], m, tail="tail"),
        "top-64 KD (renorm)": lambda z: losses.topk_kd(z, b["topk_ids"], b["topk_logprobs"], b["coverage"], m),
        "top-64 KD (target)": lambda z: losses.topk_kd(z, b["topk_ids"], b["topk_logprobs"], b["coverage"], m,
                                                       tail="target", targets=b["targets"]),
        "sampled KD (N=50)": lambda z: losses.sampled_kd(z, b["sampled_ids"], b["sampled_weights"], m),
        "on-policy KD": lambda z: losses.on_policy_kd(z, b["targets"], b["teacher_target"], b["sampler_logprob"], m)[0],
        "calibration bins (eval_ece)": lambda z: losses.calibration_gaps(z, b["targets"], m).abs().sum(),
    }


def timed(fn, logits: torch.Tensor, reps: int) -> tuple[float, float]:
    """(seconds per forward + backward, loss value)."""
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    for _ in range(2):
        z = logits.detach().requires_grad_(True)
        fn(z).backward()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        z = logits.detach().requires_grad_(True)
        value = fn(z)
        if value.requires_grad:
            value.backward()
    sync()
    return (time.perf_counter() - t0) / reps, float(value.detach())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    b = make_batch(args.batch, args.seq, args.vocab, 64, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}; logits [{args.batch}, {args.seq}, {args.vocab:,}]; forward + backward of the loss alone\n")
    print("| loss | fp32 ms | x CE | bf16 logits ms | x CE | bf16 - fp32 value |\n|---|---:|---:|---:|---:|---:|")
    base = {}
    for label, fn in cases(b).items():
        t32, v32 = timed(fn, b["student"].float(), args.reps)
        t16, v16 = timed(fn, b["student"].bfloat16(), args.reps)
        base = base or {"fp32": t32, "bf16": t16}
        print(f"| {label} | {t32 * 1e3:.2f} | {t32 / base['fp32']:.2f} | {t16 * 1e3:.2f} | {t16 / base['bf16']:.2f} | "
              f"{v16 - v32:+.2e} |")


if __name__ == "__main__":
    main()
