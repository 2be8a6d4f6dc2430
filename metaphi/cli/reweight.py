"""metaphi reweight: plain training, Learning to Reweight Examples and Meta-Weight-Net, over seeds.

One data set is split per class into clean test images, a few clean meta images and training images;
the training images get seeded label noise and/or a long-tailed class profile
(metaphi/tasks/corrupt.py). Each seed trains the same initial network on them with every method;
the reweighting methods learn example weights from the clean meta images (metaphi/reweight.py), and
"plain-meta" adds the meta images to the training data instead, the fair use of the same labels.
"""
from __future__ import annotations

import argparse
import os
import time

from metaphi.config import int_list as _ints
from metaphi.experiments.reweight import MWNET_ESTIMATORS, METHODS, L2RW_MODES


def cmd_reweight(args) -> int:
    import torch

    from metaphi.config import UsageError, writable_dir as _writable_dir, name_list

    from metaphi.experiments.report import write_result
    from metaphi.experiments.reweight import Corruption, ReweightConfig, markdown, run_experiment
    from metaphi.tasks import DataError

    methods = name_list(args.methods, METHODS)
    if not 0 <= args.noise_rate <= 1:
        raise UsageError(f"--noise-rate must be in [0, 1], got {args.noise_rate}")
    if args.noise != "none" and args.noise_rate == 0:
        raise UsageError(f"--noise {args.noise} needs a --noise-rate above 0 (e.g. 0.4)")
    if args.imbalance < 1:
        raise UsageError(f"--imbalance is largest/smallest class size and must be >= 1, got {args.imbalance}")
    for name in ("epochs", "batch", "meta_per_class", "test_per_class", "mwnet_hidden"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("lr", "mwnet_lr"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    hidden = _ints(args.hidden, "hidden")
    if args.model == "conv4" and len(hidden) != 1:
        raise UsageError("--hidden for conv4 is one number: the channels of every layer")
    out = _writable_dir(args.out)
    cfg = ReweightConfig(epochs=args.epochs, batch=args.batch, lr=args.lr, momentum=args.momentum,
                         weight_decay=args.weight_decay, lookahead_lr=args.lookahead_lr, meta_batch=args.meta_batch,
                         l2rw_mode=args.l2rw_mode, mwnet_hidden=args.mwnet_hidden, mwnet_lr=args.mwnet_lr,
                         mwnet_estimator=args.mwnet_estimator)
    model = {"name": args.model, "hidden": hidden if args.model == "mlp" else hidden[0]}
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        result = run_experiment(args.data, methods, _ints(args.seeds, "seeds"),
                                Corruption(args.noise, args.noise_rate if args.noise != "none" else 0.0,
                                           args.imbalance),
                                model, cfg, args.meta_per_class, args.test_per_class, args.classes, args.data_root,
                                os.path.join(out, "checkpoint.pt"), not args.quiet,
                                (lambda *a: None) if args.quiet else print)
    except (ValueError, FileNotFoundError, DataError) as e:
        raise UsageError(str(e)) from e
    except FloatingPointError as e:
        raise UsageError(f"{e} (the finished runs are kept in {os.path.join(out, 'checkpoint.pt')})") from e
    result["wall_s"] = time.perf_counter() - t0
    write_result(result, out, markdown(result), args.quiet, also=" and checkpoint.pt")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("reweight", help="sample reweighting under label noise or class imbalance: "
                              "plain, L2RW, Meta-Weight-Net", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="digits", choices=["digits", "glyphs", "omniglot"],
                   help="digits (built in, default), glyphs (built in) or omniglot (the small1 minimal split "
                        "under --data-root)")
    p.add_argument("--methods", default="plain,l2rw,mwnet", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--noise", default="uniform", choices=["none", "uniform", "flip"],
                   help="label noise on the training split (default uniform)")
    p.add_argument("--noise-rate", type=float, default=0.4, help="probability a label is redrawn/flipped (default 0.4)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="long-tailed training split: largest/smallest class size (default 1, balanced)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="split, corruption and initialization seeds")
    p.add_argument("--meta-per-class", type=int, default=10, help="clean meta images per class (default 10)")
    p.add_argument("--test-per-class", type=int, default=50, help="clean test images per class (default 50)")
    p.add_argument("--classes", type=int, help="use this many classes, drawn by a fixed seed (default all)")
    p.add_argument("--model", default="mlp", choices=["mlp", "conv4"])
    p.add_argument("--hidden", default="100", help="mlp: comma list of widths; conv4: channels (default 100)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.03, help="SGD step size, ×0.1 at 60%% and 80%% of training")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lookahead-lr", type=float, help="step size α of the virtual step (default: the current lr)")
    p.add_argument("--meta-batch", type=int, help="clean images per meta step (default: all of them)")
    p.add_argument("--l2rw-mode", default="jvp", choices=list(L2RW_MODES),
                   help="how L2RW's scores are computed: one forward-mode product (jvp) or through the lookahead")
    p.add_argument("--mwnet-hidden", type=int, default=100)
    p.add_argument("--mwnet-lr", type=float, default=1e-3, help="Adam step size of Meta-Weight-Net (default 1e-3)")
    p.add_argument("--mwnet-estimator", default="second-order", choices=list(MWNET_ESTIMATORS),
                   help="how Meta-Weight-Net's meta-gradient is estimated (metaphi.outer; default second-order)")
    p.add_argument("--data-root", help="folder with the Omniglot archives (default: $METAPHI_DATA or "
                   "~/.cache/metaphi/data)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/reweight", help="folder for checkpoint.pt, result.json, result.md")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reweight)
