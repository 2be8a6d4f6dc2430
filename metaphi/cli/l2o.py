"""``metaphi l2o train | eval``: meta-train a learned optimizer, and compare optimizers on an optimizee family.

    metaphi l2o train --rule lstm --family glyphs --horizon 100 --unroll 20 --iterations 100 --out runs/l2o-lstm
    metaphi l2o train --config runs/l2o-lstm/config.yaml --out runs/l2o-lstm-again
    metaphi l2o eval runs/l2o-lstm/optimizer.pt --family glyphs-relu --horizons 100 200 --out relu.json

``train`` writes ``config.yaml``, ``checkpoint.pt`` (resumable with ``--resume``), ``metrics.jsonl``,
``optimizer.pt`` (the best meta-parameters on validation problems; load it with
``metaphi.inner.optim.LearnedOptimizer``) and ``result.json`` (its final loss on test problems). ``eval``
tunes the learning rate of each hand-designed optimizer on a grid on validation problems and reports
every optimizer's mean final loss ± 95% CI on the same test problems. The study is
``metaphi.experiments.l2o`` (``run_train``, ``run_eval``); this module only builds its config.
"""
from __future__ import annotations

import argparse

#: list options that keep their space-separated form (``--horizons 100 200``); ``100,200`` works too
SPACED = {"horizons": "+", "grid": "+", "baselines": "*"}


def register(subparsers) -> None:
    from metaphi.config import add_config_option, add_options
    from metaphi.experiments.l2o import L2OEvalConfig, L2OTrainConfig

    l2o = subparsers.add_parser("l2o", help="learned optimizers: meta-train one, or compare optimizers",
                                description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = l2o.add_subparsers(dest="l2o_command", required=True, parser_class=type(l2o))

    tr = sub.add_parser("train", help="meta-train a learned update rule by truncated backpropagation")
    add_options(tr, L2OTrainConfig)
    add_config_option(tr)
    tr.set_defaults(func=lambda args: _run("run_train", L2OTrainConfig, args))

    ev = sub.add_parser("eval", help="compare learned optimizers with tuned hand-designed ones")
    add_options(ev, L2OEvalConfig)
    add_config_option(ev)
    for action in ev._actions:
        if action.dest in SPACED:
            action.nargs = SPACED[action.dest]
        elif action.dest == "optimizers":
            action.nargs = "*"
    ev.set_defaults(func=lambda args: _run("run_eval", L2OEvalConfig, args))


def _run(study: str, cls, args: argparse.Namespace) -> int:
    from metaphi.config import resolve
    from metaphi.experiments import l2o

    for name in SPACED:
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, [item for value in getattr(args, name) for item in value.split(",") if item.strip()])
    getattr(l2o, study)(resolve(cls, args))
    return 0
