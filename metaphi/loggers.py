"""Where a run's curves go besides ``metrics.jsonl``: ``--log csv,tensorboard,wandb``.

Each logger gets the same rows as ``metrics.jsonl`` (iteration, loss, the task metric, the step size
where scheduled, seconds, and ``val`` when validated) and the run's fully resolved configuration.

- ``csv``: ``OUT/metrics.csv``, one row per iteration (columns as they first appear).
- ``tensorboard``: event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT``); needs the
  ``tensorboard`` package.
- ``wandb``: a Weights & Biases run named after ``OUT`` with the config attached; needs ``wandb``
  (``WANDB_MODE=offline`` keeps it on this machine). Its id is kept in ``OUT/wandb-run-id``: a resumed
  run continues the same W&B run.

The packages are imported only when their logger is asked for; a missing one is a UsageError naming the
``pip install`` that fixes it. A resumed run appends: its loggers continue at the next iteration.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import secrets
from typing import Any

from metaphi.config import UsageError

LOGGERS = ("csv", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_loggers(names: list[str] | None) -> list[str]:
    """``names`` checked: known, and their packages importable; a UsageError otherwise."""
    names = list(names or [])
    for name in names:
        if name not in LOGGERS:
            raise UsageError(f"--log: unknown logger '{name}' (valid: {', '.join(LOGGERS)})")
        package = _PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UsageError(f"--log {name} needs the {package} package: pip install {package} (or both loggers' "
                             "packages: pip install 'metaphi[log]')")
    return names


class CSVLogger:
    def __init__(self, out_dir: str, config: dict):
        self.path = os.path.join(out_dir, "metrics.csv")
        self.columns: list[str] = []

    def start(self, history: list[dict]) -> None:
        """The file holds exactly ``history`` (a resumed run's checkpointed rows), as metrics.jsonl does."""
        if os.path.exists(self.path):
            os.remove(self.path)
        self.columns = []
        for row in history:
            self.log(row)

    def log(self, row: dict) -> None:
        new = [k for k in row if k not in self.columns]
        if new and self.columns:  # a column first seen now (val): rewrite the file with it
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(rows)
        elif new:
            self.columns = list(row)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.columns).writeheader()
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, out_dir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def log(self, row: dict) -> None:
        step = row["iteration"]
        for k, v in row.items():
            if k != "iteration" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, out_dir: str, config: dict):
        import wandb

        # the run's id is kept in OUT, so a resumed run continues the same W&B run instead of starting another
        id_file = os.path.join(out_dir, "wandb-run-id")
        run_id = open(id_file).read().strip() if os.path.isfile(id_file) else secrets.token_hex(4)
        self.run = wandb.init(project="metaphi", name=os.path.basename(os.path.abspath(out_dir)), config=config,
                              dir=out_dir, id=run_id, resume="allow")
        with open(id_file, "w") as f:
            f.write(run_id + "\n")

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class Loggers:
    """The loggers ``names`` of a run writing into ``out_dir``: checked when made, opened by ``start(history)``
    (once the run is past its own checks: a refused ``--resume`` opens no W&B run), ``log(row)`` to all,
    ``close()`` at the end."""

    def __init__(self, names: list[str] | None, out_dir: str | None, config: dict[str, Any]):
        self.names = check_loggers(names) if out_dir else []
        self.out_dir, self.config = out_dir, config
        self.loggers: list = []

    def start(self, history: list[dict]) -> None:
        self.loggers = [_CLASSES[n](self.out_dir, self.config) for n in self.names]
        for logger in self.loggers:
            if hasattr(logger, "start"):
                logger.start(history)

    def log(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []
