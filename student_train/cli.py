"""`student-train` command line: a thin shell over TrainConfig and train().

    student-train train [CONFIG.yaml] --labels DIR --student-config cfg.json --out runs/a --loss kd
    student-train rounds --teacher T --student S --prompts p.jsonl --out runs/opd --rounds 4
    torchrun --nproc-per-node 8 -m student_train.cli train CONFIG.yaml
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from labelgen import clikit
from labelgen.stopping import PREEMPTED_EXIT
from student_train.config import CodistillConfig, RoundsConfig, TrainConfig, renamed_for

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train a student LLM on label shards written by `labelgen generate`.")
# A preemption signal stops a command at once (exit 75) until its training loop starts; the loop (runtime.fit)
# then reads it into a flag of its own and stops after the step in progress, with a checkpoint of that step.
cli_errors = clikit.cli_errors("student-train", raise_on_preemption=True)
ON_STOP = "rerun the same command with --resume to continue from its last checkpoint"


@app.callback()
def _main(version: bool = clikit.version_option("student-train")) -> None:
    pass


def finish(result: dict, done: str) -> None:
    """Say how the run ended and exit: PREEMPTED_EXIT when a preemption signal
    stopped it, else 0. A torchrun worker leaves with os._exit once its run is
    finished and saved: torch's gloo/FSDP teardown at interpreter exit aborts
    now and then ("terminate called without an active exception", about 1 in
    10 two-process CPU runs with torch 2.13, before preemption handling was
    added too), which would turn a finished run into a failed job."""
    code = 0
    if result.get("stopped_by"):
        typer.echo(f"student-train: stopped by {result['stopped_by']} after step {result['step']}, which is "
                   "checkpointed: rerun the same command with --resume to continue", err=True)
        code = PREEMPTED_EXIT
    else:
        typer.echo(done)
    if result.get("world", 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


TAIL_DEFAULT = {"tail": "tail for top-k labels, none for sampled ones"}


@app.command("train")
@clikit.show_defaults(TrainConfig, shown=TAIL_DEFAULT)
@cli_errors(on_stop=ON_STOP)
def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML/JSON config file; flags override its keys"),
    labels: Optional[List[str]] = typer.Option(None, "--labels", help="label directory (repeatable)"),
    eval_labels: Optional[List[str]] = typer.Option(None, "--eval-labels", help="held-out label directory (repeatable)"),
    eval_holdout: Optional[int] = typer.Option(None, help="hold out this many shards of --labels for evaluation"),
    student: Optional[str] = typer.Option(None, help="student model directory (HF format)"),
    student_config: Optional[str] = typer.Option(None, help="HF config JSON: train a student from scratch"),
    student_tokenizer: Optional[str] = typer.Option(None, help="a tokenizer other than the labels': cross-tokenizer KD"),
    out: Optional[str] = typer.Option(None, help="run directory"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps"),
    loss: Optional[str] = typer.Option(None, help="kd | ce | sft | opd (on-policy: scored labels)"),
    kd_kind: Optional[str] = typer.Option(None, help="forward | reverse | jsd"),
    tail: Optional[str] = typer.Option(None, help="top-k labels: tail (the default: a bucket for the missing mass) | "
                                       "target (the missing mass on the actual next token; ahead in docs/choosing.md) "
                                       "| renorm; sampled labels: none (the default: the unbiased estimator) or tail "
                                       "(a bucket for the teacher's mass outside the drawn ids)"),
    kd_temperature: Optional[float] = typer.Option(None, help="KD temperature T: both distributions softened by T, "
                                                "the loss scaled by T^2 (top-k labels need --tail renorm for T != 1)"),
    beta: Optional[float] = typer.Option(None, help="JSD mixing weight"),
    head_chunk_mb: Optional[float] = typer.Option(None, help="MiB of student logits made at a time (0: all at once)"),
    k: Optional[int] = typer.Option(None, help="use the first k stored top-k entries"),
    assistant_only: Optional[bool] = typer.Option(None, "--assistant-only", help="count only the positions that predict "
                                                  "an assistant's token (labels made with --messages-field)"),
    ce_weight: Optional[float] = typer.Option(None, help="kd loss: ce_weight x CE on the actual tokens + (1 - ce_weight) "
                                              "x KD (Axolotl's kd_alpha 0.9 is --ce-weight 0.1)"),
    ce_weight_end: Optional[float] = typer.Option(None, help="--ce-weight moves linearly to this value over the run"),
    opd_forward_kl: Optional[float] = typer.Option(None, help="opd: weight of forward KL on the teacher's top-k"),
    opd_clip: Optional[float] = typer.Option(None, help="opd: importance ratio clipped to [1 - clip, 1 + clip]"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (AdamW; train's default suits a student "
                                       "from scratch, rounds' a pretrained one)"),
    warmup_steps: Optional[int] = typer.Option(None, help="linear learning-rate warm-up steps before the cosine decay"),
    batch_size: Optional[int] = typer.Option(None, help="rows per micro-batch per rank"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimizer step"),
    min_lr_ratio: Optional[float] = typer.Option(None, help="cosine decay ends at lr x this"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay"),
    grad_clip: Optional[float] = typer.Option(None, help="max gradient norm (0: no clipping)"),
    group_units: Optional[int] = typer.Option(None, help="row groups shuffled together (the shuffle buffer)"),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16"),
    eval_every: Optional[int] = typer.Option(None, help="evaluate every this many steps (0: never)"),
    eval_batches: Optional[int] = typer.Option(None, help="batches per evaluation"),
    save_every: Optional[int] = typer.Option(None, help="checkpoint every this many steps (0: at the end only)"),
    log_every: Optional[int] = typer.Option(None, help="a metrics.jsonl record every this many steps"),
    loader_workers: Optional[int] = typer.Option(None, help="DataLoader worker processes per rank"),
    seed: Optional[int] = typer.Option(None, help="seeds initialisation, shuffling and sampling"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:N] (under torchrun: cuda:LOCAL_RANK)"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp", help="shard the student with FSDP"),
    verify: Optional[bool] = typer.Option(None, "--verify", help="check shard checksums first"),
    resume: Optional[bool] = typer.Option(None, "--resume", help="continue from the latest checkpoint in --out"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="start over in a non-empty --out"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="a progress bar on stderr"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
    temperature: Optional[float] = typer.Option(None, "--temperature", hidden=True),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", hidden=True),
    alpha: Optional[float] = typer.Option(None, "--alpha", hidden=True),
    alpha_end: Optional[float] = typer.Option(None, "--alpha-end", hidden=True),
):
    """Fit a student to top-k soft labels (kd), actual tokens (ce), completions (sft) or its own scored completions (opd)."""
    overrides = clikit.overrides(TrainConfig, locals(), old_names=renamed_for(TrainConfig))
    cfg = TrainConfig.from_sources(str(config) if config else None, overrides)
    if dry_run:
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    from student_train.train import train
    r = train(cfg)
    finish(r, f"trained to step {r['step']}; checkpoints and metrics.jsonl in {r['out']}")


@app.command("codistill")
@clikit.show_defaults(CodistillConfig)
@cli_errors(on_stop=ON_STOP)
def codistill_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML/JSON config file; flags override its keys"),
    input: Optional[List[str]] = typer.Option(None, "--input", help="raw text file or directory (repeatable)"),
    eval_input: Optional[List[str]] = typer.Option(None, "--eval-input", help="held-out raw text (repeatable)"),
    teacher: Optional[str] = typer.Option(None, help="teacher model directory (HF format)"),
    teacher_config: Optional[str] = typer.Option(None, help="HF config JSON: the teacher starts untrained"),
    student: Optional[str] = typer.Option(None, help="student model directory"),
    student_config: Optional[str] = typer.Option(None, help="HF config JSON for the student"),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer directory (when both models come from configs)"),
    out: Optional[str] = typer.Option(None, help="run directory"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps"),
    batch_size: Optional[int] = typer.Option(None, help="rows per micro-batch per rank"),
    max_seq_len: Optional[int] = typer.Option(None, help="window length in tokens"),
    ce_weight: Optional[float] = typer.Option(None, help="the student's loss: ce_weight x CE + (1 - ce_weight) x KD, "
                                              "after the warm-up and ramp below"),
    ce_weight_warmup_steps: Optional[int] = typer.Option(None, help="CE only (weight 1) for these first steps"),
    ce_weight_ramp_steps: Optional[int] = typer.Option(None, help="then from 1 to --ce-weight over these steps"),
    ce_weight_schedule: Optional[str] = typer.Option(None, help="the ramp's shape: linear | cosine"),
    kd: Optional[str] = typer.Option(None, help="full | topk"),
    k: Optional[int] = typer.Option(None, help="top-k entries of the teacher compared with --kd topk"),
    kd_kind: Optional[str] = typer.Option(None, help="forward | reverse | jsd"),
    kd_temperature: Optional[float] = typer.Option(None, help="KD temperature T: both distributions softened by T, "
                                                "the loss scaled by T^2 (top-k labels need --tail renorm for T != 1)"),
    teacher_lr: Optional[float] = typer.Option(None, help="0 freezes the teacher"),
    student_lr: Optional[float] = typer.Option(None, help="the student's peak learning rate"),
    grad_accum: Optional[int] = typer.Option(None, help="batches per optimizer step (both models)"),
    warmup_steps: Optional[int] = typer.Option(None, help="linear learning-rate warm-up steps before the cosine decay"),
    text_field: Optional[str] = typer.Option(None, help="JSONL/Parquet field holding the text"),
    rows_per_shard: Optional[int] = typer.Option(None, help="input records per tokenized shard"),
    tail: Optional[str] = typer.Option(None, help="renorm | tail | target (--kd topk)"),
    beta: Optional[float] = typer.Option(None, help="JSD mixing weight"),
    head_chunk_mb: Optional[float] = typer.Option(None, help="MiB of student logits made at a time (0: all at once)"),
    min_lr_ratio: Optional[float] = typer.Option(None, help="cosine decay ends at lr x this"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay"),
    grad_clip: Optional[float] = typer.Option(None, help="max gradient norm (0: no clipping)"),
    group_units: Optional[int] = typer.Option(None, help="row groups shuffled together (the shuffle buffer)"),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16"),
    loader_workers: Optional[int] = typer.Option(None, help="DataLoader worker processes per rank"),
    eval_every: Optional[int] = typer.Option(None, help="evaluate every this many steps (0: never)"),
    eval_batches: Optional[int] = typer.Option(None, help="batches per evaluation"),
    save_every: Optional[int] = typer.Option(None, help="checkpoint every this many steps (0: at the end only)"),
    log_every: Optional[int] = typer.Option(None, help="a metrics.jsonl record every this many steps"),
    seed: Optional[int] = typer.Option(None, help="seeds initialisation, shuffling and sampling"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:N] (under torchrun: cuda:LOCAL_RANK)"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp", help="shard the trained models with FSDP"),
    resume: Optional[bool] = typer.Option(None, "--resume", help="continue from the latest checkpoint in --out"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="start over in a non-empty --out"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="a progress bar on stderr"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
    temperature: Optional[float] = typer.Option(None, "--temperature", hidden=True),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", hidden=True),
    alpha: Optional[float] = typer.Option(None, "--alpha", hidden=True),
    alpha_warmup_steps: Optional[int] = typer.Option(None, "--alpha-warmup-steps", hidden=True),
    alpha_ramp_steps: Optional[int] = typer.Option(None, "--alpha-ramp-steps", hidden=True),
    alpha_schedule: Optional[str] = typer.Option(None, "--alpha-schedule", hidden=True),
):
    """Train a teacher and a student together: the teacher on CE, the student on CE + the teacher's live soft labels."""
    overrides = clikit.overrides(CodistillConfig, locals(), old_names=renamed_for(CodistillConfig), inputs=input)
    cfg = CodistillConfig.from_sources(str(config) if config else None, overrides)
    if dry_run:
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    from student_train.codistill import codistill
    r = codistill(cfg)
    finish(r, f"co-distilled to step {r['step']}; checkpoints (teacher/ and student/) and metrics.jsonl in {r['out']}")


@app.command("rounds")
@clikit.show_defaults(RoundsConfig)
@cli_errors(on_stop="finished stages are kept: rerun the same command to continue")
def rounds_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML/JSON config file; flags override its keys"),
    teacher: Optional[str] = typer.Option(None, help="teacher model directory (HF format): scores every completion"),
    student: Optional[str] = typer.Option(None, help="student model directory the first round samples from"),
    prompts: Optional[List[str]] = typer.Option(None, "--prompts", help="prompt file (JSONL, repeatable)"),
    eval_prompts: Optional[List[str]] = typer.Option(None, "--eval-prompts", help="held-out prompt file (repeatable)"),
    out: Optional[str] = typer.Option(None, help="work directory (every stage is cached there)"),
    rounds: Optional[int] = typer.Option(None, help="sample -> score -> train rounds"),
    sampler: Optional[str] = typer.Option(None, help="student (on-policy) | teacher (off-policy baseline)"),
    loss: Optional[str] = typer.Option(None, help="opd | kd | sft"),
    n: Optional[int] = typer.Option(None, help="completions per prompt per round"),
    eval_n: Optional[int] = typer.Option(None, help="completions per held-out prompt"),
    max_new_tokens: Optional[int] = typer.Option(None, help="tokens per completion at most"),
    k: Optional[int] = typer.Option(None, help="top-k the teacher keeps per completion token"),
    prompt_field: Optional[str] = typer.Option(None, help="the prompt records' field holding a plain prompt"),
    messages_field: Optional[str] = typer.Option(None, help="the field holding chat messages (chat template)"),
    id_field: Optional[str] = typer.Option(None, help="the field holding a prompt id (default: file:line)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps per round"),
    batch_size: Optional[int] = typer.Option(None, help="completions per micro-batch"),
    grad_accum: Optional[int] = typer.Option(None, help="micro-batches per optimizer step"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (AdamW; train's default suits a student "
                                       "from scratch, rounds' a pretrained one)"),
    opd_forward_kl: Optional[float] = typer.Option(None, help="opd: weight of forward KL on the teacher's top-k"),
    opd_clip: Optional[float] = typer.Option(None, help="opd: importance ratio clipped to [1 - clip, 1 + clip]"),
    head_chunk_mb: Optional[float] = typer.Option(None, help="MiB of student logits made at a time (0: all at once)"),
    tail: Optional[str] = typer.Option(None, help="tail | renorm | target (the forward-KL support)"),
    warmup_steps: Optional[int] = typer.Option(None, help="linear learning-rate warm-up steps before the cosine decay"),
    min_lr_ratio: Optional[float] = typer.Option(None, help="cosine decay ends at lr x this"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay"),
    grad_clip: Optional[float] = typer.Option(None, help="max gradient norm (0: no clipping)"),
    backend: Optional[str] = typer.Option(None, help="sampling and scoring: hf | vllm"),
    batch_tokens: Optional[int] = typer.Option(None, help="padded tokens per generation batch"),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad", help="skip bad prompt records and count them"),
    log_every: Optional[int] = typer.Option(None, help="a metrics.jsonl record every this many steps"),
    seed: Optional[int] = typer.Option(None, help="seeds initialisation, shuffling and sampling"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:N] (under torchrun: cuda:LOCAL_RANK)"),
    dtype: Optional[str] = typer.Option(None, help="training: auto | float32 | bfloat16"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="start over in a non-empty --out"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="a progress bar on stderr"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
):
    """On-policy distillation in batch rounds: the student writes, the teacher scores offline, the student trains."""
    overrides = clikit.overrides(RoundsConfig, locals())
    cfg = RoundsConfig.from_sources(str(config) if config else None, overrides)
    if dry_run:
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    from student_train.rounds import run_rounds
    r = run_rounds(cfg)
    if r["stopped_by"]:
        typer.echo(f"student-train: stopped by {r['stopped_by']} in round {r['round']}'s training after step {r['step']}, "
                   "which is checkpointed: rerun the same command to continue", err=True)
        raise typer.Exit(PREEMPTED_EXIT)
    typer.echo(f"{len(r['rounds'])} rounds done; the last student is {r['student']}; rounds.jsonl in {r['out']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
