"""GenerateConfig: every setting of a generation run, with its default, in one
place. The CLI and config files (YAML/JSON) only fill it in; the resolved
config is written into the manifest and, hashed, into every shard."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from labelgen.errors import OptionError
from labelgen.format import Encoding
from labelgen.settings import config_from_sources

MODES = ("topk", "sampled", "sample", "greedy", "tokens", "score")
BACKENDS = ("hf", "vllm")
DEFAULT_MAX_SEQ_LEN = 2048
# Settings added after runs were first hashed: they enter the output hash only
# when set, so a run started before they existed still resumes.
ADDED_LATER = {"keep_mass": 1.0, "min_prob": 0.0, "round": 0, "draw_logprobs": False}
# Settings that change how or where a run executes but not a single byte of its output.
EXECUTION_ONLY = ("out", "resume", "overwrite", "num_workers", "worker_index", "progress", "skip_bad", "inputs_changed",
                  "tp", "peak_tflops")


@dataclass(frozen=True)
class GenerateConfig:
    teacher: str
    """HF model directory of the teacher (config, weights, tokenizer)."""
    inputs: tuple[str, ...]
    """Input files or directories: .jsonl, .jsonl.zst, .parquet, or plain text."""
    out: str
    """Output label directory."""
    mode: str = "topk"
    """topk: score text, keep the teacher's top-k per position. sample: the
    teacher writes `n` completions per prompt. greedy: one argmax completion.
    sampled: score text, keep `draws` samples from the teacher's distribution
    per position (distinct ids with counts: sparse, unbiased soft labels).
    tokens: tokenize and window the text only (no teacher runs; --teacher
    names the tokenizer), e.g. for co-distillation or a CE baseline.
    score: --input is a samples label set (completions another model, e.g.
    the student, wrote); the teacher scores each prompt + completion and
    keeps its top-k at the completion tokens (a scored label set, for
    on-policy distillation)."""
    backend: str = "hf"
    """hf (transformers; CPU or GPU) or vllm."""
    k: int = 64
    """Top-k entries kept per position (topk and score modes); the cap with adaptive truncation."""
    keep_mass: float = 1.0
    """Adaptive truncation (topk mode): stop keeping a position's entries once
    those kept hold this much probability. 1 = keep all k."""
    min_prob: float = 0.0
    """Adaptive truncation (topk mode): do not keep entries below this
    probability. A position's top-1 is always kept."""
    draws: int = 50
    """Samples per position (sampled mode), at most 255."""
    proposal_temperature: float = 1.0
    """sampled mode: draw from softmax(logits / T). T != 1 also stores each
    drawn id's logprob so training can correct back to the teacher (T = 1)."""
    draw_logprobs: bool = False
    """sampled mode: store each drawn id's teacher logprob at T = 1 too (~1 B
    per distinct id); the tail-bucket loss (--tail tail) then weighs the
    drawn ids by them instead of by their counts (measured worse: docs/
    results.md). The tail bucket needs the teacher's mass on the drawn ids:
    --encoding sampled_coverage=true (~1 B per position)."""
    max_seq_len: int | None = None
    """Longest window scored at once; longer documents are split into windows.
    Default: the teacher's context length, at most 2048."""
    stride: int | None = None
    """Tokens between window starts; default max_seq_len - 1, so consecutive
    windows share one token and every token is predicted exactly once."""
    batch_tokens: int = 16384
    """Padded tokens per teacher batch (hf backend)."""
    n: int = 4
    """Completions per prompt (sample mode)."""
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    """Global seed; each completion's seed derives from (seed, example_id, sample_index)."""
    text_field: str = "text"
    prompt_field: str | None = None
    messages_field: str | None = None
    """A list of {role, content} rendered with the teacher's chat template.
    Windowed modes (topk, sampled, tokens) then mark which input ids are the
    assistant's (an assistant_mask column, format 2.4; off with --encoding
    assistant_mask=false), for training on the assistant's tokens only."""
    id_field: str | None = None
    """Field holding a stable example id; default file:line."""
    rows_per_shard: int = 1000
    """Input records per shard. Shard i holds records [i*R, (i+1)*R)."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """hf backend: auto, cpu, cuda, cuda:N."""
    tp: int = 1
    """hf backend: tensor-parallel ranks per teacher, for a teacher larger than
    one GPU (launch with torchrun --nproc-per-node N; WORLD_SIZE / tp ranks
    are data-parallel workers). topk, sampled and score modes. vLLM: pass
    --engine tensor_parallel_size=N instead."""
    peak_tflops: float | None = None
    """Dense peak of one device in TFLOP/s for the MFU figure; default: the
    bf16 peak of the GPU, looked up by its name (A100, H100, H200, B200)."""
    engine: dict = field(default_factory=dict)
    """Extra keyword arguments for vllm.LLM (tensor_parallel_size, gpu_memory_utilization, ...)."""
    encoding: dict = field(default_factory=dict)
    """Overrides of labelgen.format.Encoding (logprob_step, zstd_level, ...)."""
    skip_bad: bool = False
    """Skip bad input records (counted in the manifest) instead of failing."""
    resume: bool = False
    """Continue the run in --out: its finished shards are kept."""
    overwrite: bool = False
    """Delete what a labelgen run wrote in --out and start over (refused where it holds anything else)."""
    inputs_changed: bool = False
    """Resume although input files changed since the run began: finished shards
    whose input records are unchanged are kept, the others redone."""
    num_workers: int = 1
    worker_index: int = 0
    round: int = 0
    """score mode: the on-policy round the completions were sampled in (stored in every row)."""
    progress: bool = True

    def __post_init__(self):
        def bad(option, msg):
            raise OptionError(f"{option}: {msg}")
        if self.mode not in MODES:
            bad("--mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            bad("--backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.inputs:
            bad("--input", "at least one input file or directory is required")
        if self.k < 1:
            bad("--k", f"must be >= 1, got {self.k}")
        if not 1 <= self.draws <= 255:
            bad("--draws", f"must be in [1, 255] (counts are stored as uint8), got {self.draws}")
        if self.proposal_temperature <= 0:
            bad("--proposal-temperature", f"must be > 0, got {self.proposal_temperature}")
        seq = self.max_seq_len  # None until resolved against the teacher (generate.resolve)
        if seq is not None and seq < 2:
            bad("--max-seq-len", f"must be >= 2, got {seq}")
        if seq is not None and self.stride is not None and not 1 <= self.stride <= seq - 1:
            bad("--stride", f"must be in [1, max_seq_len - 1 = {seq - 1}], got {self.stride}")
        if seq is not None and self.batch_tokens < seq:
            bad("--batch-tokens", f"must be >= --max-seq-len ({seq}), got {self.batch_tokens}")
        if not 0 < self.keep_mass <= 1:
            bad("--keep-mass", f"must be in (0, 1], got {self.keep_mass}")
        if not 0 <= self.min_prob < 1:
            bad("--min-prob", f"must be in [0, 1), got {self.min_prob}")
        if self.truncates and self.mode not in ("topk", "score"):
            bad("--keep-mass/--min-prob", f"adaptive truncation is for --mode topk or score, not {self.mode}")
        if self.mode == "score" and len(self.inputs) != 1:
            bad("--input", f"--mode score reads one samples label set, got {len(self.inputs)} inputs")
        if not 0 <= self.round < 2**31:
            bad("--round", f"must be in [0, 2^31), got {self.round}")
        if self.n < 1:
            bad("--n", f"must be >= 1, got {self.n}")
        if self.temperature < 0:
            bad("--temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("--top-p", f"must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            bad("--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.rows_per_shard < 1:
            bad("--rows-per-shard", f"must be >= 1, got {self.rows_per_shard}")
        if self.resume and self.overwrite:
            bad("--resume/--overwrite", "pass one, not both")
        if self.num_workers < 1 or not 0 <= self.worker_index < self.num_workers:
            bad("--worker-index", f"must be in [0, {self.num_workers}) with --num-workers {self.num_workers}")
        if self.overwrite and self.num_workers > 1:
            bad("--overwrite", "with several workers each would delete the others' shards; empty the directory once before launching them")
        if sum(f is not None for f in (self.prompt_field, self.messages_field)) > 1:
            bad("--prompt-field/--messages-field", "pass one, not both")
        if self.mode in ("topk", "sampled", "tokens") and self.prompt_field:
            bad("--mode", f"{self.mode} reads text (--text-field) or whole conversations (--messages-field); "
                          "--prompt-field is for sample/greedy")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("--dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.tp < 1:
            bad("--tp", f"must be >= 1, got {self.tp}")
        if self.tp > 1 and self.backend != "hf":
            bad("--tp", "is the hf backend's tensor parallelism; with vLLM pass --engine tensor_parallel_size=N")
        if self.tp > 1 and self.mode not in ("topk", "sampled", "score"):
            bad("--tp", f"runs --mode topk, sampled or score; {self.mode} with a teacher larger than one GPU runs on "
                        "vLLM (--backend vllm --engine tensor_parallel_size=N)")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            bad("--peak-tflops", f"must be > 0, got {self.peak_tflops}")
        Encoding(**self.encoding)  # fails early with a message naming the field
        if self.encoding.get("assistant_mask") and not (self.windowed and self.messages_field):
            bad("--encoding", "assistant_mask marks the assistant's turns of conversations: it needs --messages-field "
                              "and --mode topk, sampled or tokens")

    @property
    def window_stride(self) -> int:
        return self.stride or self.max_seq_len - 1

    @property
    def truncates(self) -> bool:
        """Adaptive truncation: positions keep 1..k entries."""
        return self.keep_mass < 1 or self.min_prob > 0

    @property
    def kind(self) -> str:
        return {"topk": "topk", "tokens": "tokens", "sampled": "sampled", "score": "scored"}.get(self.mode, "samples")

    @property
    def windowed(self) -> bool:
        """Text cut into windows (topk, sampled, tokens), rather than prompts."""
        return self.mode in ("topk", "sampled", "tokens")

    @property
    def entries(self) -> int:
        """The manifest's `k`: top-k entries, or draws per position."""
        return {"topk": self.k, "score": self.k, "sampled": self.draws}.get(self.mode, 0)

    @property
    def samples_per_prompt(self) -> int:
        return 1 if self.mode == "greedy" else self.n

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = list(self.inputs)
        if not self.inputs_changed:   # execution-only and added later: recorded only when set
            del d["inputs_changed"]
        return d

    def output_hash(self) -> str:
        """Hash of every setting that shapes the output (not how it runs)."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in EXECUTION_ONLY and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict) -> "GenerateConfig":
        return config_from_sources(cls, config_file, overrides, tuple_fields=("inputs",))
