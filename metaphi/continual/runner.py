"""Run one continual method on one stream: learn each experience, test on all, checkpoint, resume.

After experience i the learner is tested on the test set of every experience j (also the ones not
met yet, for forward transfer), giving row i of R. Before the first experience it is tested once
more (``initial``, the untrained learner's accuracies b_j). A checkpoint after every experience
holds the method's state, the generator's state and the rows so far, plain data written atomically
and read back without running code (:mod:`metaphi.checkpoint`); a killed run started again with the
same settings continues after the last finished experience and ends with the same R as an
uninterrupted run.
"""
from __future__ import annotations

import os
import time

import torch

from metaphi import checkpoint
from metaphi.continual import metrics
from metaphi.functional import params_of
from metaphi.continual.net import accuracy
from metaphi.models import PlainConvNet as ConvNet

CHECKPOINT_FORMAT = 1


class SettingsMismatch(ValueError):
    """A checkpoint written by another configuration."""


def build_net(stream, hidden: int = 32, blocks: int = 4) -> ConvNet:
    c, h, w = stream.image_shape
    if h != w:
        raise ValueError(f"the network takes square images, the stream's are {h}x{w}")
    return ConvNet(c, stream.num_classes, hidden=hidden, blocks=blocks, image_size=h)


def test_row(net, weights, stream) -> list[float]:
    return [accuracy(net, weights, e.test_x, e.test_y) for e in stream.experiences]


def run_stream(method, stream, seed: int, folder: str | None = None, hidden: int = 32, blocks: int = 4,
               workdir: str | None = None, progress: bool = False, stop_after: int | None = None,
               init=None) -> dict:
    """Run ``method`` over ``stream`` with ``seed`` (initial weights and the method's randomness).

    ``init``: None to start from random weights (drawn with the seed), or a
    :class:`metaphi.continual.oml.Pretrain` whose supervised pre-trained body (on the stream's
    meta-training classes, same seed) the network starts from, so that methods that learn the whole
    network start where ``pretrain`` and ``oml`` start: from a body that has seen the same data.

    ``folder``: where ``checkpoint.pt`` and ``result.json`` go (a finished result with the same
    settings is returned as it is). ``workdir``: where meta-training runs are kept and shared.
    ``stop_after``: stop after this many experiences (to test resuming).
    """
    from tqdm.auto import tqdm

    from metaphi.experiments.report import write_json

    net = build_net(stream, hidden, blocks)
    if init is not None and method.name in ("oml", "pretrain"):
        raise ValueError(f"{method.name} makes its own body; init applies to the methods that train the whole network")
    settings = {"method": method.spec(), "stream": stream.describe(), "seed": seed, "net": net.spec,
                "init": "scratch" if init is None else {"pretrain": init.meta_spec()}}
    ck_path = os.path.join(folder, "checkpoint.pt") if folder else None
    done_path = os.path.join(folder, "result.json") if folder else None
    if done_path and os.path.exists(done_path):
        import json
        with open(done_path) as f:
            previous = json.load(f)
        if previous.get("settings") == settings:
            return {**previous, "reused": True}
    if ck_path and os.path.exists(ck_path):
        ck = checkpoint.load(ck_path)
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("settings") != settings:
            raise SettingsMismatch(f"{folder} holds a run with other settings; use another --out or --fresh")
        state, rows, initial, seconds = ck["state"], ck["rows"], ck["initial"], ck["seconds"]
        start_seconds = ck["start_seconds"]
        generator = torch.Generator()
        generator.set_state(ck["generator"])
    else:
        with torch.random.fork_rng():  # the initial weights come from the seed alone
            torch.manual_seed(seed)
            params = params_of(build_net(stream, hidden, blocks), requires_grad=False)
        if init is not None:
            if stream.meta_train is None:
                raise ValueError(f"stream {stream.name} has no meta-training classes to pre-train a body on; "
                                 "start from scratch")
            params.update(init.meta_train_body(net, stream.meta_train, seed, workdir, progress))
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        state = method.start(net, params, stream, generator, seed=seed, workdir=workdir, progress=progress)
        start_seconds, seconds = time.perf_counter() - started, 0.0
        initial = test_row(net, method.weights(state), stream)
        rows = []
    bar = tqdm(total=len(stream), initial=len(rows), desc=f"{method.name} {stream.name} seed {seed}",
               disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for i in range(len(rows), len(stream)):
            if stop_after is not None and i >= stop_after:
                break
            started = time.perf_counter()
            state = method.learn(net, state, stream.experiences[i], generator)
            seconds += time.perf_counter() - started
            rows.append(test_row(net, method.weights(state), stream))
            if ck_path:
                checkpoint.save({"format": CHECKPOINT_FORMAT, "settings": settings, "state": state,
                             "generator": generator.get_state(), "rows": rows, "initial": initial,
                             "seconds": seconds, "start_seconds": start_seconds}, ck_path)
            seen = sum(rows[-1][: i + 1]) / (i + 1)
            bar.set_postfix({"seen": f"{100 * seen:.1f}%"})
            bar.update(1)
    finally:
        bar.close()
    result = {"settings": settings, "method": method.name, "stream": stream.name, "seed": seed,
              "finished": len(rows) == len(stream), "experiences_done": len(rows), "R": rows, "initial": initial,
              "train_seconds": seconds, "start_seconds": start_seconds}
    if result["finished"]:
        result.update(metrics.summary(rows, initial))
        if done_path:
            write_json(result, done_path)
    return result
