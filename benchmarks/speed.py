"""Speed and memory of one meta-gradient: metaphi against higher and TorchOpt on the same workload.

The peers are installed into a separate benchmark environment, never into the project's .venv and
never as project dependencies:

    python3.11 -m venv .bench-venv
    .bench-venv/bin/pip install torch==2.13.0 higher==0.2.1 torchopt==0.7.3 -e .
    .bench-venv/bin/python benchmarks/speed.py                      # all workloads, CPU
    .bench-venv/bin/python benchmarks/speed.py --device cuda        # the same table on a GPU

A peer that does not install or import is recorded with its error in the results, and the rest runs.

Workloads (Omniglot-shaped: a Conv4 with 64 filters, stride-2 blocks, on 1x28x28 images):
  maml-5w1s-q1       MAML, 5-way 1-shot, 1 query per class, meta-batch 32, one second-order step at 0.4
  maml-5w1s-q15      the same with 15 queries per class
  maml-20w1s-5steps  MAML, 20-way 1-shot, 1 query per class, meta-batch 16, five second-order steps at 0.1
  fomaml-5w1s-q15    first-order MAML, 5-way 1-shot, 15 queries per class, meta-batch 32, one step at 0.4
  protonet-5w1s-q15  Prototypical Networks on the Conv4 features, 5-way 1-shot, 15 queries, meta-batch 32

Every implementation gets the same initial weights and the same data tensors. The peers run their
documented idioms on an ordinary nn.Module with nn.BatchNorm2d(track_running_stats=False) (batch
statistics, as MAML uses them): higher's ``innerloop_ctx`` per task, TorchOpt's ``MetaSGD`` with
``extract_state_dict``/``recover_state_dict`` per task (its MAML-Omniglot example) and TorchOpt's
functional ``torchopt.sgd`` with ``torch.func.functional_call``; each backpropagates task by task,
which is the peers' lowest-memory form. Neither peer has anything for metric learners, so ProtoNet
is compared with the same computation written in plain PyTorch, one task at a time.

1. Check: the meta-gradients of every implementation are computed in float64 on the first
   ``--check-tasks`` tasks and must agree with metaphi's (looped) to 1e-5 (max absolute
   difference); the float32 difference on the whole meta-batch is reported as well.
2. Time: one meta-gradient of a meta-batch, implementations alternated round by round (the order
   rotates), ``--repeats`` rounds after a warm-up; median tasks/s.
3. Memory: one more meta-gradient per implementation, apart from the timing: on CPU the peak of
   what the CPU allocator handed out during it (the profiler's allocation events,
   ``metaphi.memory.cpu_allocator_peak``: the autograd graph, kernels' scratch and the buffers of
   compiled graphs are all counted; inputs that existed before are not); on CUDA
   ``torch.cuda.max_memory_allocated`` above what was allocated before.

metaphi is also run with its compiled estimator (``Unrolled(compile=True)``, ``metaphi run
--compile``): each task's meta-gradient compiled by ``torch.compile``, tasks in a loop, and on CUDA
the whole meta-batch as one compiled vmap as well (``--no-compile`` leaves these out). The first
call, which compiles, is timed apart and reported as "first call s"; the check compiles a float64
graph of its own.

Writes benchmarks/results/speed.json and speed.md (``--out`` changes the stem).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaphi.algorithms import CLASSIFICATION  # noqa: E402
from metaphi.algorithms.maml import MAML  # noqa: E402
from metaphi.algorithms.protonet import ProtoNet  # noqa: E402
from metaphi.inner import SGD  # noqa: E402
from metaphi.memory import cpu_allocator_peak  # noqa: E402
from metaphi.models import Conv4  # noqa: E402
from metaphi.outer import Unrolled  # noqa: E402
from metaphi.tasks import Task  # noqa: E402

HERE = Path(__file__).resolve().parent
HIDDEN, SIZE = 64, 28
CHUNK = 8  # tasks per vmap batch in the chunked variant: memory of 8 tasks, not of the meta-batch


@dataclass(frozen=True)
class Workload:
    name: str
    algorithm: str  # "maml" or "protonet"
    ways: int
    shots: int
    query: int
    meta_batch: int
    steps: int = 0
    lr: float = 0.0
    first_order: bool = False


WORKLOADS = {w.name: w for w in [
    Workload("maml-5w1s-q1", "maml", 5, 1, 1, 32, 1, 0.4),
    Workload("maml-5w1s-q15", "maml", 5, 1, 15, 32, 1, 0.4),
    Workload("maml-20w1s-5steps", "maml", 20, 1, 1, 16, 5, 0.1),
    Workload("fomaml-5w1s-q15", "maml", 5, 1, 15, 32, 1, 0.4, first_order=True),
    Workload("protonet-5w1s-q15", "protonet", 5, 1, 15, 32),
]}


# --- memory -------------------------------------------------------------------------------------

def peak_memory(fn, device: torch.device) -> int:
    """Peak extra bytes of one call of ``fn`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_allocator_peak(fn)[0]


# --- data and the peers' network --------------------------------------------------------------

def make_tasks(w: Workload, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(w.meta_batch, w.ways * w.shots, 1, SIZE, SIZE, generator=g)
    xq = torch.rand(w.meta_batch, w.ways * w.query, 1, SIZE, SIZE, generator=g)
    ys = torch.arange(w.ways).repeat_interleave(w.shots).expand(w.meta_batch, -1).contiguous()
    yq = torch.arange(w.ways).repeat_interleave(w.query).expand(w.meta_batch, -1).contiguous()
    return Task((xs, ys), (xq, yq))


class PeerConv4(nn.Module):
    """metaphi's Conv4 as a user of higher or TorchOpt writes it: torch's BatchNorm2d with batch
    statistics. Parameter names match metaphi's, so one state dict loads into both."""

    def __init__(self, ways: int, hidden: int = HIDDEN):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(4):
            layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU()]
            channels = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, ways)

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def initial_state(w: Workload) -> dict:
    torch.manual_seed(0)
    return copy.deepcopy(Conv4(1, w.ways, HIDDEN, SIZE).state_dict())


# --- implementations: each returns run() -> {conv4 parameter name: meta-gradient} --------------

def metaphi_impl(w: Workload, state: dict, tasks: Task, vectorize: bool, compiled: bool = False,
                 chunk: int | None = None):
    model = Conv4(1, w.ways, HIDDEN, SIZE)
    model.load_state_dict(state)
    model.to(tasks.support[0].device, tasks.support[0].dtype)
    if w.algorithm == "maml":
        algo = MAML(model, CLASSIFICATION, SGD(w.lr), w.steps)
    else:
        algo = ProtoNet(model)
    phi = algo.init_meta_params()
    first_order = w.first_order or w.algorithm == "protonet"

    def strip(grads):
        return {k.split(".", 1)[1]: v for k, v in grads.items()}

    estimator = Unrolled(first_order, vectorize=vectorize, chunk=chunk, compile=compiled)
    return lambda: strip(estimator(algo, phi, tasks)[0])


def _peer_net(w: Workload, state: dict, tasks: Task) -> PeerConv4:
    net = PeerConv4(w.ways)
    net.load_state_dict(state)
    return net.to(tasks.support[0].device, tasks.support[0].dtype)


def _grads_of(net: nn.Module) -> dict:
    return {k: p.grad for k, p in net.named_parameters() if p.grad is not None}


def higher_impl(w: Workload, state: dict, tasks: Task):
    import higher

    net = _peer_net(w, state, tasks)
    inner_opt = torch.optim.SGD(net.parameters(), lr=w.lr)
    (xs, ys), (xq, yq) = tasks
    n = xs.shape[0]

    def run():
        net.zero_grad(set_to_none=True)
        for i in range(n):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not w.first_order) as (fnet, diffopt):
                for _ in range(w.steps):
                    diffopt.step(F.cross_entropy(fnet(xs[i]), ys[i]))
                loss = F.cross_entropy(fnet(xq[i]), yq[i]) / n
                if w.first_order:  # higher detaches the fast weights: their gradient is FOMAML's
                    grads = torch.autograd.grad(loss, list(fnet.parameters()))
                    for p, g in zip(net.parameters(), grads):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    loss.backward()
        return _grads_of(net)
    return run


def torchopt_metasgd_impl(w: Workload, state: dict, tasks: Task):
    import torchopt

    net = _peer_net(w, state, tasks)
    inner_opt = torchopt.MetaSGD(net, lr=w.lr)
    (xs, ys), (xq, yq) = tasks
    n = xs.shape[0]

    def run():
        net.zero_grad(set_to_none=True)
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        for i in range(n):
            for _ in range(w.steps):
                inner_opt.step(F.cross_entropy(net(xs[i]), ys[i]))
            (F.cross_entropy(net(xq[i]), yq[i]) / n).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return _grads_of(net)
    return run


def torchopt_functional_impl(w: Workload, state: dict, tasks: Task):
    import torchopt

    net = _peer_net(w, state, tasks)
    names = [k for k, _ in net.named_parameters()]
    params = tuple(p for _, p in net.named_parameters())
    optimizer = torchopt.sgd(w.lr)
    (xs, ys), (xq, yq) = tasks
    n = xs.shape[0]

    def loss_at(p, x, y):
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, p)), (x,)), y)

    def run():
        total = [torch.zeros_like(p) for p in params]
        for i in range(n):
            p, opt_state = params, optimizer.init(params)
            for _ in range(w.steps):
                g = torch.autograd.grad(loss_at(p, xs[i], ys[i]), p, create_graph=not w.first_order)
                updates, opt_state = optimizer.update(g, opt_state, inplace=False)
                p = torchopt.apply_updates(p, updates, inplace=False)
            for t, g in zip(total, torch.autograd.grad(loss_at(p, xq[i], yq[i]) / n, params)):
                t += g
        return dict(zip(names, total))
    return run


def plain_protonet_impl(w: Workload, state: dict, tasks: Task):
    net = _peer_net(w, state, tasks)
    (xs, ys), (xq, yq) = tasks
    n = xs.shape[0]

    def run():
        net.zero_grad(set_to_none=True)
        for i in range(n):
            z = net.features(torch.cat([xs[i], xq[i]]))
            zs, zq = z[: xs.shape[1]], z[xs.shape[1]:]
            protos = torch.stack([zs[ys[i] == c].mean(0) for c in range(w.ways)])
            logits = -(zq[:, None] - protos[None]).pow(2).sum(-1)
            (F.cross_entropy(logits, yq[i]) / n).backward()
        return _grads_of(net)
    return run


def implementations(w: Workload, device: torch.device, compile_: bool) -> dict:
    """label -> (factory(state, tasks) -> run, peer package or None)."""
    impls = {
        "metaphi (vmap)": (lambda s, t: metaphi_impl(w, s, t, vectorize=True), None),
        "metaphi (loop)": (lambda s, t: metaphi_impl(w, s, t, vectorize=False), None),
        f"metaphi (vmap, chunks of {CHUNK})": (lambda s, t: metaphi_impl(w, s, t, vectorize=True, chunk=CHUNK), None),
    }
    if compile_:
        impls["metaphi (loop, compiled)"] = (lambda s, t: metaphi_impl(w, s, t, False, compiled=True), None)
        if device.type == "cuda":
            impls["metaphi (vmap, compiled)"] = (lambda s, t: metaphi_impl(w, s, t, True, compiled=True), None)
    if w.algorithm == "maml":
        impls["higher"] = (lambda s, t: higher_impl(w, s, t), "higher")
        if not w.first_order:
            impls["torchopt (MetaSGD)"] = (lambda s, t: torchopt_metasgd_impl(w, s, t), "torchopt")
        impls["torchopt (functional)"] = (lambda s, t: torchopt_functional_impl(w, s, t), "torchopt")
    else:
        impls["plain torch (loop)"] = (lambda s, t: plain_protonet_impl(w, s, t), None)
    return impls


# --- the run --------------------------------------------------------------------------------

def peer_status() -> dict:
    status = {}
    for name in ("higher", "torchopt"):
        try:
            module = __import__(name)
            status[name] = {"ok": True, "version": getattr(module, "__version__", _dist_version(name))}
        except Exception as e:  # a finding, not a failure: recorded in the results
            status[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return status


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def max_abs_diff(a: dict, b: dict) -> float:
    keys = [k for k in a if k in b]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_workload(w: Workload, args, peers: dict, device: torch.device) -> dict:
    state = initial_state(w)
    tasks32 = make_tasks(w).to(device)
    impls = {label: f for label, (f, pkg) in implementations(w, device, args.compile).items()
             if pkg is None or peers[pkg]["ok"]}
    out = {"workload": asdict(w), "rows": {}, "errors": {}}

    # 1. the check, in float64 on the first tasks, against metaphi's loop
    n = min(args.check_tasks, w.meta_batch)
    check_tasks = pytree.tree_map(lambda t: t[:n].double() if t.is_floating_point() else t[:n], tasks32)
    state64 = {k: v.double() for k, v in state.items()}
    reference = metaphi_impl(w, state64, check_tasks, vectorize=False)()
    runs = {}
    for label, factory in impls.items():
        try:
            diff = max_abs_diff(factory(state64, check_tasks)(), reference)
        except Exception as e:
            out["errors"][label] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            continue
        out["rows"][label] = {"check_max_abs_diff_float64": diff}
        if diff > 1e-5:
            out["errors"][label] = f"meta-gradient differs from metaphi's by {diff:.3g} (> 1e-5); not timed"
            continue
        runs[label] = factory(state, tasks32)
    print(f"[{w.name}] check (float64, {n} tasks): " +
          ", ".join(f"{k} {v['check_max_abs_diff_float64']:.1e}" for k, v in out["rows"].items()), flush=True)

    # 2. warm-up (also the float32 difference on the whole meta-batch), then alternate
    reference32 = None
    for label in list(runs):
        try:
            started = time.perf_counter()
            grads = runs[label]()
            sync(device)
            out["rows"][label]["first_call_seconds"] = time.perf_counter() - started
        except Exception as e:
            out["errors"][label] = f"{type(e).__name__}: {e}"
            runs.pop(label)
            continue
        if reference32 is None:
            reference32 = grads
        out["rows"][label]["float32_max_abs_diff_to_first"] = max_abs_diff(grads, reference32)
    times = {label: [] for label in runs}
    labels = list(runs)
    for r in range(args.repeats):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            sync(device)
            started = time.perf_counter()
            runs[label]()
            sync(device)
            times[label].append(time.perf_counter() - started)
        print(f"[{w.name}] round {r + 1}/{args.repeats}: " +
              ", ".join(f"{k} {times[k][-1]:.2f}s" for k in labels), flush=True)

    # 3. memory, one call each, apart from the timing
    for label in labels:
        try:
            out["rows"][label]["peak_bytes"] = peak_memory(runs[label], device)
        except Exception as e:
            out["rows"][label]["peak_bytes"] = None
            out["errors"][label + " (memory)"] = f"{type(e).__name__}: {e}"
    for label in labels:
        median = statistics.median(times[label])
        out["rows"][label].update(seconds=times[label], median_seconds=median, tasks_per_second=w.meta_batch / median)
    return out


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}"


def ratio_table(res: dict) -> str:
    """Rows with speed and memory relative to the fastest metaphi variant of the same run."""
    rows = {k: r for k, r in res["rows"].items() if "tasks_per_second" in r}
    ours = [k for k in rows if k.startswith("metaphi")]
    base = max(ours, key=lambda k: rows[k]["tasks_per_second"]) if ours else None
    lines = [f"| implementation | tasks/s (median) | s per meta-batch | peak memory MB | {base} speed ÷ this |"
             f" this memory ÷ {base} | check: max abs diff (float64) | first call s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        speed = rows[base]["tasks_per_second"] / r["tasks_per_second"] if base else float("nan")
        mem, base_mem = r.get("peak_bytes"), rows[base].get("peak_bytes") if base else None
        mem_ratio = f"{mem / base_mem:.2f}" if mem and base_mem else "–"
        lines.append(f"| {label} | {r['tasks_per_second']:.2f} | {r['median_seconds']:.2f} | "
                     f"{(mem or 0) / 2**20:.1f} | {speed:.2f}× | {mem_ratio} | {r['check_max_abs_diff_float64']:.1e} | "
                     f"{r.get('first_call_seconds', float('nan')):.1f} |")
    for label, err in res["errors"].items():
        lines.append(f"| {label} | – | – | – | – | – | {err} | – |")
    return "\n".join(lines)


def write_markdown(summary: dict, path: Path) -> None:
    lines = [f"## Speed: one meta-gradient, metaphi against higher and TorchOpt ({summary['device']})", "",
             f"Command: `{summary['command']}`  ", f"Machine: {summary['machine']}; {summary['threads']} intra-op "
             f"thread(s); load average before / after: {summary['load_before']} / {summary['load_after']}  ",
             f"Wall time: {summary['wall_seconds'] / 60:.1f} min; {summary['repeats']} alternated rounds after a "
             f"warm-up, medians.  ", f"Peers: " + "; ".join(
                 f"{k} {v['version']}" if v["ok"] else f"{k}: DID NOT IMPORT ({v['error']})"
                 for k, v in summary["peers"].items()), ""]
    for res in summary["workloads"]:
        w = res["workload"]
        lines += [f"### {w['name']}", "",
                  f"{w['ways']}-way {w['shots']}-shot, {w['query']} queries per class, meta-batch {w['meta_batch']}"
                  + (f", {w['steps']} inner step(s) at {w['lr']} ({'first' if w['first_order'] else 'second'}-order)"
                     if w["algorithm"] == "maml" else ", ProtoNet (no inner loop)"), "", ratio_table(res), ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5, help="alternated timing rounds (median reported)")
    parser.add_argument("--check-tasks", type=int, default=4, help="tasks of the float64 agreement check")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default 1: on a shared, loaded machine more threads "
                             "only wait for each other)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out metaphi's compiled estimator (whose first call compiles for tens of seconds)")
    parser.add_argument("--out", default=str(HERE / "results" / "speed"), help="stem of the .json and .md written")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here")
    else:
        torch.set_num_threads(args.threads or 1)
    peers = peer_status()
    for k, v in peers.items():
        print(f"{k}: {'version ' + str(v['version']) if v['ok'] else 'not importable: ' + v['error']}", flush=True)
    started, load_before = time.perf_counter(), load_average()
    results = []
    for name in args.workloads:
        results.append(bench_workload(WORKLOADS[name], args, peers, device))
        summary = {
            "command": f"{os.path.relpath(sys.executable)} benchmarks/speed.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(device), "device": device.type,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "load_before": load_before, "load_after": load_average(), "peers": peers, "repeats": args.repeats,
            "wall_seconds": time.perf_counter() - started, "workloads": results,
        }
        # written after every workload, so a run cut short keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(summary, indent=2) + "\n")
        write_markdown(summary, Path(args.out + ".md"))
        print(ratio_table(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
