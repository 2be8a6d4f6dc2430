"""``metaphi predict``: the flags of :class:`~metaphi.experiments.predict.PredictConfig`."""
from __future__ import annotations

from metaphi.config import add_config_option, add_options, resolve


def register(sub) -> None:
    from metaphi.experiments import predict

    p = sub.add_parser("predict", help="adapt a checkpoint to your labelled examples and label new images",
                       description=predict.__doc__.split("\n\n")[0].replace("``", ""))
    add_options(p, predict.PredictConfig)
    add_config_option(p)
    p.set_defaults(func=lambda args: predict.run(resolve(predict.PredictConfig, args)))
