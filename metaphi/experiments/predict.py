"""``metaphi predict``: adapt a meta-trained model to your own few examples and label new images.

The support folder has one subfolder per class with one or more images; the query folder holds the
images to label (or is one image file). Images of any size and mode are converted to what the
checkpoint was trained on. Rows ``file,prediction,confidence`` go to stdout and, with ``--out``, to
a CSV file; which checkpoint labelled them goes to stderr. A run folder (or its checkpoint.pt) means
the run's best.pt, the state with the best validation score, where it kept one; ``--last`` takes
checkpoint.pt. For models with task batch normalization the query images are scored as one batch, as
they were at test time.
"""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass

import torch

from metaphi.config import UsageError, option


@dataclass
class PredictConfig:
    """``metaphi predict``: adapt ``checkpoint`` to the labelled images in ``support``, label ``query``."""

    checkpoint: str | None = option(None, "a run's folder, or its checkpoint.pt or best.pt (required): a folder, "
                                          "or a checkpoint.pt beside a best.pt, means best.pt (the best validation "
                                          "score) unless --last")
    last: bool = option(False, "take the run's checkpoint.pt (its last iteration) instead of its best.pt")
    support: str | None = option(None, "folder with one subfolder of images per class (required)")
    query: str | None = option(None, "folder of images to label, or one image file (required)")
    inner_steps: int | None = option(None, "adaptation steps (none: the checkpoint's)", check="nonneg")
    out: str | None = option(None, "also write the CSV to this file")
    device: str = option("cpu", "torch device")


def load_for_prediction(path: str):
    """``(checkpoint, algorithm, input spec)`` of the checkpoint file at ``path``."""
    from metaphi.algorithms import build_algorithm
    from metaphi.train import load_checkpoint

    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        ck = load_checkpoint(path)
    except Exception as e:
        raise UsageError(f"{path} is not a readable metaphi checkpoint ({e})")
    spec = ck["run"].get("input", {})
    if spec.get("kind") != "image":
        raise UsageError(f"{path} was trained on {ck['run']['benchmark']}, not on images; predict labels images")
    return ck, build_algorithm(ck["algorithm"]), spec


def predict(ck, algorithm, spec: dict, support_dir: str, query: str, steps: int | None = None,
            device: str = "cpu") -> list[tuple[str, str, float]]:
    """(file, predicted class, confidence) for each query image."""
    from metaphi.tasks.folder import load_folder, load_query_images

    c, h, w, invert = spec["channels"], spec["height"], spec["width"], spec.get("invert", False)
    support = load_folder(support_dir, channels=c, image_size=(h, w), invert=invert, cache_dir=False)
    names, query_images = load_query_images(query, c, h, w, invert=invert)
    n = support.num_classes
    trained_ways = (ck["algorithm"].get("model") or {}).get("out_features")
    if getattr(algorithm, "fixed_ways", True) and ck["algorithm"].get("class") == "maml" and trained_ways < n:
        raise UsageError(f"{support_dir} has {n} classes but this checkpoint was meta-trained for {trained_ways}-way "
                         f"tasks; give at most {trained_ways} class folders")
    xs = support.images.float().div(255).to(device)
    ys = support.targets.to(device)
    xq = query_images.float().div(255).to(device)
    phi = {k: v.to(device) for k, v in ck["phi"].items()}
    try:
        logits = algorithm.predict(phi, (xs, ys), xq, steps)
    except NotImplementedError:
        raise UsageError(f"algorithm {algorithm.name} cannot adapt to new classes (no predict)")
    probs = torch.softmax(logits[:, :n].double(), dim=-1)
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
        path = choose_checkpoint(config.checkpoint, config.last)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ck, algorithm, spec = load_for_prediction(path)
    rows = predict(ck, algorithm, spec, config.support, config.query, config.inner_steps, config.device)
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
    print(f"metaphi predict: labelled with {describe_checkpoint(path, ck)}", file=sys.stderr)
    return 0
