"""Meta-training on several processes: ranks, meta-batch splitting and the all-reduce of meta-gradients.

``torchrun --nproc_per_node N -m metaphi run ...`` starts N processes with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and a rendezvous address in their environment; ``init_from_env`` joins them into one
process group (gloo on CPU, NCCL on CUDA, one GPU per process).

Data parallelism over tasks: the meta-gradient is a mean over the tasks of a meta-batch,

    g = 1/B Σ_{i=1..B} g_i = Σ_r (n_r / B) · ḡ_r,    ḡ_r = 1/n_r Σ_{i ∈ shard r} g_i,

so each rank computes the mean over its shard of n_r tasks, scales it by n_r / B and one
all-reduce (sum) gives every rank the gradient of the whole meta-batch; the outer optimizer then
takes the same step everywhere and φ stays identical on all ranks. Every rank draws the whole
meta-batch from the one seeded task stream and keeps its own shard: the ranks learn from different
tasks, the run is reproducible from the seed, and it is the same run (to floating-point rounding)
for any number of processes, so a checkpoint can be resumed with another N.
"""
from __future__ import annotations

import datetime
import os
from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from metaphi.functional import Params
from metaphi.tasks import Task

#: how long a collective waits for the other ranks: rank 0 alone evaluates the test tasks while the
#: others wait at the next meta-training's first collective
TIMEOUT = datetime.timedelta(hours=2)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes checkpoints, logs, results and progress bars (rank 0)."""
    return rank() == 0


def env_world_size() -> int:
    """The number of processes torchrun started (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str = "cpu") -> str:
    """Join the process group torchrun set up, if there is one; returns the device this rank uses.

    With ``WORLD_SIZE`` <= 1 nothing happens and ``device`` is returned as it is. On CUDA each
    process takes the GPU of its ``LOCAL_RANK`` (unless ``device`` names one).
    """
    if env_world_size() <= 1:
        return device
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
        if torch.device(device).index is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if not is_initialized():
        dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    return device


def shutdown(wait: bool = True) -> None:
    """Leave the process group; with ``wait`` every rank first waits for the others to get here.

    A rank that destroys its gloo group while a peer still holds the connection (rank 0 evaluating the
    test tasks, writing results) can abort at exit ("terminate called without an active exception"), so
    on a normal end the ranks leave together. After an error there is no waiting: the launcher stops the
    other ranks.
    """
    if is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shard_sizes(n: int, world: int) -> list[int]:
    """Tasks per rank: as even as can be, the first ``n % world`` ranks one more."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def shard(tasks: Task, rank_: int, world: int) -> Task:
    """This rank's contiguous share of a batched Task (leading dim = task)."""
    sizes = shard_sizes(_batch_size(tasks), world)
    start = sum(sizes[:rank_])
    return torch.utils._pytree.tree_map(
        lambda t: t[start:start + sizes[rank_]] if isinstance(t, Tensor) else t, tasks)


def _batch_size(tasks: Task) -> int:
    leaves = [t for t in torch.utils._pytree.tree_leaves(tasks) if isinstance(t, Tensor)]
    return leaves[0].shape[0]


def _flat_sum(tensors: list[Tensor]) -> list[Tensor]:
    """All-reduce (sum) a list of tensors with one collective per dtype."""
    out = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view_as(tensors[i])
            offset += n
    return out


def all_reduce_mean(grads: Mapping[str, Tensor], metrics: Mapping[str, float], local: int, total: int
                    ) -> tuple[Params, dict[str, float]]:
    """The meta-batch means of per-shard means: each rank's ``grads`` and ``metrics`` (means over
    its ``local`` tasks) weighted by local / total and summed over ranks. Same result on every rank."""
    if not is_initialized() or world_size() == 1:
        return dict(grads), dict(metrics)
    weight = local / total
    keys = list(grads)
    reduced = _flat_sum([grads[k].detach() * weight for k in keys])
    names = sorted(metrics)
    # metrics travel in float64, on the gradients' device (NCCL reduces only CUDA tensors)
    device = next(iter(grads.values())).device if grads else torch.device("cpu")
    values = torch.tensor([float(metrics[m]) * weight for m in names], dtype=torch.float64, device=device)
    if names:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(keys, reduced)), {m: float(v) for m, v in zip(names, values.tolist())}


def broadcast_params(params: Mapping[str, Tensor], src: int = 0) -> None:
    """Overwrite every rank's ``params`` (in place) with rank ``src``'s."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for k in sorted(params):
            dist.broadcast(params[k].data, src=src)
