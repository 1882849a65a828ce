"""Tensor parallelism for the hf backend: one teacher over --tp ranks.

    torchrun --nproc-per-node 8 -m labelgen.cli generate --tp 8 --teacher BIG ...

transformers' tensor-parallel plan shards the layers (its `tp_plan`, over
one torchrun world: WORLD_SIZE = --tp); every rank gets the full hidden
states, computes the logits of its slice of the vocabulary with the head's
local shard and the slices are gathered per chunk, so top-k, normaliser, rank
and sampled draws are computed as on one device (labels equal to one process
up to the layers' reduction order). Rank 0, the leader, runs the whole job
(reads, batches, writes); it sends every teacher call to the other ranks, the
followers, which run their share of it, keep nothing and write nothing.
Data-parallel workers across nodes are separate launches (a Slurm array of
torchrun jobs, or --num-workers/--worker-index), as without --tp.

Messages are tensors (an op, then the windows and their arguments); no object
is pickled.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from labelgen.errors import OptionError, one_line

STOP, LOAD, SCORE, DRAW = 0, 1, 2, 3


class Group:
    """This process's place in a tensor-parallel teacher (a context: the
    leader tells the followers to stop when it leaves without an error)."""

    def __init__(self, tp: int, device: str = "auto"):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != tp:
            raise OptionError(f"--tp {tp}: launch it with torchrun --nproc-per-node {tp} (WORLD_SIZE is {world}); "
                             "run data-parallel teachers as separate launches (a Slurm array, --num-workers)")
        cuda = torch.cuda.is_available() and device != "cpu"   # each rank takes the GPU of its LOCAL_RANK
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.size, self.rank = tp, dist.get_rank()
        self.leader = self.rank == 0
        self.stopped = False
        self.shards: list[int] = []   # vocabulary rows of the head on each rank

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, kind, *_) -> None:
        # After an error a follower may be inside a collective the leader left:
        # the leader then just exits, and torchrun stops the group.
        if self.leader and kind is None and not self.stopped:
            self.send(STOP)
        if kind is None and dist.is_initialized():
            dist.destroy_process_group()

    def send(self, op: int, windows: list[np.ndarray] = (), number: int = 0, seeds: list[int] = (),
             temperature: float = 1.0) -> None:
        """The leader: announce a call (op, its windows, k or draws, seeds, temperature)."""
        self.stopped = op == STOP
        head = torch.tensor([op, len(windows), sum(len(w) for w in windows), number], dtype=torch.long)
        dist.broadcast(head.to(self.device), src=0)
        if op in (SCORE, DRAW):
            lengths = torch.tensor([len(w) for w in windows], dtype=torch.long)
            flat = torch.from_numpy(np.concatenate(windows).astype(np.int64))
            for t in (lengths, flat):
                dist.broadcast(t.to(self.device), src=0)
        if op == DRAW:
            dist.broadcast(torch.tensor(list(seeds), dtype=torch.long, device=self.device), src=0)
            dist.broadcast(torch.tensor([temperature], dtype=torch.float64, device=self.device), src=0)

    def receive(self) -> tuple:
        """A follower: the next call, as (op, windows, number, seeds, temperature)."""
        head = torch.empty(4, dtype=torch.long, device=self.device)
        dist.broadcast(head, src=0)
        op, n, total, number = head.tolist()
        if op not in (SCORE, DRAW):
            return op, [], number, [], 1.0
        lengths = torch.empty(n, dtype=torch.long, device=self.device)
        flat = torch.empty(total, dtype=torch.long, device=self.device)
        for t in (lengths, flat):
            dist.broadcast(t, src=0)
        windows = np.split(flat.cpu().numpy(), np.cumsum(lengths.cpu().numpy())[:-1])
        seeds, temperature = [], 1.0
        if op == DRAW:
            s = torch.empty(n, dtype=torch.long, device=self.device)
            t = torch.empty(1, dtype=torch.float64, device=self.device)
            dist.broadcast(s, src=0)
            dist.broadcast(t, src=0)
            seeds, temperature = s.tolist(), float(t.item())
        return op, windows, number, seeds, temperature

    def load(self, path: str, dtype: torch.dtype):
        """The teacher with its layers sharded over the group (every rank calls it)."""
        from transformers import AutoModelForCausalLM
        try:
            from transformers.distributed import DistributedConfig
            shard = {"distributed_config": DistributedConfig(tp_size=self.size)}
        except ImportError:   # transformers before the DistributedConfig API
            shard = {"tp_plan": "auto"}
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, **shard)
        except Exception as e:   # no tensor-parallel plan for this architecture, heads not divisible, bad weights
            raise OptionError(f"--tp {self.size}: cannot shard the model in {path} ({one_line(e)})") from None

    def head_shard(self, head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's rows of the LM head (weight, bias): its vocabulary
        slice, or the whole head where the plan does not split it that way."""
        from torch.distributed.tensor import DTensor, Shard
        bias = getattr(head, "bias", None)
        if not (isinstance(head.weight, DTensor) and tuple(head.weight.placements) == (Shard(0),)):
            self.shards = []   # every rank holds the whole head: nothing to gather
            whole = [t.full_tensor() if isinstance(t, DTensor) else t for t in (head.weight, bias) if t is not None]
            return whole[0], (whole[1] if bias is not None else None)
        local = head.weight.to_local()
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], device=self.device))
        self.shards = [int(n.item()) for n in sizes]
        return local, (bias.to_local() if isinstance(bias, DTensor) else bias)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[c, this rank's vocabulary slice] -> [c, V], in rank order."""
        if not self.shards:
            return logits
        width = max(self.shards)
        padded = torch.nn.functional.pad(logits, (0, width - logits.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:, :n] for p, n in zip(parts, self.shards)], dim=1)
