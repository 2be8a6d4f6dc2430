"""``metaphi predict``: the flags of :class:`~metaphi.experiments.predict.PredictConfig`."""
from __future__ import annotations


def register(sub) -> None:
    from metaphi.cli import study_command
    from metaphi.experiments import predict

    study_command(sub, "predict", predict.PredictConfig, predict.run,
                  help="adapt a checkpoint to your labelled examples and label new images",
                  description=predict.__doc__.split("\n\n")[0].replace("``", ""))
