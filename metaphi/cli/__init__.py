"""The command line: one thin module per command, each registering its parser.

A command module has ``register(subparsers)``, which adds a parser whose ``func`` takes the parsed
arguments and returns an exit code. Bad input exits with code 2 and one line that says what is wrong
and what is valid; a run stopped by a non-finite loss exits with code 3 and keeps its last good
checkpoint. Nothing in the library imports this package.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from metaphi.config import NONFINITE_EXIT as NONFINITE
from metaphi.config import USAGE_ERROR, UsageError, add_config_option, add_options, resolve



class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


THREADS_HELP = ("torch CPU threads (default: torch's choice, lowered to the cores left free by other work, "
                "judged by the 1-minute load average; OMP_NUM_THREADS, if set, is respected)")


def study_command(subparsers, name: str, config_class: type, main: Callable[[Any], int], *, help: str,
                  description: str | None = None, epilog: str | None = None, raw: bool = False
                  ) -> argparse.ArgumentParser:
    """The parser of a command that is one study: a flag for every option of ``config_class`` and
    ``--config FILE.yaml``; it runs ``main(config)`` (defaults < the file < the flags) and returns its
    exit code. ``raw``: the description and epilog keep their line breaks."""
    formatter = {"formatter_class": argparse.RawDescriptionHelpFormatter} if raw else {}
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog, **formatter)
    add_options(parser, config_class)
    add_config_option(parser)
    parser.set_defaults(func=lambda args: main(resolve(config_class, args)))
    return parser


#: the command modules, in the order ``metaphi --help`` lists them
COMMANDS: tuple[str, ...] = ("metaphi.cli.run", "metaphi.cli.predict", "metaphi.cli.compare",
                              "metaphi.cli.tune", "metaphi.cli.l2o", "metaphi.cli.domaingen",
                              "metaphi.cli.distill", "metaphi.cli.augment", "metaphi.cli.continual",
                              "metaphi.cli.nas", "metaphi.cli.reweight")


def auto_threads(cpus: int, load: float, default: int) -> int:
    """Threads for this process: torch's ``default``, but no more than the cores that other work leaves
    free (``cpus`` minus the 1-minute ``load``), and at least one. Intra-op threads that have to share a
    core with another busy process wait on each other at every operation: on a 2-core machine with one
    other busy process, two threads ran meta-training several times slower than one."""
    free = cpus - int(round(load))
    return max(1, min(default, free))


#: more threads than any machine has cores (torch takes a 32-bit count)
MAX_THREADS = 4096


def set_threads(requested: int | None) -> None:
    import torch
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads must be a positive number, got {requested}")
        if requested >= 2 ** 63:
            raise UsageError(f"--threads must fit in 64 bits (below 2^63), got {requested}")
        if requested > MAX_THREADS:
            raise UsageError(f"--threads must be at most {MAX_THREADS}, got {requested}")
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS") and hasattr(os, "getloadavg"):
        torch.set_num_threads(auto_threads(os.cpu_count() or 1, os.getloadavg()[0], torch.get_num_threads()))


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from metaphi import __version__

    parser = _Parser(prog="metaphi", description="Meta-learning on PyTorch.")
    parser.add_argument("--version", action="version", version=f"metaphi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from metaphi.checkpoint import CheckpointError
    from metaphi.tasks import DataError
    from metaphi.train import NonFiniteLoss, ResumeError

    from metaphi import lock

    parser = build_parser()
    args = parser.parse_args(argv)
    lock.command = " ".join(["metaphi", *(sys.argv[1:] if argv is None else argv)])[:300]
    try:
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and args.command != "run":
            raise UsageError(f"only 'metaphi run' runs on several processes (torchrun); run '{args.command}' "
                             "as one process")
        set_threads(getattr(args, "threads", None) or None)
        return args.func(args)
    except (UsageError, DataError, CheckpointError, ResumeError) as e:
        print(f"metaphi: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except NonFiniteLoss as e:
        print(f"metaphi: stopped: {e}", file=sys.stderr)
        return NONFINITE
    finally:
        lock.release_all()


if __name__ == "__main__":
    sys.exit(main())
