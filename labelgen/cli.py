"""`labelgen` command line: a thin shell over the library.

    labelgen demo-teacher OUT                      # a small local teacher, no downloads
    labelgen convert-gguf MODEL.gguf OUT           # a GGUF model as an HF teacher directory
    labelgen generate --teacher DIR --input PATH --out DIR --mode topk --k 64
    labelgen finalize DIR                          # merge workers' partial manifests
    labelgen validate DIR | inspect DIR | estimate --tokens 5e12 --vocab 100000 --k 64
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from labelgen import clikit
from labelgen.errors import OptionError
from labelgen.generate.config import GenerateConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Teacher labels for LLM distillation: generate, validate and inspect label shards.")


cli_errors = clikit.cli_errors("labelgen", raise_on_preemption=True)


@app.callback()
def _main(version: bool = clikit.version_option("labelgen")) -> None:
    pass


@app.command()
@cli_errors
def validate(label_dir: str = typer.Argument(..., help="label set directory, or an s3:// or gs:// URI"),
             as_json: bool = typer.Option(False, "--json", help="print a JSON report"),
             max_problems: int = typer.Option(20, help="stop listing after this many problems")):
    """Check a label set: manifest vs files, checksums, schema, ids, logprobs, coverage."""
    from labelgen.tools.inspection import validate as run
    r = run(label_dir, max_problems)
    if as_json:
        clikit.print_json(r)
    elif r["ok"]:
        typer.echo(f"{label_dir}: OK ({r['shards']} shards, {r['rows']:,} rows)")
    else:
        for p in r["problems"]:
            where = p["file"] + (f": row {p['row']}" if p["row"] is not None else "")
            typer.echo(f"{where}: {p['problem']}", err=True)
    if not r["ok"]:
        raise typer.Exit(1)


@app.command()
@cli_errors
def inspect(label_dir: str = typer.Argument(..., help="label set directory, or an s3:// or gs:// URI"),
            as_json: bool = typer.Option(False, "--json", help="print JSON"),
            plot: Optional[Path] = typer.Option(None, help="write a coverage histogram PNG (needs matplotlib)"),
            html: Optional[str] = typer.Option(None, help="write one self-contained HTML page (a file, or an s3:// "
                                               "or gs:// object): sizes, coverage and an example browser with each "
                                               "token's stored labels"),
            examples: int = typer.Option(8, help="--html: the examples the page carries (the first ones)")):
    """Sizes, bytes per position/entry, compression ratios and top-k coverage; --html: a page to look at them."""
    from labelgen.tools.inspection import format_inspect, inspect as run, plot_inspect
    if html:
        from labelgen.tools.html_report import write
        size = write(label_dir, html, examples)
        typer.echo(f"wrote {html} ({size / 2**20:,.1f} MiB; open it in a browser, no network needed)")
        return
    r = run(label_dir)
    typer.echo(json.dumps(r, indent=2) if as_json else format_inspect(r))
    if plot:
        plot_inspect(r, plot)


@app.command()
@cli_errors
def estimate(label_dir: Optional[str] = typer.Argument(None, help="a top-k or sampled label set made with the "
                                                      "settings to plan for (a directory or URI): bytes measured on it"),
             tokens: float = typer.Option(..., help="tokens in the corpus, e.g. 5e12"),
             vocab: Optional[int] = typer.Option(None, help="the teacher's vocabulary size (default: the label "
                                                 "set's; required without one)"),
             k: Optional[int] = typer.Option(None, help="top-k entries per position (default: the label set's, "
                                             "else 64)"),
             full: bool = typer.Option(False, "--full", help="also print full-vocabulary storage (fp32, bf16, fp8)"),
             as_json: bool = typer.Option(False, "--json", help="print JSON"),
             from_dir: Optional[str] = typer.Option(None, "--from", hidden=True)):
    """Storage for a corpus: bytes per position measured on a small label set, times the tokens."""
    from labelgen.settings import renamed_note
    from labelgen.tools.inspection import estimate as run, format_estimate
    if from_dir is not None:
        if label_dir is not None:
            raise OptionError("--from: the old way to pass the label set: pass it once, as LABEL_DIR")
        renamed_note("", "--from DIR", "the argument LABEL_DIR (as in validate and inspect)")
        label_dir = from_dir
    r = run(tokens, vocab, k, label_dir)
    typer.echo(json.dumps(r, indent=2) if as_json else format_estimate(r, full))


def _kv(pairs: list[str] | None, option: str) -> dict | None:
    """KEY=VALUE pairs; values parsed as JSON when they can be (numbers, bools)."""
    if not pairs:
        return None
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise OptionError(f"{option}: expected KEY=VALUE, got {p!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _worker_from_env(torchrun: bool = True, out: str | None = None) -> tuple[int | None, int | None]:
    """(num_workers, worker_index) from a Slurm array or torchrun, if present
    (`torchrun` False: its ranks are one tensor-parallel teacher, not workers).
    An array task is the worker its task id names (submit --array=0-N-1); the
    number of workers is the one the run in `out` recorded, so a resubmission
    of its missing tasks (--array=3,5: SLURM_ARRAY_TASK_COUNT 2) keeps it,
    else the array's highest task id + 1."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env:
        from labelgen.generate.resume import recorded_workers
        task = int(env["SLURM_ARRAY_TASK_ID"])
        return (recorded_workers(out) if out else None) or int(env.get("SLURM_ARRAY_TASK_MAX", task)) + 1, task
    if torchrun and "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"])
    return None, None


GENERATE_PANELS = {
    "Input": "input text_field prompt_field messages_field id_field skip_bad max_seq_len stride",
    "Teacher": "teacher backend dtype device tp engine batch_tokens peak_tflops",
    "Labels": "mode k keep_mass min_prob draws proposal_temperature draw_logprobs n temperature top_p max_new_tokens "
              "seed round",
    "Output": "out rows_per_shard encoding resume overwrite inputs_changed",
    "Run": "num_workers worker_index ray ray_gpus ray_cpus ray_retries progress dry_run",
}


@app.command()
@clikit.show_defaults(GenerateConfig, GENERATE_PANELS, input="inputs")
@cli_errors(on_stop="finished shards are kept: rerun the same command with --resume to continue")
def generate(
    config: Optional[Path] = typer.Argument(None, help="YAML/JSON config file; flags override its keys"),
    teacher: Optional[str] = typer.Option(None, help="teacher model directory (HF format; a hub model: "
                                          "`hf download ORG/NAME --local-dir DIR` first)"),
    input: Optional[List[str]] = typer.Option(None, "--input", help="JSONL, .jsonl.zst, Parquet or text file, or a "
                                              "directory of them (repeatable)"),
    out: Optional[str] = typer.Option(None, help="output label directory, or an s3:// gs:// URI"),
    mode: Optional[str] = typer.Option(None, help="topk | sampled (hf backend) | sample (completions) | greedy | "
                                       "tokens | score (--input: a samples label set)"),
    backend: Optional[str] = typer.Option(None, help="hf (transformers: every mode) | vllm (topk, sample, greedy, "
                                          "tokens, score)"),
    k: Optional[int] = typer.Option(None, help="top-k entries per position (the cap under adaptive truncation)"),
    keep_mass: Optional[float] = typer.Option(None, help="adaptive truncation: keep a position's entries until they hold this mass (1: all k)"),
    min_prob: Optional[float] = typer.Option(None, help="adaptive truncation: drop entries below this probability (the top-1 is always kept)"),
    draws: Optional[int] = typer.Option(None, help="sampled mode: draws per position (docs/choosing.md: 12 the "
                                        "budget pick at 11 B, 20-50 not told apart from full KD)"),
    proposal_temperature: Optional[float] = typer.Option(None, help="sampled mode: draw from softmax(logits / T)"),
    draw_logprobs: Optional[bool] = typer.Option(None, "--draw-logprobs", help="sampled mode: store the drawn ids' "
                                                 "teacher logprobs at T = 1 too (~1 B per id)"),
    max_seq_len: Optional[int] = typer.Option(None, help="window length in tokens (default: the teacher's context, "
                                              "at most 2048)"),
    stride: Optional[int] = typer.Option(None, help="tokens between window starts (default: max-seq-len - 1, "
                                         "windows that share one token)"),
    batch_tokens: Optional[int] = typer.Option(None, help="padded tokens per teacher batch"),
    n: Optional[int] = typer.Option(None, help="sample mode: completions per prompt"),
    temperature: Optional[float] = typer.Option(None, help="sample mode: the teacher's sampling temperature"),
    top_p: Optional[float] = typer.Option(None, help="sample mode: nucleus sampling's probability mass"),
    max_new_tokens: Optional[int] = typer.Option(None, help="sample and greedy modes: tokens per completion at most"),
    seed: Optional[int] = typer.Option(None, help="seeds sampling and draws (a rerun writes the same labels)"),
    round: Optional[int] = typer.Option(None, "--round", help="score mode: the on-policy round the completions come from"),
    text_field: Optional[str] = typer.Option(None, help="the input records' field holding the text to label"),
    prompt_field: Optional[str] = typer.Option(None, help="sample/greedy modes: the field holding a plain prompt"),
    messages_field: Optional[str] = typer.Option(None, help="the field holding chat messages, rendered with the "
                                                 "teacher's chat template"),
    id_field: Optional[str] = typer.Option(None, help="the field holding a record id kept with its labels "
                                           "(default: file:line)"),
    rows_per_shard: Optional[int] = typer.Option(None, help="input records per shard"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16"),
    device: Optional[str] = typer.Option(None, help="hf backend: auto | cpu | cuda[:N]"),
    tp: Optional[int] = typer.Option(None, "--tp", help="hf backend: tensor-parallel ranks per teacher (under torchrun)"),
    peak_tflops: Optional[float] = typer.Option(None, help="one device's dense peak TFLOP/s for the MFU figure "
                                                "(default: the GPU's bf16 peak by name)"),
    engine: Optional[List[str]] = typer.Option(None, help="vLLM engine option KEY=VALUE (repeatable)"),
    encoding: Optional[List[str]] = typer.Option(None, help="shard encoding option KEY=VALUE (repeatable)"),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad", help="skip bad records and count them"),
    resume: Optional[bool] = typer.Option(None, "--resume", help="continue a run in --out"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="delete what a labelgen run wrote in --out and start over"),
    inputs_changed: Optional[bool] = typer.Option(None, "--inputs-changed", help="resume although inputs changed: keep "
                                                  "the finished shards whose input records are unchanged"),
    num_workers: Optional[int] = typer.Option(None, help="data-parallel workers (default: Slurm array / WORLD_SIZE)"),
    worker_index: Optional[int] = typer.Option(None, help="this worker (default: Slurm array task / RANK)"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="a progress bar on stderr"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run the --num-workers units as Ray tasks, then finalize: "
                                      "local (a Ray instance on this machine), auto (this node's cluster) or an address"),
    ray_gpus: float = typer.Option(0.0, "--ray-gpus", help="GPUs per unit (with --ray)"),
    ray_cpus: float = typer.Option(1.0, "--ray-cpus", help="CPUs per unit (with --ray)"),
    ray_retries: int = typer.Option(3, "--ray-retries", help="reruns of a unit whose process or node died (with --ray)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check everything the job checks before loading the teacher "
                                 "(inputs, teacher directory, options against the teacher and backend), print the "
                                 "resolved config and exit"),
):
    """Run a teacher over inputs and write label shards (top-k soft labels or completions)."""
    params = dict(locals())

    def resolved(torchrun_workers: bool, out_dir: str | None = None) -> GenerateConfig:
        env_workers, env_index = _worker_from_env(torchrun_workers, out_dir)
        if ray is not None:   # every unit is run from here: the Slurm/torchrun environment does not pick one
            env_workers, env_index = 1, 0
        overrides = clikit.overrides(GenerateConfig, params, inputs=input, engine=_kv(engine, "--engine"),
                                     encoding=_kv(encoding, "--encoding"),
                                     num_workers=num_workers if num_workers is not None else env_workers,
                                     worker_index=worker_index if worker_index is not None else env_index)
        return GenerateConfig.from_sources(str(config) if config else None, overrides)
    cfg = resolved(torchrun_workers=False)
    # With --tp torchrun's ranks are the tensor-parallel teacher's, else data-parallel workers; a Slurm array
    # task reads the worker count of the run it resumes.
    cfg = resolved(torchrun_workers=cfg.tp == 1, out_dir=cfg.out)
    if dry_run:   # what the job refuses before it loads the teacher, refused now (a queued GPU job would waste its slot)
        from labelgen.generate.job import preflight
        if ray is not None:
            from labelgen.generate.ray_units import check_engine
            check_engine(cfg)
        clikit.print_json(preflight(cfg)[0].to_dict())
        return
    if ray is not None:
        from labelgen.generate.ray_units import RayConfig, run_on_ray
        m = run_on_ray(cfg, RayConfig(address=ray, gpus_per_unit=ray_gpus, cpus_per_unit=ray_cpus, retries=ray_retries))
        typer.echo(f"wrote {m['counts']['rows']:,} rows ({m['counts']['positions']:,} positions) in {len(m['shards'])} "
                   f"shards to {cfg.out} from {cfg.num_workers} Ray units in {m['summary']['seconds']:.1f}s; manifest written")
        return
    from labelgen.generate import run
    m = run(cfg)
    if "tp_follower" in m:   # the leader (rank 0) reports
        return
    s = m["summary"]
    if s.get("complete"):
        typer.echo(f"{cfg.out}: already complete ({m['counts']['rows']:,} rows in {len(m['shards'])} shards); nothing to do")
        return
    typer.echo(f"wrote {m['counts']['rows']:,} rows ({m['counts']['positions']:,} {'completion tokens' if cfg.kind == 'samples' else 'positions'}) "
               f"in {len(m['shards'])} shards to {cfg.out}; {m['counts']['skipped']} skipped; "
               f"{s['teacher_tokens']:,} teacher tokens in {s['seconds']:.1f}s ({s['tokens_per_second']:,.0f} tok/s"
               + (f", MFU {s['mfu']:.1%} of {s['peak_tflops']:,.0f} TFLOP/s)" if s.get("mfu") is not None else ")"))


@app.command()
@cli_errors
def finalize(label_dir: str = typer.Argument(..., help="label directory (or s3:// gs:// URI) written by several workers"),
             missing: bool = typer.Option(False, "--missing", help="print the workers that have not finished, as a "
                                                                  "Slurm --array= list, and write nothing")):
    """Merge the workers' partial manifests into manifest.json (fails if any slice is missing)."""
    if missing:
        from labelgen.generate.finalize import slurm_array, unfinished_workers
        left, n = unfinished_workers(label_dir)
        typer.echo(f"{len(left)} of {n} workers have not finished" + (": resubmit them with --array=" if left else ""),
                   err=True)
        if left:
            typer.echo(slurm_array(left))
        return
    from labelgen.generate.finalize import finalize as run
    m = run(label_dir)
    typer.echo(f"{label_dir}: {len(m['shards'])} shards, {m['counts']['rows']:,} rows; manifest written")


@app.command()
@cli_errors
def export(label_dir: str = typer.Argument(..., help="top-k label set made with --messages-field (a directory or URI)"),
           out: Path = typer.Argument(..., help="JSONL file to write"),
           to: str = typer.Option("axolotl", "--to", help="target format: axolotl"),
           inputs: Optional[List[str]] = typer.Option(None, "--input",
                                                      help="the inputs the labels were made from (default: the manifest's)")):
    """Write top-k labels of chat conversations for another trainer: --to axolotl writes the messages plus
    per-token {"token": "token_id:N", "logprob": x} lists that Axolotl's KD plugin reads."""
    if to != "axolotl":
        raise OptionError(f"--to: unknown target {to!r} (known: axolotl)")
    from labelgen.tools.export import export_axolotl
    stats = export_axolotl(label_dir, out, inputs)
    typer.echo(f"wrote {stats['rows']:,} conversations ({stats['tokens']:,} tokens) to {out}")


@app.command("import")
@cli_errors(on_stop="nothing was kept: rerun the command to start over")
def import_cmd(inputs: List[str] = typer.Argument(..., help="JSONL (or .jsonl.zst) files of vLLM prompt_logprobs"),
               tokenizer: str = typer.Option(..., help="the teacher's tokenizer directory (HF format)"),
               k: int = typer.Option(..., help="entries kept per position (the prompt_logprobs the requests asked for)"),
               out: Path = typer.Option(..., help="label set directory to write"),
               rows_per_shard: int = typer.Option(1000, help="sequences per shard"),
               overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out")):
    """Turn teacher logprobs saved from vLLM (prompt_token_ids + prompt_logprobs per line) into a top-k label set."""
    from labelgen.tools.import_logprobs import import_prompt_logprobs
    m = import_prompt_logprobs(inputs, out, tokenizer, k, overwrite=overwrite, rows_per_shard=rows_per_shard,
                               log=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"wrote {m['counts']['rows']:,} rows ({m['counts']['positions']:,} positions, k={k}) to {out}")


@app.command("convert-gguf")
@cli_errors
def convert_gguf(gguf_file: Path = typer.Argument(..., help="a .gguf model file (llama.cpp format)"),
                 out: Path = typer.Argument(..., help="HF model directory to write (must not exist, or be empty)"),
                 overwrite: bool = typer.Option(False, "--overwrite", help="replace the model labelgen wrote in OUT")):
    """Dequantize a GGUF model into an HF directory usable as --teacher (needs labelgen[gguf])."""
    from labelgen.tools.gguf import convert_gguf as run
    run(gguf_file, out, log=lambda m: typer.echo(m, err=True), overwrite=overwrite)
    typer.echo(f"teacher saved to {out}")


@app.command("demo-teacher")
@cli_errors
def demo_teacher(out: Path = typer.Argument(..., help="where to save the teacher (HF format)"),
                 corpus: Optional[List[str]] = typer.Option(None, help="text files/directories (default: Python's stdlib source)"),
                 steps: Optional[int] = typer.Option(None, help="training steps"),
                 seed: Optional[int] = typer.Option(None, help="seeds the teacher's initialisation and training"),
                 overwrite: bool = typer.Option(False, "--overwrite", help="replace the model labelgen wrote in OUT")):
    """Build and briefly train a small Llama-style teacher locally (no downloads)."""
    from labelgen.tools.demo import DemoTeacherConfig, build_demo_teacher
    cfg = DemoTeacherConfig(**{k: v for k, v in dict(steps=steps, seed=seed).items() if v is not None})
    build_demo_teacher(out, corpus, cfg, log=lambda m: typer.echo(m, err=True), overwrite=overwrite)
    typer.echo(f"teacher saved to {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
