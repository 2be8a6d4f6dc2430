"""``metaphi predict``: adapt a meta-trained model to your own few examples and label new images.

The support folder has one subfolder per class with one or more images; the query folder holds the
images to label (or is one image file). Images of any size and mode are converted to what the
checkpoint was trained on. Rows ``file,prediction,confidence`` go to stdout and, with ``--out``, to
a CSV file; which checkpoint labelled them goes to stderr. A run folder (or its checkpoint.pt) means
the run's best.pt, the state with the best validation score, where it kept one; ``--last`` takes
checkpoint.pt. For models with task batch normalization the query images are scored as one batch, as
they were at test time.

Several checkpoints, comma-separated (``--checkpoint runs/a,runs/b,runs/c``: runs of one recipe with
other ``--seed``), label as an ensemble: each query image's class log-probabilities are averaged over
the members (their probabilities' normalized geometric mean; for ProtoNet without ``--tta``, the
softmax of the members' mean negative squared distances to the prototypes). Every member must read
images as the first does (channels, size, ink polarity).

Two switchable additions, both off by default (their defaults are to be chosen on validation classes):

- ``--tta N``, test-time augmentation: each query image's class probabilities are the mean over the
  image itself and N-1 copies moved by random affine maps (:class:`metaphi.tasks.transforms.RandomAffine`,
  the ranges of ``run --augment``), drawn from a generator seeded by ``--seed``.
- ``--finetune-steps S`` (ProtoNet): the embedding fine-tuned on the support set, with the prototypes
  as the initial linear classifier (Chen et al. 2019, "A closer look at few-shot classification"; Tian
  et al. 2020, "Rethinking few-shot image classification"). The squared-euclidean ProtoNet classifier
  −‖f(x) − c_k‖² = 2 c_k·f(x) − ‖c_k‖² − ‖f(x)‖² is, up to the per-image constant ‖f(x)‖², the linear
  layer W = 2C, b = −‖c_k‖²: it starts there and S Adam steps (step size ``--finetune-lr``) on the
  support cross-entropy move body and head together, on a copy of φ. Support and query are embedded
  as one batch, as ProtoNet does (task batch norm), the loss on the support part only. MAML-family
  checkpoints already adapt by gradient steps on the support set: ``--inner-steps`` sets those.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metaphi.config import UsageError, option


@dataclass
class PredictConfig:
    """``metaphi predict``: adapt ``checkpoint`` to the labelled images in ``support``, label ``query``."""

    checkpoint: list[str] | None = option(None, "a run's folder, or its checkpoint.pt or best.pt (required): a "
                                                "folder, or a checkpoint.pt beside a best.pt, means best.pt (the best "
                                                "validation score) unless --last; several, comma-separated, label as "
                                                "an ensemble (their class log-probabilities averaged)",
                                          metavar="PATH[,PATH...]")
    last: bool = option(False, "take the run's checkpoint.pt (its last iteration) instead of its best.pt")
    support: str | None = option(None, "folder with one subfolder of images per class (required)")
    query: str | None = option(None, "folder of images to label, or one image file (required)")
    inner_steps: int | None = option(None, "adaptation steps (none: the checkpoint's)", check="nonneg")
    tta: int = option(0, "test-time augmentation: average each query image's class probabilities over the image "
                         "and N-1 randomly moved copies (shift, zoom, rotation, shear as run --augment; 0: off)",
                      check="nonneg", metavar="N")
    finetune_steps: int = option(0, "ProtoNet: fine-tune the embedding on the support set this many Adam steps, with "
                                    "the prototypes as the initial linear classifier (0: off; MAML-family models "
                                    "adapt with --inner-steps)", check="nonneg")
    finetune_lr: float = option(1e-3, "--finetune-steps only: the Adam step size", check="positive")
    seed: int = option(0, "seed of --tta's random copies")
    model_factory: str | None = option(None, "rebuild a model of your own from the checkpoint by this importable "
                                             "callable, the one the checkpoint names (built by metaphi.models."
                                             "from_factory); a checkpoint's callable is never imported unless "
                                             "named here", metavar="MODULE:CALLABLE")
    out: str | None = option(None, "also write the CSV to this file", check="output_file")
    device: str = option("cpu", "torch device", check="device")


def load_for_prediction(path: str, model_factory: str | None = None):
    """``(checkpoint, algorithm, input spec)`` of the checkpoint file at ``path`` (a model of the user's
    own rebuilt by ``model_factory``, where given: see metaphi.models.factory)."""
    from metaphi.checkpoint import CheckpointError
    from metaphi.models import factory
    from metaphi.train import load_model

    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        with factory.allowed(model_factory):
            ck, algorithm = load_model(path)
    except CheckpointError as e:  # says what the file is
        raise UsageError(str(e)) from None
    spec = ck["run"].get("input", {})
    if spec.get("kind") != "image":
        raise UsageError(f"{path} was trained on {ck['run']['benchmark']}, not on images; predict labels images")
    return ck, algorithm, spec


def check_finetune(algorithm, steps: int) -> None:
    """A UsageError when ``steps`` fine-tuning steps are asked of an algorithm they do not apply to."""
    if not steps:
        return
    from metaphi.algorithms.protonet import ProtoNet

    if isinstance(algorithm, ProtoNet) and algorithm.distance == "euclidean":
        return
    if hasattr(algorithm, "eval_steps"):
        raise UsageError(f"--finetune-steps: {algorithm.name} already adapts to the support set by gradient steps; "
                         "set how many with --inner-steps")
    raise UsageError(f"--finetune-steps applies to protonet (its prototypes start the classifier), not "
                     f"{algorithm.name}")


def prototype_head(protos: torch.Tensor) -> dict[str, torch.Tensor]:
    """The squared-euclidean prototype classifier as a linear layer: ``{"weight": 2C, "bias": −‖c_k‖²}``;
    its logits are ProtoNet's plus ‖f(x)‖², the same for every class of a query."""
    return {"weight": 2 * protos, "bias": -protos.pow(2).sum(-1)}


def finetuned_scorer(algorithm, phi: dict, support, xq: torch.Tensor, steps: int, lr: float):
    """``score(x) -> logits [len(x), ways]`` of ProtoNet's embedding fine-tuned on ``support`` for
    ``steps`` Adam steps (step size ``lr``) on the support cross-entropy, body and prototype-initialised
    head together; support and the query images ``xq`` are embedded as one batch (task batch norm), the
    loss on the support part. Works on a copy of ``phi``; with ``steps`` 0 it is the prototype head."""
    import torch.nn.functional as F
    from torch.func import grad

    from metaphi.algorithms.protonet import prototypes
    from metaphi.functional import prefixed, with_prefix
    from metaphi.inner.rules import Adam

    xs, ys = support
    ways = int(ys.max()) + 1
    body = {k: v.detach().clone() for k, v in phi.items()}
    with torch.no_grad():
        zs, _ = algorithm.embed_episode(body, xs, xq)
        protos, _ = prototypes(zs, ys)
    # body and head as one flat tree ("body.*", "head.*"), as φ keeps its parts
    params = {**with_prefix(body, "body"), **with_prefix(prototype_head(protos[:ways]), "head")}

    def logits(p: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zs, zx = algorithm.embed_episode(prefixed(p, "body"), xs, x)
        head = prefixed(p, "head")
        return zs @ head["weight"].T + head["bias"], zx @ head["weight"].T + head["bias"]

    support_loss = lambda p: F.cross_entropy(logits(p, xq)[0], ys)
    rule = Adam(lr)  # a pure rule: state in, state out, nothing mutated
    state = rule.init(params)
    for _ in range(steps):
        params, state = rule.update(params, grad(support_loss)(params), state, {})
        params = {k: v.detach() for k, v in params.items()}

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits(params, x)[1]

    return score


def class_probabilities(algorithm, phi: dict, support, xq: torch.Tensor, ways: int, steps: int | None = None,
                        tta: int = 0, seed: int = 0, invert: bool = False, finetune_steps: int = 0,
                        finetune_lr: float = 1e-3, log: bool = False) -> torch.Tensor:
    """Class probabilities [len(xq), ways] (float64) of the query images after learning ``support``:
    the algorithm's own prediction, or ProtoNet fine-tuned for ``finetune_steps``; with ``tta`` N > 1,
    the mean over the images and N-1 random affine copies drawn from ``seed``. ``log``: their
    logarithms, computed from the logits (finite where the probability underflows to 0)."""
    check_finetune(algorithm, finetune_steps)
    if finetune_steps:
        score = finetuned_scorer(algorithm, phi, support, xq, finetune_steps, finetune_lr)
    else:
        def score(x: torch.Tensor) -> torch.Tensor:
            try:
                return algorithm.predict(phi, support, x, steps)
            except NotImplementedError:
                raise UsageError(f"algorithm {algorithm.name} cannot adapt to new classes (no predict)")
    logits = score(xq)[:, :ways].double()
    if tta <= 1:
        return torch.log_softmax(logits, dim=-1) if log else torch.softmax(logits, dim=-1)
    from metaphi.tasks.transforms import RandomAffine

    move = RandomAffine(padding="zeros" if invert else "border")
    generator = torch.Generator().manual_seed(seed)
    copies = [logits] + [score(move(xq, generator))[:, :ways].double() for _ in range(tta - 1)]
    # the mean of the copies' probabilities, in log space
    mean = torch.logsumexp(torch.stack([torch.log_softmax(c, dim=-1) for c in copies]), dim=0) - math.log(tta)
    return mean if log else mean.exp()


def ensemble(log_probabilities: list[torch.Tensor]) -> torch.Tensor:
    """Class probabilities [n, ways] of an ensemble from its members' log-probabilities: their mean,
    normalized (the members' probabilities' normalized geometric mean)."""
    return torch.softmax(torch.stack(log_probabilities).mean(0), dim=-1)


#: what a checkpoint's input spec must share with the ensemble's first member's
SAME_INPUT = ("channels", "height", "width", "invert")


def check_ensemble(paths: list[str], specs: list[dict]) -> None:
    """A UsageError naming the first member that reads images otherwise than the first one does."""
    for path, spec in zip(paths[1:], specs[1:]):
        differ = [k for k in SAME_INPUT if spec.get(k, False) != specs[0].get(k, False)]
        if differ:
            show = lambda s: ", ".join(f"{k} {s.get(k, False)}" for k in differ)
            raise UsageError(f"--checkpoint: the members of an ensemble must read images alike; {path} has "
                             f"{show(spec)}, {paths[0]} has {show(specs[0])}")


def predict(ck, algorithm, spec: dict, support_dir: str, query: str, steps: int | None = None,
            device: str = "cpu", tta: int = 0, seed: int = 0, finetune_steps: int = 0,
            finetune_lr: float = 1e-3, members: Sequence[tuple[dict, Any]] = ()) -> list[tuple[str, str, float]]:
    """(file, predicted class, confidence) for each query image; with ``members`` (more
    ``(checkpoint, algorithm)`` pairs reading images as ``spec`` says) by the ensemble of all."""
    from metaphi.tasks.folder import load_folder, load_query_images

    c, h, w, invert = spec["channels"], spec["height"], spec["width"], spec.get("invert", False)
    support = load_folder(support_dir, channels=c, image_size=(h, w), invert=invert, cache_dir=False)
    names, query_images = load_query_images(query, c, h, w, invert=invert)
    n = support.num_classes
    models = [(ck, algorithm), *members]
    for member, member_algorithm in models:
        trained_ways = (member["algorithm"].get("model") or {}).get("out_features")
        if (getattr(member_algorithm, "fixed_ways", True) and member["algorithm"].get("class") == "maml"
                and trained_ways < n):
            raise UsageError(f"{support_dir} has {n} classes but this checkpoint was meta-trained for "
                             f"{trained_ways}-way tasks; give at most {trained_ways} class folders")
    xs = support.images.float().div(255).to(device)
    ys = support.targets.to(device)
    xq = query_images.float().div(255).to(device)
    each = []
    for member, member_algorithm in models:
        phi = {k: v.to(device) for k, v in member["phi"].items()}
        each.append(class_probabilities(member_algorithm, phi, (xs, ys), xq, n, steps, tta=tta, seed=seed,
                                        invert=invert, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                                        log=bool(members)))
    probs = ensemble(each) if members else each[0]
    confidence, label = probs.max(dim=-1)
    return [(f, support.classes[int(i)], float(p)) for f, i, p in zip(names, label, confidence)]


def run(config: PredictConfig) -> int:
    """``metaphi predict``: the CSV ``file,prediction,confidence`` to stdout and to ``config.out``."""
    missing = [name for name in ("checkpoint", "support", "query") if getattr(config, name) is None]
    if missing:
        raise UsageError(f"give {', '.join('--' + m for m in missing)} (or a --config file that sets "
                         f"{'them' if len(missing) > 1 else 'it'})")
    from metaphi.train import choose_checkpoint, describe_checkpoint

    try:
        paths = [choose_checkpoint(p, config.last) for p in config.checkpoint]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not paths:
        raise UsageError("give --checkpoint")
    loaded = [load_for_prediction(path, config.model_factory) for path in paths]
    check_ensemble(paths, [spec for _, _, spec in loaded])
    for _, algorithm, _ in loaded:
        check_finetune(algorithm, config.finetune_steps)  # before any image is read
    (ck, algorithm, spec), members = loaded[0], [(c, a) for c, a, _ in loaded[1:]]
    rows = predict(ck, algorithm, spec, config.support, config.query, config.inner_steps, config.device,
                   tta=config.tta, seed=config.seed, finetune_steps=config.finetune_steps,
                   finetune_lr=config.finetune_lr, members=members)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "prediction", "confidence"])
    for f, label, p in rows:
        writer.writerow([f, label, f"{p:.4f}"])
    text = buffer.getvalue()
    sys.stdout.write(text)
    if config.out:
        try:
            with open(config.out, "w", newline="") as f:
                f.write(text)
        except OSError as e:
            raise UsageError(f"--out {config.out}: cannot write ({e.strerror})")
    if len(paths) == 1:
        print(f"metaphi predict: labelled with {describe_checkpoint(paths[0], ck)}", file=sys.stderr)
    else:
        print(f"metaphi predict: labelled with an ensemble of {len(paths)}:", file=sys.stderr)
        for path, (member, _, _) in zip(paths, loaded):
            print(f"  {describe_checkpoint(path, member)}", file=sys.stderr)
    return 0
