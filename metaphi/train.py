"""The meta-training loop: meta-batches, the outer optimizer, validation, logging and checkpoints.

One loop serves every algorithm and estimator: an estimator turns a meta-batch of tasks into a
gradient (or update direction) for φ; the outer optimizer applies it. A checkpoint holds everything
needed to continue a killed run to the same result: φ, the optimizer's and the learning-rate
schedule's state, the sampler's generator state and the iteration, written atomically by
``metaphi.checkpoint`` as plain data (dicts, lists, numbers, strings, tensors; the config as a dict)
and read back without unpickling any code.

The outer step size follows ``TrainConfig.lr_schedule``: constant (the default), or a cosine decay
from ``meta_lr`` to ``lr_min_factor × meta_lr`` at the last iteration (Loshchilov & Hutter 2017,
SGDR, without restarts); either may start with ``warmup`` iterations of linear warm-up.

A run that validates keeps, beside ``checkpoint.pt`` (the last state), ``best.pt``: the state after
the validation with the best score so far (higher or lower as the problem says), in the same format
with ``best = {"iteration", "val"}``. :func:`choose_checkpoint` says which of the two a user means.

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
LAST, BEST = "checkpoint.pt", "best.pt"
SCHEDULES = ("constant", "cosine")


class NonFiniteLoss(RuntimeError):
    """The meta-training loss became NaN or infinite (or diverged: :class:`Diverged`); exit code 3."""


class Diverged(NonFiniteLoss):
    """The meta-training loss stayed past its bound (:data:`DIVERGENCE`) for too many iterations."""


#: the divergence rule: a run stops (exit 3) when its loss has been above ``factor`` x its first
#: iteration's loss (the loss of the initial φ, before any update) for ``patience`` iterations in a row.
#: While the loss is past the bound no checkpoint is written, so checkpoint.pt keeps the last state from
#: before the loss left it.
DIVERGENCE = {"factor": 100.0, "patience": 20}


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
    lr_schedule: str = "constant"  # or "cosine": decay to lr_min_factor × meta_lr at the last iteration
    warmup: int = 0  # iterations of linear warm-up to meta_lr first (either schedule)
    lr_min_factor: float = 0.0  # cosine only


def check_schedule(config: TrainConfig) -> None:
    """A ValueError, naming the flag, for a schedule that cannot run as asked."""
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(f"unknown --lr-schedule '{config.lr_schedule}' (valid: {', '.join(SCHEDULES)})")
    if config.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {config.warmup}")
    if not 0.0 <= config.lr_min_factor <= 1.0:
        raise ValueError(f"--lr-min-factor must be in [0, 1], got {config.lr_min_factor}")
    if config.lr_schedule != "cosine" and config.lr_min_factor != 0.0:
        raise ValueError("--lr-min-factor applies to --lr-schedule cosine only")
    if config.warmup and config.iterations and config.warmup >= config.iterations:
        raise ValueError(f"--warmup {config.warmup} leaves none of the {config.iterations} iterations after the "
                         f"warm-up; give fewer warm-up iterations")


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """``factor(t)``: the outer step size of step ``t`` (0-based) as a fraction of ``meta_lr``.

    Warm-up: ``(t + 1) / warmup`` for ``t < warmup``. Then constant 1, or cosine
    ``m + (1 - m) · (1 + cos(π p)) / 2`` with ``p = (t - warmup) / (iterations - 1 - warmup)``
    (clamped to [0, 1]) and ``m = lr_min_factor``: 1 at the first step after the warm-up, ``m`` at the
    last iteration."""
    warmup, total, floor = config.warmup, config.iterations, config.lr_min_factor
    cosine = config.lr_schedule == "cosine"

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if not cosine:
            return 1.0
        p = min(1.0, max(0.0, (t - warmup) / max(1, total - 1 - warmup)))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer | None, config: TrainConfig):
    """The LambdaLR of ``config``'s schedule, or None for a constant step size without warm-up (the
    optimizer alone, exactly as before schedules existed)."""
    check_schedule(config)
    if optimizer is None or (config.lr_schedule == "constant" and not config.warmup):
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))


class ResumeError(ValueError):
    """``--resume`` refused: no checkpoint to resume, or one written with other settings."""


#: what may change when a run is resumed: how long it runs, how often it validates and saves, where it
#: runs, and its test (which comes after training); everything else must be the checkpoint's
RESUMABLE = frozenset({"iterations", "val_every", "checkpoint_every", "device", "eval_tasks", "eval_seed",
                       "data_root"})


#: records added after checkpoints were first written: a checkpoint older than one is not checked on it
ADDED_SETTINGS = frozenset({"training"})


def resume_difference(ck: dict, config: TrainConfig, run: dict | None) -> str | None:
    """The first setting in which ``config`` and ``run`` differ from the checkpoint's (outside
    :data:`RESUMABLE`), as "--seed 0 (this run: 1)"; None when they agree."""
    pairs = [(ck.get("config") or {}, asdict(config))]
    if run and ck.get("run"):
        pairs.append((ck["run"], run))
    for stored, now in pairs:
        for key in [*stored, *(k for k in now if k not in stored)]:  # in the record's order: shots before eval_shots
            if key in RESUMABLE:
                continue
            if key in ADDED_SETTINGS and key not in stored:
                continue
            was, is_ = _plain(stored.get(key)), _plain(now.get(key))
            if isinstance(was, dict) and isinstance(is_, dict) and key in ADDED_SETTINGS:  # a group of settings
                differ = [k for k in [*was, *(k for k in is_ if k not in was)] if was.get(k) != is_.get(k)]
                key, was, is_ = (differ[0], was.get(differ[0]), is_.get(differ[0])) if differ else (key, None, None)
            if was != is_:
                return f"--{key.replace('_', '-')} {_shown(was)} (this run: {_shown(is_)})"
    return None


def _plain(value):
    """Tuples as lists, as they come back from a checkpoint."""
    return json.loads(json.dumps(value, default=str))


def _shown(value) -> str:
    return "none" if value is None else str(value)


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    best: dict | None = None  # {"iteration", "val"} of the best validation so far


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
        "scheduler": state.scheduler.state_dict() if state.scheduler else None,
        "best": state.best,
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


#: what every run checkpoint holds (eval and predict read these)
REQUIRED_KEYS = ("algorithm", "phi", "run", "iteration")


def load_model(path: str):
    """``(checkpoint, algorithm)`` of the run checkpoint at ``path``, checked: the keys a run writes, an
    algorithm this version knows, and every weight that algorithm needs with its shape (no missing,
    unexpected or misshapen entry). A CheckpointError (one line) for anything else."""
    from metaphi.algorithms import build_algorithm

    ck = load_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing:
        raise checkpoints.CheckpointError(f"{path} lacks '{missing[0]}': it is not a whole metaphi run checkpoint")
    try:
        algorithm = build_algorithm(ck["algorithm"])
        needed = algorithm.init_meta_params()
    except Exception as e:  # an algorithm or model this version does not know, or options it refuses
        name = ck["algorithm"].get("name") if isinstance(ck["algorithm"], dict) else None
        raise checkpoints.CheckpointError(f"{path}: cannot rebuild its algorithm {name!r} ({e}); it was written by "
                                          "another version of metaphi or edited") from None
    phi = ck["phi"]
    if not isinstance(phi, dict):
        raise checkpoints.CheckpointError(f"{path}: its weights are not a mapping of tensors")
    absent = [k for k in needed if k not in phi]
    extra = [k for k in phi if k not in needed]
    if absent or extra:
        what = f"lacks the weight '{absent[0]}'" if absent else f"has a weight '{extra[0]}' its algorithm does not use"
        raise checkpoints.CheckpointError(f"{path} {what} ({algorithm.name}); it was trained with another network "
                                          "or edited")
    for k, v in needed.items():
        if not isinstance(phi[k], torch.Tensor) or tuple(phi[k].shape) != tuple(v.shape):
            shape = tuple(phi[k].shape) if isinstance(phi[k], torch.Tensor) else type(phi[k]).__name__
            raise checkpoints.CheckpointError(f"{path}: weight '{k}' has shape {shape} but {algorithm.name} needs "
                                              f"{tuple(v.shape)}; it was trained with another network or edited")
    return ck, algorithm


def choose_checkpoint(path: str, last: bool = False) -> str:
    """The file a user means by ``path``: a run folder, or the ``checkpoint.pt`` of a folder that also
    holds ``best.pt``, means ``best.pt`` (the best validation score), or ``checkpoint.pt`` (the last
    state) with ``last`` or where the run kept no best. Any other file is itself; a ValueError when
    ``last`` is asked of a file that is neither of a run's two."""
    folder, name = (path, None) if os.path.isdir(path) else (os.path.dirname(path), os.path.basename(path))
    if name not in (None, LAST, BEST):
        if last:
            raise ValueError(f"--last: {path} is not a run folder, nor its {LAST} or {BEST}")
        return path
    best, final = os.path.join(folder, BEST), os.path.join(folder, LAST)
    if last:
        return final
    if name == BEST or (os.path.isfile(best) and (name is None or os.path.isfile(final))):
        return best
    return final if name is None else path


def describe_checkpoint(path: str, ck: dict) -> str:
    """One line saying which state of the run ``path`` holds."""
    best = ck.get("best")
    if os.path.basename(path) == BEST and best:
        return f"{path}: the best validation score, {best['val']:.6g} at iteration {best['iteration']}"
    return f"{path}: iteration {ck['iteration']}"


def meta_train(algorithm, estimator, sample_tasks: Callable[[int, torch.Generator], Task], config: TrainConfig,
               out_dir: str | None = None, validate: Callable[[Params], float] | None = None, resume: bool = False,
               run: dict | None = None, progress: bool = True, higher_is_better: bool | None = None,
               loggers=None) -> TrainState:
    """Optimize φ of ``algorithm`` for ``config.iterations`` meta-batches.

    ``sample_tasks(n, generator)`` gives a batched Task. With ``out_dir``, metrics go to
    ``out_dir/metrics.jsonl`` and checkpoints to ``out_dir/checkpoint.pt``; ``resume`` continues
    from that checkpoint. A non-finite loss raises NonFiniteLoss after saving the last good state; a
    loss past the divergence bound for too long (:data:`DIVERGENCE`) raises Diverged.
    ``loggers`` (:class:`metaphi.loggers.Loggers`) get every row metrics.jsonl gets.
    ``validate(phi)`` scores φ every ``config.val_every`` iterations and at the last; with ``out_dir``
    each score better than all before it (higher when ``higher_is_better``, by default as the
    algorithm's problem says) writes ``out_dir/best.pt``, and ``state.best`` says which it was.
    """
    run = run or {}
    device = torch.device(config.device)
    phi = {k: v.detach().to(device).requires_grad_() for k, v in algorithm.init_meta_params().items()}
    optimizer = make_optimizer(config.optimizer, list(phi.values()), config.meta_lr)
    state = TrainState(phi, optimizer, torch.Generator().manual_seed(config.seed),
                       scheduler=make_scheduler(optimizer, config))
    if higher_is_better is None:
        higher_is_better = getattr(getattr(algorithm, "problem", None), "higher_is_better", True)
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    if world > 1 and config.meta_batch < world:
        raise ValueError(f"a meta-batch of {config.meta_batch} tasks cannot be split across {world} processes; "
                         f"use a meta-batch of at least {world}")
    if out_dir and main:
        os.makedirs(out_dir, exist_ok=True)
    ck_path = os.path.join(out_dir, LAST) if out_dir else None
    best_path = os.path.join(out_dir, BEST) if out_dir and validate else None
    log_path = os.path.join(out_dir, "metrics.jsonl") if out_dir and main else None
    if resume:
        if not ck_path or not os.path.exists(ck_path):
            raise ResumeError(f"--resume: no checkpoint at {ck_path}; leave out --resume to start a new run")
        ck = load_checkpoint(ck_path)
        if ck["algorithm"] != algorithm.spec():
            raise ResumeError(f"--resume: {ck_path} was written by a different configuration "
                              f"({ck['algorithm']['name']}); resume with the same settings or choose another --out")
        difference = resume_difference(ck, config, run)
        if difference:
            raise ResumeError(f"--resume: {ck_path} was written with {difference}; resume with the same settings or "
                              "choose another --out")
        for k, v in ck["phi"].items():
            state.phi[k].data.copy_(v)
        if state.optimizer:
            state.optimizer.load_state_dict(ck["optimizer"])
        if state.scheduler:
            state.scheduler.load_state_dict(ck["scheduler"])
        state.best = ck.get("best")
        state.generator.set_state(ck["generator"])
        state.iteration, state.train_seconds, state.history = ck["iteration"], ck["train_seconds"], ck["history"]
        if ck.get("estimator") is not None and hasattr(estimator, "load_state_dict"):
            estimator.load_state_dict(ck["estimator"])
    elif hasattr(estimator, "start"):  # estimators with randomness of their own draw it from the run's seed
        estimator.start(config.seed)
    if not resume and out_dir and main and os.path.exists(os.path.join(out_dir, BEST)):
        os.remove(os.path.join(out_dir, BEST))  # an earlier run's best: never to be taken for this run's
    distributed.broadcast_params(state.phi)  # every rank starts from rank 0's φ, whatever its own init drew
    if log_path:
        # the log holds exactly the iterations the checkpoint holds, so a resumed run's log is whole
        with open(log_path, "w") as f:
            for row in state.history:
                f.write(json.dumps(row) + "\n")
    loggers = loggers if main else None  # metaphi.loggers.Loggers: --log csv,tensorboard,wandb
    if loggers:
        loggers.start(state.history)

    saved = {"iteration": state.iteration if resume else None}  # of the state in checkpoint.pt

    def checkpoint() -> None:
        if ck_path and main:
            state.estimator = estimator.state_dict() if hasattr(estimator, "state_dict") else None
            save_checkpoint(ck_path, algorithm, state, config, run)
            saved["iteration"] = state.iteration

    def improves(score: float) -> bool:
        if not math.isfinite(score):
            return False
        if state.best is None:
            return True
        return score > state.best["val"] if higher_is_better else score < state.best["val"]

    bar = tqdm(total=config.iterations, initial=state.iteration, desc=f"meta-train {algorithm.name}",
               disable=not progress or not main, dynamic_ncols=True)
    last_val = None
    beyond = 0  # iterations in a row with the loss past the divergence bound

    def bound() -> float:
        first = state.history[0].get("loss") if state.history else None
        return DIVERGENCE["factor"] * max(abs(first), 1e-3) if first is not None else math.inf

    def diverging(loss: float) -> int:
        return beyond + 1 if abs(loss) > bound() else 0

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
                if not beyond:  # the state before this step is the last good one (unless already diverging)
                    checkpoint()
                raise NonFiniteLoss(
                    f"the meta-training loss became {metrics['loss']} at iteration {state.iteration + 1}; "
                    f"the last good state is kept in {ck_path or '(no --out)'}. Lower --meta-lr or --inner-lr.")
            beyond = diverging(metrics["loss"])
            state.optimizer.zero_grad(set_to_none=True)
            for k, p in state.phi.items():
                p.grad = grads[k]
            state.optimizer.step()
            scheduled = {}
            if state.scheduler:  # the log says the step size each step took
                scheduled["lr"] = state.optimizer.param_groups[0]["lr"]
                state.scheduler.step()
            state.iteration += 1
            state.train_seconds += time.perf_counter() - started
            row = {"iteration": state.iteration, **metrics, **scheduled, "seconds": round(state.train_seconds, 3)}
            if validate and main and (state.iteration % config.val_every == 0 or state.iteration == config.iterations):
                last_val = validate(state.phi)
                row["val"] = last_val
            state.history.append(row)
            if "val" in row and improves(float(last_val)):
                state.best = {"iteration": state.iteration, "val": float(last_val)}
                if best_path:
                    state.estimator = estimator.state_dict() if hasattr(estimator, "state_dict") else None
                    save_checkpoint(best_path, algorithm, state, config, run)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if loggers:
                loggers.log(row)
            if beyond >= DIVERGENCE["patience"]:
                kept = ("nothing was saved before it left that bound" if not ck_path or saved["iteration"] is None
                        else f"{ck_path} keeps iteration {saved['iteration']}, saved before it left that bound")
                raise Diverged(
                    f"the meta-training loss has stayed above {bound():.4g} ({DIVERGENCE['factor']:g} x its first "
                    f"iteration's) for {beyond} iterations, up to iteration {state.iteration} (last: "
                    f"{metrics['loss']:.4g}); {kept}. Lower --meta-lr or --inner-lr.")
            if state.iteration % config.checkpoint_every == 0 and state.iteration < config.iterations and not beyond:
                checkpoint()
            shown = {k: f"{v:.4g}" for k, v in metrics.items()}
            if last_val is not None:
                shown["val"] = f"{last_val:.4g}"
            bar.set_postfix(shown)
            bar.update(1)
    finally:
        bar.close()
        if loggers:
            loggers.close()
    checkpoint()
    return state
