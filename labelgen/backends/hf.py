"""transformers teacher backend: CPU or GPU, fp32 on CPU and bf16 on GPU.

Scoring runs the decoder body once per batch, then the LM head over the
scored positions in chunks, in fp32: top-k, logsumexp, the actual token's
logit and its rank are computed on the device chunk by chunk, so a full
[batch, seq, vocab] log-softmax never exists and only [positions, k] tensors
cross to the host. Sampling is a KV-cached loop with one RNG stream per
request (Gumbel-max), so a completion depends only on its own seed.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from labelgen.backends import Completion, Sampled, SampleRequest, TopK
from labelgen.backends.tensor_parallel import DRAW, LOAD, SCORE
from labelgen.errors import OptionError, one_line

# Bytes of fp32 logits materialised at once by the chunked head. On CPU a
# small chunk is what matters: a large allocation is fresh, page-faulted
# memory every time (glibc's mmap threshold) and every pass over it goes to
# DRAM. Scoring alone, 11.5M-parameter teacher, V = 16,384, 2 cores:
# 4 MiB 4.9k tok/s, 8 MiB 5.7k, 16 MiB 6.2-6.7k, 32 MiB 5.9k, 64 MiB 5.3k.
# At least ROWS_MIN rows per chunk, so the head's weight is not re-read for
# every handful of positions at large V.
LOGITS_CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 16 << 20}
ROWS_MIN = 64


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(path: str, dtype: torch.dtype):
    """The teacher's weights, or one clear error: a directory with no, partial
    or corrupt weights is common after an interrupted copy. Remote code is
    never run."""
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except Exception as e:  # OSError, ValueError, safetensors errors, torch errors: all mean unusable weights
        raise OptionError(f"--teacher: cannot load the model in {path} ({one_line(e)})") from None


class HFTeacher:
    """`group`: the tensor-parallel group this process is in (--tp); its
    leader sends every call to the followers, which run `serve()`."""

    def __init__(self, path: str, tokenizer, dtype: str = "auto", device: str = "auto", group=None):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # the job's own bar is the one to watch
        self.group = group
        self.device = group.device if group else resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if group:
            if group.leader:
                group.send(LOAD)
            self.model = group.load(path, self.dtype).eval()
        else:
            self.model = load_model(path, self.dtype).to(self.device).eval()
        self.path = path
        head = self.model.get_output_embeddings()
        weight, bias = group.head_shard(head) if group else (head.weight, getattr(head, "bias", None))
        # Logits are produced in fp32 whatever the body's dtype: bf16 logits
        # would put ~0.1-nat errors into every stored logprob. For a half-
        # precision model on GPU a half x half GEMM with fp32 output is exact
        # (products of 8/11-bit mantissas fit fp32) and runs on tensor cores.
        self.head_bias = None if bias is None else bias.detach().float()
        self.half_head = self.dtype != torch.float32 and self.device.type == "cuda" and _mm_fp32_out_works(self.device)
        self.head_weight = weight.detach() if self.half_head else weight.detach().float()
        cfg = self.model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)
        self.logits_size = head.weight.shape[0]
        chunk_bytes = LOGITS_CHUNK_BYTES["cuda" if self.device.type == "cuda" else "cpu"]
        self.chunk = max(ROWS_MIN, chunk_bytes // (4 * self.logits_size))   # positions per head chunk
        # On GPU the per-position reductions over the vocabulary, not the
        # model, dominate a small teacher's time: fuse them (one pass over the
        # logits instead of five) and find the top-k among the best blocks.
        self._row_stats = _compiled(_row_stats) if self.device.type == "cuda" else None
        self.vocab_size = len(tokenizer)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def close(self) -> None:
        self.model = self.head_weight = self.head_bias = None

    def info(self) -> dict:
        import transformers
        return {"backend": "hf", "backend_version": transformers.__version__, "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device), "head_dtype": "float32",
                **({"tensor_parallel": self.group.size} if self.group else {})}

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.half_head:
            logits = torch.mm(h.reshape(-1, h.shape[-1]), self.head_weight.t(), out_dtype=torch.float32)
            logits = logits.reshape(*h.shape[:-1], -1)
            if self.head_bias is not None:
                logits = logits + self.head_bias
        else:
            logits = torch.nn.functional.linear(h.float(), self.head_weight, self.head_bias)
        if self.group:   # this rank's slice of the vocabulary -> all of it
            logits = self.group.gather_vocab(logits)
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _labels(self, logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple:
        """(top-k ids, their logprobs, coverage, target logprob, target rank)
        of one chunk's fp32 logits [c, V]."""
        if self.device.type != "cuda":
            return chunk_labels(logits, targets, k)
        # GPU: one fused (compiled) pass for the normaliser and the rank.
        tgt_logit = logits.gather(1, targets[:, None])
        lse, rank = self._row_stats(logits, tgt_logit)
        top_v, top_i = _topk_blocked(logits, k)
        top_lp = top_v - lse
        return top_i, top_lp, top_lp.exp().sum(-1), (tgt_logit - lse)[:, 0], rank

    def serve(self) -> None:
        """A tensor-parallel follower: run the leader's calls until it stops."""
        while True:
            op, windows, number, seeds, temperature = self.group.receive()
            if op == SCORE:
                self.score(windows, number)
            elif op == DRAW:
                self.draw(windows, number, temperature, seeds)
            else:
                return

    def _announce(self, op: int, windows, number: int, seeds=(), temperature: float = 1.0) -> None:
        if self.group and self.group.leader:
            self.group.send(op, windows, number, seeds, temperature)

    @torch.inference_mode()
    def score(self, windows: list[np.ndarray], k: int) -> list[TopK]:
        self._announce(SCORE, windows, k)
        B, lengths = len(windows), [len(w) for w in windows]
        T = max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
            mask[i, : len(w)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        lens = torch.as_tensor(lengths, device=self.device)
        scored = torch.arange(T, device=self.device)[None, :] < (lens - 1)[:, None]   # [B, T]
        h = hidden[scored]                                                              # [N, H]
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[scored]                    # [N]
        del hidden
        parts = [self._labels(self._logits(hc), tc, k) for hc, tc in zip(h.split(self.chunk), targets.split(self.chunk))]
        top_i, top_lp, cov, tgt_lp, rank = (torch.cat(x).cpu().numpy() for x in zip(*parts))
        out, start = [], 0
        for L in lengths:
            s = slice(start, start + L - 1)
            out.append(TopK(top_i[s].astype(np.int64), top_lp[s], cov[s], tgt_lp[s], rank[s].astype(np.int64)))
            start += L - 1
        return out

    @torch.inference_mode()
    def draw(self, windows: list[np.ndarray], draws: int, temperature: float, seeds: list[int]) -> list[Sampled]:
        """`draws` samples per position from softmax(logits / temperature), on
        the device, from one RNG stream per window (seeded by `seeds`), so a
        window's labels do not depend on the batch it was in."""
        self._announce(DRAW, windows, draws, seeds, temperature)
        lengths = [len(w) for w in windows]
        T = max(lengths)
        ids = torch.zeros(len(windows), T, dtype=torch.long)
        mask = torch.zeros(len(windows), T, dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
            mask[i, : len(w)] = 1
        hidden = self.model.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        out = []
        for i, L in enumerate(lengths):
            gen = torch.Generator(device=self.device).manual_seed(seeds[i])
            parts = []
            for h in hidden[i, : L - 1].split(self.chunk):
                logits = self._logits(h)
                probs = torch.softmax(logits / temperature, dim=-1)
                drawn = torch.multinomial(probs, draws, replacement=True, generator=gen)      # [c, N]
                lp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)                  # untempered
                parts.append((drawn, lp.gather(1, drawn)))
            out.append(_distinct(parts))
        return out

    @torch.inference_mode()
    def sample(self, requests: list[SampleRequest]) -> list[Completion]:
        B = len(requests)
        P = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(B, P, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        for i, r in enumerate(requests):  # left-pad so every row's next token is at -1
            ids[i, P - len(r.prompt_ids):] = torch.as_tensor(r.prompt_ids, dtype=torch.long)
            mask[i, P - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        body = self.model.base_model
        out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        gens = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]
        temps = torch.tensor([r.temperature for r in requests], device=self.device)[:, None]
        top_p = torch.tensor([r.top_p for r in requests], device=self.device)[:, None]
        greedy = temps[:, 0] == 0
        max_new = max(r.max_new_tokens for r in requests)
        toks, lps = [], []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        eos = torch.tensor(sorted(self.eos_ids), device=self.device, dtype=torch.long)
        for step in range(max_new):
            logits = self._logits(out.last_hidden_state[:, -1])
            logprobs = torch.log_softmax(logits, dim=-1)
            z = torch.log_softmax(logits / temps.clamp(min=1e-6), dim=-1)
            z = _top_p_filter(z, top_p)
            noise = torch.stack([_gumbel(logits.shape[-1], g, self.device) for g in gens])
            tok = torch.where(greedy, logits.argmax(-1), (z + noise).argmax(-1))
            toks.append(tok)
            lps.append(logprobs.gather(1, tok[:, None])[:, 0])
            done |= torch.isin(tok, eos)
            if bool(done.all()) or step == max_new - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=self.device)], dim=1)
            pos = pos[:, -1:] + 1
            out = body(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                       past_key_values=out.past_key_values, use_cache=True)
        toks_np = torch.stack(toks, 1).cpu().numpy()
        lps_np = torch.stack(lps, 1).float().cpu().numpy()
        results = []
        for i, r in enumerate(requests):
            row, finish = toks_np[i, : r.max_new_tokens].tolist(), "length"
            for j, t in enumerate(row):
                if t in self.eos_ids:
                    row, finish = row[: j + 1], "stop"
                    break
            results.append(Completion(row, lps_np[i, : len(row)].tolist(), finish))
        return results


def chunk_labels(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple:
    """HFTeacher._labels on CPU. log_softmax is one vectorised kernel
    (logsumexp is five, each a pass over [c, V] in memory); the target's rank
    is read off the top-k wherever the target is at least the k-th logprob
    (every larger one is then in the top-k too) and counted over the other
    rows only."""
    lp = torch.log_softmax(logits, dim=-1)
    top_lp, top_i = lp.topk(k, dim=-1)
    tgt_lp = lp.gather(1, targets[:, None])
    rank = (top_lp > tgt_lp).sum(-1)
    outside = (tgt_lp[:, 0] < top_lp[:, -1]).nonzero()[:, 0]
    if len(outside):
        rank[outside] = (lp[outside] > tgt_lp[outside]).sum(-1)
    return top_i, top_lp, top_lp.exp().sum(-1), tgt_lp[:, 0], rank


def _row_stats(logits: torch.Tensor, tgt_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp [c, 1], rank of the target [c]) of fp32 logits [c, V]."""
    m = logits.amax(-1, keepdim=True)
    lse = m + (logits - m).exp().sum(-1, keepdim=True).log()
    return lse, (logits > tgt_logit).sum(-1)


def _compiled(fn):
    """torch.compile(fn) where it works; fn itself otherwise (said once, as a warning: it runs slower)."""
    def eager(e: Exception):
        warnings.warn(f"torch.compile of {fn.__name__} failed ({one_line(e, 200)}); it runs eagerly (slower)",
                      RuntimeWarning, stacklevel=3)
        return fn
    try:
        compiled = torch.compile(fn, dynamic=True)
    except Exception as e:   # whatever the compiler stack raises (no toolchain, unsupported platform)
        return eager(e)

    def call(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except Exception as e:   # compiling happens at the first call: the same failures
            if compiled is fn:
                raise
            compiled = eager(e)
            return fn(*args)
    return call


def _topk_blocked(logits: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over [c, V] via the k blocks with the largest maxima: every
    top-k entry lies in such a block (a block outside them has k better
    block maxima above it), so the exact top-k comes from k * block candidates."""
    n, V = logits.shape
    nb = V // block
    if nb < 4 * k:
        return logits.topk(k, dim=-1)
    _, best = logits[:, : nb * block].view(n, nb, block).amax(-1).topk(k, dim=-1)
    idx = (best[..., None] * block + torch.arange(block, device=logits.device)).reshape(n, -1)
    if nb * block < V:
        idx = torch.cat([idx, torch.arange(nb * block, V, device=logits.device).expand(n, -1)], dim=1)
    values, j = logits.gather(1, idx).topk(k, dim=-1)
    return values, idx.gather(1, j)


def _distinct(parts: list) -> Sampled:
    """Per-position distinct ids (ascending), their counts, their untempered
    teacher logprobs and their total probability, from [c, N] draws and the
    logprobs of the drawn ids."""
    drawn, order = torch.cat([p[0] for p in parts]).sort(dim=-1)                 # [P, N]
    lp = torch.cat([p[1] for p in parts]).gather(1, order)
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    starts = new.flatten().nonzero()[:, 0]
    counts = torch.diff(starts, append=torch.tensor([drawn.numel()], device=drawn.device))
    coverage = torch.where(new, lp.exp(), torch.zeros_like(lp)).sum(-1).clamp(max=1.0)
    return Sampled(drawn[new].cpu().numpy(), counts.cpu().numpy(), new.sum(-1).cpu().numpy(),
                   lp[new].float().cpu().numpy(), coverage.float().cpu().numpy())


def _mm_fp32_out_works(device: torch.device) -> bool:
    """torch.mm(..., out_dtype=float32) exists for half inputs on this build."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _top_p_filter(logprobs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p (per row)."""
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs.masked_fill(drop, float("-inf"))


def _gumbel(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    u = torch.rand(n, generator=gen, device=device).clamp_(1e-20, 1.0)
    return -torch.log(-torch.log(u))
