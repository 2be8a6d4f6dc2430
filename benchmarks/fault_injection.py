"""Fault injection: kill -9 and resume, two runs on one --out, and checkpoints that carry code.

Three experiments on the real command line (``metaphi`` in subprocesses, as a user or an attacker
would run it):

1. **kill -9 / --resume**: a reference run goes uninterrupted; then the same run is started, killed
   with SIGKILL at a random moment (its progress can be anywhere: building data, training, writing a
   checkpoint, testing), resumed with ``--resume`` (or started again where it had written no checkpoint
   yet), killed again, ... up to four times (an attempt may finish first), then left to finish. Counted: kills, corrupt checkpoints met on
   resuming (a resume that fails to read its checkpoint), and whether the final result and weights are
   bitwise those of the reference.
2. **one run per --out**: a run holds a folder while a second run is started on it; counted: second
   runs refused with exit 2 naming the holder, and runs whose files the second one touched.
3. **payloads**: a ``.pt`` that runs code when unpickled is put where eval, predict, run --init,
   run --init ssl:, run --resume, compare NAME@FILE and l2o eval read a checkpoint; counted: commands
   refused with exit 2, payloads that ran.

    .venv/bin/python benchmarks/fault_injection.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/fault_injection.py --quick    # a smoke run

Writes benchmarks/results/fault_injection.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, write  # noqa: E402

NAME = "fault_injection"
METAPHI = [sys.executable, "-m", "metaphi"]


def run_args(out: str, iterations: int) -> list[str]:
    return [*METAPHI, "run", "maml", "--benchmark", "glyphs", "--iterations", str(iterations), "--val-every", "10",
            "--eval-tasks", "20", "--no-baselines", "--threads", "1", "--quiet", "--seed", "3", "--out", out]


def final_state(out: str) -> tuple[dict, dict]:
    """(result.json less its timings, the checkpoint's φ)."""
    result = json.load(open(os.path.join(out, "result.json")))
    for k in ("wall_seconds", "train_seconds", "test_seconds", "checkpoint", "machine", "best_checkpoint"):
        result.pop(k, None)
    result.get("best", {}).pop("test_seconds", None)
    phi = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["phi"]
    return result, phi


def kill_and_resume(work: str, iterations: int, rounds: int, rng: random.Random, log) -> dict:
    reference = os.path.join(work, "reference")
    started = time.perf_counter()
    subprocess.run(run_args(reference, iterations), check=True, capture_output=True)
    whole = time.perf_counter() - started
    ref_result, ref_phi = final_state(reference)
    kills = corrupt = identical = finished = 0
    for r in range(rounds):
        out = os.path.join(work, f"killed-{r}")
        planned = rng.randint(1, 4)  # kills in this round, then an attempt left to finish
        attempt = 0
        while True:
            attempt += 1
            resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
            proc = subprocess.Popen(run_args(out, iterations) + (["--resume"] if resume else []),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                proc.wait(timeout=rng.uniform(0.3, 0.7 * whole) if attempt <= planned else None)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
            err = proc.stderr.read()
            if proc.returncode != 0:
                if "checkpoint" in err and "not a readable" in err:
                    corrupt += 1
                    shutil.rmtree(out)  # counted; the round starts over
                    continue
                raise SystemExit(f"round {r}: exit {proc.returncode}: {err}")
            break
        finished += 1
        result, phi = final_state(out)
        same = result == ref_result and phi.keys() == ref_phi.keys() and all(torch.equal(phi[k], ref_phi[k])
                                                                             for k in phi)
        identical += same
        log(f"kill/resume round {r}: {kills} kills so far, identical to the uninterrupted run: {same}")
    return {"rounds": rounds, "kills": kills, "corrupt_checkpoints": corrupt, "finished": finished,
            "identical_to_uninterrupted": identical, "iterations": iterations,
            "uninterrupted_seconds": round(whole, 1)}


def concurrent_out(work: str, iterations: int, trials: int, log) -> dict:
    refused = named = untouched = 0
    for t in range(trials):
        out = os.path.join(work, f"shared-{t}")
        first = subprocess.Popen(run_args(out, iterations), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(600):  # until the first run holds the folder
            if os.path.exists(os.path.join(out, ".lock")) and os.path.getsize(os.path.join(out, ".lock")):
                break
            time.sleep(0.05)
        second = subprocess.run(run_args(out, iterations), capture_output=True, text=True)
        refused += second.returncode == 2
        named += f"pid {first.pid}" in second.stderr
        first.wait()
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        untouched += first.returncode == 0 and [r["iteration"] for r in rows] == list(range(1, iterations + 1))
        log(f"concurrent --out trial {t}: second run exit {second.returncode}: {second.stderr.strip()[:120]}")
    return {"trials": trials, "second_run_refused_exit_2": refused, "holder_named": named,
            "first_run_intact": untouched}


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def payloads(work: str, log) -> dict:
    marker = os.path.join(work, "payload-ran")
    f = os.path.join(work, "payload.pt")
    torch.save({"phi": {}, "run": {}, "x": Payload(marker)}, f)
    resume_out = os.path.join(work, "resume-payload")
    os.makedirs(resume_out, exist_ok=True)
    shutil.copy(f, os.path.join(resume_out, "checkpoint.pt"))
    glyphs = ["--benchmark", "glyphs", "--iterations", "1", "--eval-tasks", "2", "--quiet"]
    entry_points = {
        "eval": ["eval", f],
        "predict": ["predict", "--checkpoint", f, "--support", work, "--query", work],
        "run --init": ["run", "maml", "--init", f, *glyphs, "--out", os.path.join(work, "o1")],
        "run --init ssl:": ["run", "maml", "--init", f"ssl:{f}", *glyphs, "--out", os.path.join(work, "o2")],
        "run --resume": ["run", "maml", *glyphs, "--out", resume_out, "--resume"],
        "compare NAME@FILE": ["compare", f"maml@{f}", "--benchmark", "glyphs", "--eval-tasks", "2", "--out",
                              os.path.join(work, "o3")],
        "l2o eval": ["l2o", "eval", f],
    }
    rows = {}
    for name, argv in entry_points.items():
        p = subprocess.run([*METAPHI, *argv], capture_output=True, text=True)
        rows[name] = {"exit": p.returncode, "message": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "",
                      "payload_ran": os.path.exists(marker)}
        log(f"payload via {name}: exit {p.returncode}, ran: {os.path.exists(marker)}")
        if os.path.exists(marker):
            os.unlink(marker)
    return {"entry_points": rows, "refused_exit_2": sum(r["exit"] == 2 for r in rows.values()),
            "payloads_run": sum(r["payload_ran"] for r in rows.values()), "tried": len(rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=120, help="of each run (checkpoints every 50)")
    ap.add_argument("--rounds", type=int, default=5, help="kill/resume rounds")
    ap.add_argument("--trials", type=int, default=3, help="concurrent --out trials")
    ap.add_argument("--seed", type=int, default=0, help="of the kill times")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help=f"folder for {NAME}.{{json,md}} (default: benchmarks/results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.rounds, args.trials = 60, 1, 1
    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="metaphi-faults-")
    log = lambda s: print(s, flush=True)
    try:
        kills = kill_and_resume(work, args.iterations, args.rounds, random.Random(args.seed), log)
        concurrent = concurrent_out(work, args.iterations, args.trials, log)
        payload = payloads(work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload_json = {"machine": machine(), "settings": vars(args), "kill_resume": kills, "concurrent_out": concurrent,
                    "payloads": payload, "wall_minutes": (time.perf_counter() - started) / 60,
                    "command": " ".join(sys.argv[1:])}
    write(NAME, payload_json, report(payload_json), args.out or RESULTS)


def report(p: dict) -> str:
    k, c, y = p["kill_resume"], p["concurrent_out"], p["payloads"]
    lines = ["### Fault injection (`benchmarks/fault_injection.py`)", "",
             "| experiment | what was done | outcome |", "|---|---|---|",
             f"| kill -9, then `--resume` | {k['rounds']} runs of `metaphi run maml --benchmark glyphs --iterations "
             f"{k['iterations']}`, up to 4 times killed with SIGKILL at a random moment (and resumed), then "
             f"left to finish: {k['kills']} kills | {k['identical_to_uninterrupted']} of {k['finished']} finished runs bitwise identical "
             f"to the uninterrupted run (result.json and φ); {k['corrupt_checkpoints']} corrupt checkpoints |",
             f"| two runs on one `--out` | a second run started while the first held the folder, {c['trials']} times | "
             f"{c['second_run_refused_exit_2']} of {c['trials']} refused with exit 2 ({c['holder_named']} naming the "
             f"holder's pid); {c['first_run_intact']} of {c['trials']} first runs finished with their own metrics intact |",
             f"| checkpoints carrying code | a pickle payload at {y['tried']} entry points "
             f"({', '.join(y['entry_points'])}) | {y['refused_exit_2']} of {y['tried']} refused with exit 2; "
             f"payloads run: {y['payloads_run']} |", "",
             "The test suite repeats the payload case at every entry point, the studies' own folders included "
             "(tests/cli/test_payloads.py), and the lock and resume checks (tests/cli/test_out_folder.py).", "",
             f"Command: `.venv/bin/python benchmarks/fault_injection.py {p['command']}` ({p['wall_minutes']:.1f} "
             "minutes wall clock)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
