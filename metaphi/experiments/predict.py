"""``metaphi predict``: adapt a meta-trained model to your own few examples and label new images.

The support folder has one subfolder per class with one or more images; the query folder holds the
images to label (or is one image file). Images of any size and mode are converted to what the
checkpoint was trained on. Rows ``file,prediction,confidence`` go to stdout and, with ``--out``, to
a CSV file. For models with task batch normalization the query images are scored as one batch, as
they were at test time.
"""
from __future__ import annotations

import csv
import io
import os
import sys

import torch


def register(sub) -> None:
    p = sub.add_parser("predict", help="adapt a checkpoint to your labelled examples and label new images")
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by metaphi run")
    p.add_argument("--support", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--query", required=True, help="folder of images to label, or one image file")
    p.add_argument("--inner-steps", type=int, default=None, help="adaptation steps (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="also write the CSV here")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)


def load_for_prediction(path: str):
    from metaphi.algorithms import build_algorithm
    from metaphi.config import UsageError
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
    from metaphi.config import UsageError
    from metaphi.tasks.folder import load_folder, load_query_images

    c, h, w, invert = spec["channels"], spec["height"], spec["width"], spec.get("invert", False)
    support = load_folder(support_dir, channels=c, image_size=(h, w), invert=invert, cache_dir=False)
    names, query_images = load_query_images(query, c, h, w, invert=invert)
    n = support.num_classes
    trained_ways = ck["algorithm"].get("model", {}).get("out_features")
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


def cmd_predict(args) -> int:
    from metaphi.config import UsageError, positive as _positive

    _positive("inner-steps", args.inner_steps, allow_zero=True)
    ck, algorithm, spec = load_for_prediction(args.checkpoint)
    rows = predict(ck, algorithm, spec, args.support, args.query, args.inner_steps, args.device)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "prediction", "confidence"])
    for f, label, p in rows:
        writer.writerow([f, label, f"{p:.4f}"])
    text = buffer.getvalue()
    sys.stdout.write(text)
    if args.out:
        try:
            with open(args.out, "w", newline="") as f:
                f.write(text)
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write ({e.strerror})")
    return 0
