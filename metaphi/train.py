"""The meta-training loop: meta-batches, the outer optimizer, validation, logging and checkpoints.

One loop serves every algorithm and estimator: an estimator turns a meta-batch of tasks into a
gradient (or update direction) for φ; the outer optimizer applies it. A checkpoint holds everything
needed to continue a killed run to the same result: φ, the optimizer's state, the sampler's
generator state and the iteration, written atomically by ``metaphi.checkpoint`` as plain data (dicts,
lists, numbers, strings, tensors; the config as a dict) and read back without unpickling any code.

Under ``torchrun`` (a process group is initialized, see ``metaphi.distributed``) each meta-batch is
split across the processes and their meta-gradients are all-reduced before the optimizer step, so a
run on N processes is the run on one with the same total meta-batch; only rank 0 writes the log and
checkpoints, shows progress and validates.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from metaphi import checkpoint as checkpoints
from metaphi import distributed
from metaphi.functional import Params
from metaphi.tasks import Task

CHECKPOINT_FORMAT = 1


class NonFiniteLoss(RuntimeError):
    """The meta-training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    iterations: int = 1000
    meta_batch: int = 16
    meta_lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    val_every: int = 100
    checkpoint_every: int = 50
    device: str = "cpu"


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer | None:
    params = list(params)
    if not params:  # a learner with nothing to meta-learn (pixel-nn)
        return None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer '{name}' (valid: adam, sgd)")


@dataclass
class TrainState:
    phi: Params
    optimizer: torch.optim.Optimizer | None
    generator: torch.Generator
    iteration: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    estimator: dict | None = None  # the estimator's own state (its generator's seed and step), if it has one


def save_checkpoint(path: str, algorithm, state: TrainState, config: TrainConfig, run: dict) -> None:
    checkpoints.save({
        "format": CHECKPOINT_FORMAT,
        "algorithm": algorithm.spec(),
        "phi": {k: v.detach().cpu() for k, v in state.phi.items()},
        "optimizer": state.optimizer.state_dict() if state.optimizer else None,
        "generator": state.generator.get_state(),
        "iteration": state.iteration,
        "train_seconds": state.train_seconds,
        "history": state.history,
        "estimator": state.estimator,
        "config": asdict(config),
        "run": run,
    }, path)


def load_checkpoint(path: str) -> dict:
    """The checkpoint at ``path`` as plain data; a ``metaphi.checkpoint.CheckpointError`` (a ValueError)
    for a file that is not one."""
    ck = checkpoints.load(path)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise checkpoints.CheckpointError(f"{path} is not a metaphi checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


def meta_train(algorithm, estimator, sample_tasks: Callable[[int, torch.Generator], Task], config: TrainConfig,
               out_dir: str | None = None, validate: Callable[[Params], float] | None = None, resume: bool = False,
               run: dict | None = None, progress: bool = True) -> TrainState:
    """Optimize φ of ``algorithm`` for ``config.iterations`` meta-batches.

    ``sample_tasks(n, generator)`` gives a batched Task. With ``out_dir``, metrics go to
    ``out_dir/metrics.jsonl`` and checkpoints to ``out_dir/checkpoint.pt``; ``resume`` continues
    from that checkpoint. A non-finite loss raises NonFiniteLoss after saving the last good state.
    """
    run = run or {}
    device = torch.device(config.device)
    phi = {k: v.detach().to(device).requires_grad_() for k, v in algorithm.init_meta_params().items()}
    state = TrainState(phi, make_optimizer(config.optimizer, list(phi.values()), config.meta_lr),
                       torch.Generator().manual_seed(config.seed))
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    if world > 1 and config.meta_batch < world:
        raise ValueError(f"a meta-batch of {config.meta_batch} tasks cannot be split across {world} processes; "
                         f"use a meta-batch of at least {world}")
    if out_dir and main:
        os.makedirs(out_dir, exist_ok=True)
    ck_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    log_path = os.path.join(out_dir, "metrics.jsonl") if out_dir and main else None
    if resume:
        if not ck_path or not os.path.exists(ck_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ck_path}")
        ck = load_checkpoint(ck_path)
        if ck["algorithm"] != algorithm.spec():
            raise ValueError(f"--resume: {ck_path} was written by a different configuration ({ck['algorithm']['name']})")
        for k, v in ck["phi"].items():
            state.phi[k].data.copy_(v)
        if state.optimizer:
            state.optimizer.load_state_dict(ck["optimizer"])
        state.generator.set_state(ck["generator"])
        state.iteration, state.train_seconds, state.history = ck["iteration"], ck["train_seconds"], ck["history"]
        if ck.get("estimator") is not None and hasattr(estimator, "load_state_dict"):
            estimator.load_state_dict(ck["estimator"])
    elif hasattr(estimator, "start"):  # estimators with randomness of their own draw it from the run's seed
        estimator.start(config.seed)
    distributed.broadcast_params(state.phi)  # every rank starts from rank 0's φ, whatever its own init drew
    if log_path:
        # the log holds exactly the iterations the checkpoint holds, so a resumed run's log is whole
        with open(log_path, "w") as f:
            for row in state.history:
                f.write(json.dumps(row) + "\n")

    def checkpoint() -> None:
        if ck_path and main:
            state.estimator = estimator.state_dict() if hasattr(estimator, "state_dict") else None
            save_checkpoint(ck_path, algorithm, state, config, run)

    bar = tqdm(total=config.iterations, initial=state.iteration, desc=f"meta-train {algorithm.name}",
               disable=not progress or not main, dynamic_ncols=True)
    last_val = None
    try:
        while state.iteration < config.iterations:
            started = time.perf_counter()
            tasks = sample_tasks(config.meta_batch, state.generator)
            if world > 1:  # every rank draws the whole meta-batch from the one stream and keeps its share
                tasks = distributed.shard(tasks, rank, world)
            tasks = tasks.to(device)
            before = estimator.state_dict() if hasattr(estimator, "state_dict") else None
            grads, metrics = estimator(algorithm, state.phi, tasks)
            if world > 1:
                local = distributed.shard_sizes(config.meta_batch, world)[rank]
                grads, metrics = distributed.all_reduce_mean(grads, metrics, local, config.meta_batch)
            if not math.isfinite(metrics["loss"]) or not all(torch.isfinite(g).all() for g in grads.values()):
                if before is not None:
                    estimator.load_state_dict(before)
                checkpoint()  # the state before this step is the last good one
                raise NonFiniteLoss(
                    f"the meta-training loss became {metrics['loss']} at iteration {state.iteration + 1}; "
                    f"the last good state is kept in {ck_path or '(no --out)'}. Lower --meta-lr or --inner-lr.")
            state.optimizer.zero_grad(set_to_none=True)
            for k, p in state.phi.items():
                p.grad = grads[k]
            state.optimizer.step()
            state.iteration += 1
            state.train_seconds += time.perf_counter() - started
            row = {"iteration": state.iteration, **metrics, "seconds": round(state.train_seconds, 3)}
            if validate and main and (state.iteration % config.val_every == 0 or state.iteration == config.iterations):
                last_val = validate(state.phi)
                row["val"] = last_val
            state.history.append(row)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if state.iteration % config.checkpoint_every == 0 and state.iteration < config.iterations:
                checkpoint()
            shown = {k: f"{v:.4g}" for k, v in metrics.items()}
            if last_val is not None:
                shown["val"] = f"{last_val:.4g}"
            bar.set_postfix(shown)
            bar.update(1)
    finally:
        bar.close()
    checkpoint()
    return state
