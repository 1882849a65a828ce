"""A generation run's `--num-workers` units as Ray tasks (`labelgen generate
--ray ADDRESS`), for clusters that run Ray rather than Slurm.

Each unit is the same resumable worker a Slurm array task runs
(`generate.run` with worker_index i of n, `--resume`): no second generation
loop. Ray reruns a unit whose process or node died (`retries`); the rerun
resumes from the unit's own finished shards. A unit that fails for a reason
a retry cannot fix (bad input or config: an exception from the unit) is not
retried: the run stops, naming the unit and its error. When every unit has
finished, the driver finalizes once (manifest.json written last).

Ray is an optional extra (`pip install -e '.[ray]'`); nothing else
imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import time
from dataclasses import dataclass

from labelgen.errors import LabelgenError, OptionError
from labelgen.generate.config import GenerateConfig
from labelgen.generate.inputs import InputError
from labelgen.store import bounded


@dataclass(frozen=True)
class RayConfig:
    address: str = "local"
    """local: start a Ray instance on this machine; auto: the cluster this
    node belongs to (`ray start`, KubeRay); or an address (ray://host:10001)."""
    gpus_per_unit: float = 0.0
    """GPUs each unit holds (several for a vLLM --engine tensor_parallel_size)."""
    cpus_per_unit: float = 1.0
    """CPUs each unit holds (Ray sets OMP_NUM_THREADS to it)."""
    retries: int = 3
    """Reruns of a unit whose worker process or node died."""
    object_store_mb: int = 256
    """Object store of a local instance: units pass only small manifests."""

    def __post_init__(self):
        if self.gpus_per_unit < 0 or self.cpus_per_unit <= 0:
            raise OptionError("--ray-gpus/--ray-cpus: per-unit resources must be >= 0 (GPUs) and > 0 (CPUs)")
        if self.retries < 0:
            raise OptionError(f"--ray-retries: must be >= 0, got {self.retries}")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A cluster address (host:port, ray://host:port) must answer a TCP
    connection: ray.init would otherwise retry for minutes, deaf to signals."""
    if address in ("local", "auto"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise OptionError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); start one "
                         "(`ray start --head`) or pass --ray auto (this node's cluster) or --ray local") from None


class _NotInMainThread(logging.Filter):
    """Ray's warning that it set no SIGTERM handler: `_connect` keeps labelgen's on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _connect(ray, ray_cfg: RayConfig) -> None:
    """ray.init, in a thread the main thread waits on (bounded.call): a signal
    still stops the run (ray.init in the main thread would also replace
    labelgen's SIGTERM handler with one exiting 15, not 75), and a cluster
    address must connect within the store deadline: a port that answers TCP
    but is no Ray cluster's keeps ray.init retrying for minutes."""
    _check_reachable(ray_cfg.address)
    kw = dict(log_to_driver=False, configure_logging=False)
    if ray_cfg.address == "local":   # starting an instance here may take long on a busy machine: no deadline
        kw.update(include_dashboard=False, object_store_memory=ray_cfg.object_store_mb << 20)
    else:
        kw["address"] = ray_cfg.address
    limit = None if ray_cfg.address == "local" else bounded.deadline()
    quiet = _NotInMainThread()
    logging.getLogger("ray._private.worker").addFilter(quiet)
    try:
        bounded.call(ray.init, limit=limit, **kw)
    except TimeoutError:
        raise OptionError(f"--ray {ray_cfg.address}: something answers there but no Ray cluster connected in "
                         f"{limit:.0f} s ($LABELGEN_STORE_TIMEOUT); pass a Ray head's address (`ray start --head` "
                         "prints it; port 6379 by default), --ray auto (this node's cluster) or --ray local") from None
    finally:
        logging.getLogger("ray._private.worker").removeFilter(quiet)


def _unit(cfg: GenerateConfig) -> dict:
    """One unit, in a Ray worker process: the worker's run; its partial manifest's counts."""
    from labelgen.generate import run
    m = run(cfg)
    return {"counts": m["counts"], "summary": m.get("summary", {})}


class UnitFailed(LabelgenError):
    """A unit ended with an error a retry cannot fix."""


def _what_to_do(cause: BaseException, lines: list[str]) -> str:
    """The advice after a unit's error: a refusal naming an option says it itself."""
    if lines and lines[-1].startswith("--"):
        return ""
    if isinstance(cause, InputError):
        return ("; fix the input and rerun the same command with --inputs-changed (finished shards whose input "
                "records are unchanged are kept)")
    return "; fix it and rerun the same command (finished units are kept)"


def check_engine(cfg: GenerateConfig) -> None:
    """What a Ray run refuses in a config: Ray runs every unit (no worker index of its own), one process each."""
    if cfg.worker_index != 0:
        raise OptionError("--worker-index: not with --ray, which runs every unit")
    if cfg.tp > 1:
        raise OptionError("--tp: not with --ray (a Ray unit is one process): launch torchrun per node (a Slurm array), "
                         "or use vLLM's tensor parallelism in the units (--backend vllm --engine tensor_parallel_size=N "
                         "--ray-gpus N)")


def run_on_ray(cfg: GenerateConfig, ray_cfg: RayConfig) -> dict:
    """Run cfg's num_workers units as Ray tasks, then finalize. Returns the manifest."""
    check_engine(cfg)
    try:
        import ray
    except ImportError:
        raise OptionError("--ray: Ray is not installed; pip install -e '.[ray]' in the labelgen checkout") from None
    from labelgen.generate.finalize import finalize
    n = cfg.num_workers
    if not ray.is_initialized():
        _connect(ray, ray_cfg)
    task = ray.remote(num_cpus=ray_cfg.cpus_per_unit, num_gpus=ray_cfg.gpus_per_unit,
                      max_retries=ray_cfg.retries, retry_exceptions=False)(_unit)
    units = {task.remote(dataclasses.replace(cfg, worker_index=i, resume=True, progress=False, overwrite=False)): i
             for i in range(n)}
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="unit", desc=f"labelgen {cfg.mode} on Ray", dynamic_ncols=True)
    counts = {"rows": 0, "positions": 0}
    t0 = time.time()
    pending = list(units)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                lines = [line for line in str(cause).strip().splitlines() if line.strip()]
                raise UnitFailed(f"unit {units[ref]} of {n} failed: {lines[-1] if lines else type(cause).__name__}"
                                 + _what_to_do(cause, lines)) from None
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
                raise UnitFailed(f"unit {units[ref]} of {n} failed after {ray_cfg.retries} retries: "
                                 f"{type(e).__name__}; rerun the same command to resume it") from None
            for key in counts:
                counts[key] += result["counts"].get(key, 0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{counts['rows']:,} rows, {counts['positions']:,} positions", refresh=False)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        for ref in pending:   # fetched, so Ray does not print their errors as unhandled tracebacks at exit
            with contextlib.suppress(ray.exceptions.RayError):   # cancelled, as asked: the error raised is the one above
                ray.get(ref, timeout=30)
        raise
    finally:
        if bar is not None:
            bar.close()
    manifest = finalize(cfg.out)
    manifest["summary"] = {"seconds": round(time.time() - t0, 2), "units": n}
    return manifest
