"""One loop for online bilevel problems: θ keeps training while φ steps on a lookahead of θ.

DARTS (α: the architecture), augmentation search (the policy), sample reweighting (the example
weights), meta distillation (the teacher) and learned-optimizer truncation (the rule) all alternate

    φ ← φ − η_φ ∇_φ L_outer(θ'(φ), φ),     θ'(φ) = a lookahead of θ (one or a few steps)
    θ ← the real training step of θ, with the new φ

without ever restarting θ, unlike episodic meta-learning (``metaphi.train``), where each task starts
from φ. What differs between them is one step; what is the same is the loop around it, which is this
module:

    state, metrics = step(state, t, generator)       # pure: state in, state out

``run(step, state, steps, ...)`` owns what every such loop needs: the step counter, the random
stream of the batches, the history of metrics, checking that they are finite, a progress bar, an
optional metrics file, and the checkpoint: written every ``every`` steps through
:mod:`metaphi.checkpoint` (plain data: tensors, numbers, strings, lists, dicts; read back with
``weights_only`` loading) and resumed from when it exists, to the same numbers bit for bit as a run
that was never stopped.

The step must not change the state it is given (it returns a new one): a run stopped mid-step, or by
a non-finite metric, keeps the last checkpoint, and the state in memory stays the last good one.
Randomness is explicit (the equinox habit): the step draws only from the ``generator`` it is handed,
which is either fresh for each step (``seed=``: ``derived_seed(seed, t)``, so any step can be
replayed alone) or one stream (``generator=``), whose state the checkpoint carries.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import torch
from torch import Tensor

FORMAT = "metaphi-online-1"

State = Any  # a pytree of plain data: dicts, lists, tensors, numbers, strings, None
Step = Callable[[State, int, torch.Generator], "tuple[State, dict[str, Any]]"]


def run(step: Step, state: State, steps: int, *, seed: int | None = None, generator: torch.Generator | None = None,
        checkpoint: str | None = None, every: int = 50, identity: dict | None = None, resume: bool = True,
        on_step: Callable[[int, dict], None] | None = None, progress: str | None = None,
        metrics_file: str | None = None, max_seconds: float | None = None, hint: str = "",
        stop: Callable[[State], bool] | None = None, finite: tuple[str, ...] | None = None) -> dict:
    """Run ``step`` until ``steps`` steps are done; returns the run's record

        {"state": the final state, "step": steps done, "seconds": time in ``step``,
         "history": [metrics of each step], "stopped": True when ``max_seconds`` ended it early}

    ``step(state, t, generator) -> (state, metrics)``: t counts from 0; metrics is a flat dict of
    numbers (or None) that goes into the history as it is, and each number must be finite: otherwise
    ``NonFiniteLoss`` names it (with ``hint``, what to lower) and the last checkpoint is kept.
    Exactly one of ``seed`` (a fresh generator per step, ``derived_seed(seed, t)``) and ``generator``
    (one stream for the run, saved in the checkpoint) gives the step its randomness.

    ``checkpoint``: a file written every ``every`` steps and after the last; when it exists (and
    ``resume``) the run continues from it. ``identity``: plain data naming the run (its config);
    a checkpoint of another run is refused. ``on_step(done, metrics)`` after each step (before its
    checkpoint); ``progress``: the label of a progress bar (None: no bar); ``metrics_file``: one JSON
    line per step (rewritten from the history on resume); ``max_seconds``: stop after the step in
    which the time spent in ``step`` passes it; ``stop(state)``: stop after the step whose new state
    it holds true for (a budget or early-stopping rule the step itself keeps). ``finite``: the names
    of the metrics that must be finite (None: every number; a score that may legitimately be
    infinite, such as the loss of a diverged validation run, is left out).
    """
    from metaphi import checkpoint as ck

    if (seed is None) == (generator is None):
        raise ValueError("give the loop exactly one of seed (a generator per step) or generator (one stream)")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    identity = {} if identity is None else identity
    record = {"state": state, "step": 0, "seconds": 0.0, "history": [], "stopped": False}
    if checkpoint and resume and os.path.exists(checkpoint):
        saved = ck.load(checkpoint)
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{checkpoint} was not written by metaphi.train_online; use another --out or delete it")
        if saved["identity"] != identity:
            differ = sorted(k for k in set(saved["identity"]) | set(identity)
                            if saved["identity"].get(k) != identity.get(k))
            raise ValueError(f"{checkpoint} holds a run with other settings ({', '.join(map(str, differ))}); use "
                             "another --out or delete it")
        record = {k: saved[k] for k in record}
        if generator is not None:
            generator.set_state(saved["generator"])

    def save() -> None:
        if checkpoint:
            data = {"format": FORMAT, "identity": identity, **record,
                    "generator": None if generator is None else generator.get_state()}
            require_plain(data)
            ck.save(data, checkpoint)

    if metrics_file:
        with open(metrics_file, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in record["history"])
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=record["step"], desc=progress, dynamic_ncols=True)
    try:
        while record["step"] < steps and not record["stopped"]:
            t = record["step"]
            g = generator if generator is not None else step_generator(seed, t)
            started = time.perf_counter()
            state, metrics = step(record["state"], t, g)
            seconds = record["seconds"] + time.perf_counter() - started
            for name, value in metrics.items():
                if finite is not None and name not in finite:
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
                    from metaphi.train import NonFiniteLoss
                    kept = f"; the last checkpoint is kept in {checkpoint}" if checkpoint else ""
                    raise NonFiniteLoss(f"{name} became {value} at step {t + 1}" + (f"; {hint}" if hint else "")
                                        + kept)
            record["history"].append(metrics)
            record = {"state": state, "step": t + 1, "seconds": seconds, "history": record["history"],
                      "stopped": t + 1 < steps and ((max_seconds is not None and seconds >= max_seconds)
                                                    or (stop is not None and bool(stop(state))))}
            if metrics_file:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}, refresh=False)
            if on_step is not None:
                on_step(t + 1, metrics)
            if (t + 1) % every == 0 or t + 1 == steps or record["stopped"]:
                save()
    finally:
        if bar is not None:
            bar.close()
    return record


def step_generator(seed: int, t: int) -> torch.Generator:
    """The generator of step ``t`` of a run seeded ``seed``: the same for the same (seed, t), whatever ran before."""
    from metaphi.outer.es import derived_seed
    return torch.Generator().manual_seed(derived_seed(seed, t))


def require_plain(obj: Any, where: str = "checkpoint") -> None:
    """A TypeError naming the first value of ``obj`` that a ``weights_only`` reader could not rebuild
    (a module, an optimizer, a generator, a dataclass...): store its state instead."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor, torch.dtype, torch.Size)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a string or an integer")
            require_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            require_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}, which a checkpoint does not hold: store plain data "
                    "(tensors, numbers, strings, lists, dicts), e.g. its state_dict() or get_state()")
