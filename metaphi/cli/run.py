"""``metaphi run`` (meta-train and test) and ``metaphi eval`` (re-test a saved run)."""
from __future__ import annotations

from metaphi.cli import THREADS_HELP
from metaphi.experiments.fewshot import cmd_eval, cmd_run


def _algorithm_names():
    from metaphi.algorithms import ALGORITHMS
    return list(ALGORITHMS)


def register(sub) -> None:
    from metaphi.outer import ESTIMATORS
    from metaphi.tasks.registry import BENCHMARKS

    run = sub.add_parser("run", help="meta-train an algorithm and test it on held-out tasks")
    run.add_argument("algorithm", choices=_algorithm_names())
    run.add_argument("--benchmark", default="glyphs",
                     help=f"one of {', '.join(BENCHMARKS)} (default: glyphs, built in)")
    run.add_argument("--data-root", default=None,
                     help="folder with the data set's archives (default: $METAPHI_DATA or ~/.cache/metaphi/data)")
    run.add_argument("--download", action="store_true", help="download missing archives (checked by SHA-256)")
    run.add_argument("--within-alphabet", action="store_true",
                     help="test and validation tasks take all their classes from one alphabet (group)")
    run.add_argument("--image-size", type=int, help="folder:PATH only: resize images to this size (default 84)")
    run.add_argument("--channels", type=int, choices=[1, 3], help="folder:PATH only: 1 (grey) or 3 (RGB, default)")
    run.add_argument("--invert", action="store_true", help="folder:PATH only: dark ink on light paper becomes high")
    run.add_argument("--split-file", help="folder:PATH only: a file mapping class -> train/val/test")
    run.add_argument("--ways", type=int)
    run.add_argument("--train-ways", type=int,
                     help="classes per meta-training task, for learners that take any number (protonet, matching, "
                          "relation; default: --ways)")
    run.add_argument("--init", metavar="[ssl:]CHECKPOINT",
                     help="start the network's body from a saved run's (ssl: insists on a self-supervised run)")
    run.add_argument("--shots", type=int, help="support examples per class (K) for meta-training")
    run.add_argument("--query", type=int, help="query examples per class for meta-training")
    run.add_argument("--eval-shots", type=int, help="support examples per class at test (default: --shots)")
    run.add_argument("--eval-query", type=int, help="query examples per class at test")
    run.add_argument("--inner-steps", type=int, help="inner steps during meta-training")
    run.add_argument("--eval-steps", type=int, help="inner steps at test")
    run.add_argument("--inner-lr", type=float)
    run.add_argument("--meta-batch", type=int, help="tasks per meta-update")
    run.add_argument("--meta-lr", type=float)
    run.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="outer optimizer")
    run.add_argument("--estimator", choices=list(ESTIMATORS),
                     help="how φ's update is estimated (default: the algorithm's own)")
    run.add_argument("--loop", action="store_true", help="run the tasks of a meta-batch one by one instead of as one vmap batch")
    run.add_argument("--task-chunk", type=int, metavar="N",
                     help="vmap at most N tasks at a time, each chunk's gradient taken before the next: memory of N "
                          "tasks instead of the meta-batch (default: the whole meta-batch in one vmap)")
    run.add_argument("--checkpoint-inner", action="store_true",
                     help="gradient-checkpoint each inner step: memory for long second-order inner loops, for "
                          "about two more forwards and one more inner backward per step (tasks run one by one)")
    run.add_argument("--compile", action="store_true",
                     help="compile each task's meta-gradient with torch.compile (second-order and first-order "
                          "estimators): faster meta-iterations after a first one that compiles for tens of seconds")
    run.add_argument("--solver", choices=["cg", "neumann"], help="implicit estimator: linear solver (default cg)")
    run.add_argument("--solver-steps", type=int, help="implicit estimator: most Hessian-vector products (default 5)")
    run.add_argument("--solver-tol", type=float, help="implicit estimator: relative residual to stop at")
    run.add_argument("--solver-damping", type=float, help="implicit estimator: δ added to the Hessian's diagonal")
    run.add_argument("--neumann-alpha", type=float, help="implicit estimator: Neumann step (default: the inner lr)")
    run.add_argument("--iterations", type=int)
    run.add_argument("--eval-tasks", type=int, help="test tasks (default 600)")
    run.add_argument("--val-every", type=int, default=100, help="validate every this many iterations")
    run.add_argument("--val-tasks", type=int, default=100)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    run.add_argument("--eval-seed", type=int, default=1234, help="seed of the fixed test tasks")
    run.add_argument("--device", default="cpu")
    run.add_argument("--out", default=None, help="output folder (default: runs/ALGO-BENCHMARK-...)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--no-baselines", action="store_true", help="skip the scratch and pre-training baselines")
    run.add_argument("--baseline-steps", type=int, default=10, help="fine-tuning steps of the baselines at test")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="re-evaluate a saved run on its fixed test tasks")
    ev.add_argument("checkpoint")
    ev.add_argument("--eval-tasks", type=int, default=None)
    ev.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    ev.add_argument("--eval-steps", type=int, default=None)
    ev.add_argument("--eval-seed", type=int, default=None)
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--within-alphabet", action="store_true",
                    help="test tasks take all their classes from one alphabet (group)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="write the result JSON here")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)
