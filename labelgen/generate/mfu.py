"""Model FLOPs utilisation of a labelling run: the teacher's forward FLOPs,
counted from its config, over the time taken and the devices' dense peak.

    meter = meter_for(cfg, teacher)   # a generate run's: FlopMeter.of(hf_config, devices, peak TFLOP/s)
    meter.add(lengths)                # every sequence the teacher ran, whole
    meter.summary(tokens, seconds)    # {"teacher_flops", "flops_per_token", "peak_tflops", "mfu"}

FLOPs per sequence of L tokens: 2 x (every weight matrix of the layers and
the LM head) x L, plus causal attention, 4 x heads x head_dim per (query,
key) pair per layer over L (L + 1) / 2 pairs. The weight matrices are
counted on a meta-device copy of the model built from its config (nothing is
allocated), so every architecture transformers knows is counted as it is
built; a mixture of experts counts experts_per_token / experts of its expert
weights. Embedding lookups, norms and the softmax are not counted (the usual
convention: PaLM, Megatron).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets); the
# first name found in the device's name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
                    ("A100", 312.0), ("B200", 2250.0), ("B100", 1750.0))


def peak_tflops(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name, or None for one it lacks."""
    return next((tf for name, tf in PEAK_BF16_TFLOPS if name.lower() in device_name.lower()), None)


def _dims(cfg) -> tuple[int, int, int]:
    """(layers, attention heads, head dim) of an HF config."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    return int(layers), int(heads), int(getattr(cfg, "head_dim", None) or hidden // heads)


def matmul_weights(cfg) -> int:
    """Weights multiplied per token: every 2-D and 3-D parameter outside the
    input embeddings, the LM head included (tied or not), experts scaled by
    the share of them a token uses."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    used = getattr(text, "num_experts_per_tok", None)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in embeddings:
            continue
        share = used / experts if experts and used and ".experts." in f".{name}." else 1.0
        total += p.numel() * share
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:   # tied: the head multiplies the embedding matrix
        total += head.weight.numel()
    return int(total)


@dataclass
class FlopMeter:
    linear: float       # FLOPs per token through the weight matrices
    attention: float    # FLOPs per causal (query, key) pair, all layers
    peak: float | None  # FLOP/s of all the devices together, None: unknown (CPU)
    flops: float = 0.0

    @classmethod
    def of(cls, cfg, devices: int = 1, peak_tflops_per_device: float | None = None) -> "FlopMeter":
        layers, heads, head_dim = _dims(cfg)
        peak = None if peak_tflops_per_device is None else peak_tflops_per_device * 1e12 * devices
        return cls(2.0 * matmul_weights(cfg), 4.0 * heads * head_dim * layers, peak)

    def add(self, lengths) -> None:
        for n in lengths:
            self.flops += self.linear * n + self.attention * n * (n + 1) / 2

    def summary(self, tokens: int, seconds: float) -> dict:
        """What a run reports: its FLOPs, FLOPs per token and MFU (None without a peak)."""
        achieved = self.flops / seconds if seconds > 0 else 0.0
        return {"teacher_flops": self.flops, "flops_per_token": self.flops / tokens if tokens else 0.0,
                "peak_tflops": None if self.peak is None else self.peak / 1e12,
                "mfu": None if self.peak is None else achieved / self.peak}


def meter_for(cfg, teacher) -> FlopMeter | None:
    """The meter of a generate run (GenerateConfig `cfg`, its loaded teacher),
    None where no model runs (--mode tokens). The peak is --peak-tflops, or
    the table's for a GPU running the teacher in bf16/fp16; on a CPU, or a GPU
    the table lacks, the run reports tokens/s only."""
    from labelgen.backends import model_config
    mcfg = None if cfg.mode == "tokens" else model_config(cfg.teacher)
    if mcfg is None:
        return None
    info = teacher.info()
    if cfg.backend == "vllm":
        devices = int(cfg.engine.get("tensor_parallel_size", 1)) * int(cfg.engine.get("pipeline_parallel_size", 1))
    else:
        devices = cfg.tp
    peak = cfg.peak_tflops
    if peak is None and info.get("dtype") in ("bfloat16", "float16"):
        import torch
        on_gpu = str(info.get("device", "cuda")).startswith("cuda") and torch.cuda.is_available()
        peak = peak_tflops(torch.cuda.get_device_name()) if on_gpu else None
    return FlopMeter.of(mcfg, devices, peak)
