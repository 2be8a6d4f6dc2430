"""Helpers shared by the benchmark scripts: machine description, result files, and running
``metaphi`` commands (several at a time, each child's own CPU time measured, finished runs reused)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    return {"machine": platform.machine(), "cores": os.cpu_count(), "system": platform.system(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write(name: str, payload: dict, markdown: str, folder: str = RESULTS) -> None:
    """``folder``/NAME.json and NAME.md (benchmarks/results by default); the markdown is printed too."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(markdown.rstrip() + "\n")
    print(markdown)


def shell(cmd: list[str]) -> str:
    """A command as one line a user can paste."""
    return " ".join(a if a and all(ch.isalnum() or ch in "-_./:=" for ch in a) else repr(a) for a in cmd)


def without_threads(cmd: list[str]) -> list[str]:
    """``cmd`` without its ``--threads N`` (how many threads ran a command is not what it computed)."""
    out, skip = [], False
    for i, a in enumerate(cmd):
        if skip:
            skip = False
        elif a == "--threads" and i + 1 < len(cmd):
            skip = True
        else:
            out.append(a)
    return out


def _launch(cmd: list[str], out: str):
    """Start ``cmd`` (writing into ``out``) unless ``out`` holds a finished run of the same command (up
    to ``--threads``): ``(process, start time)``, or the recorded ``(cpu seconds, wall seconds)`` of
    the finished run."""
    stamp = os.path.join(out, "bench-command.json")
    if os.path.isfile(os.path.join(out, "result.json")) and os.path.isfile(stamp):
        with open(stamp) as f:
            saved = json.load(f)
        if without_threads(saved["command"]) == without_threads(cmd):
            return saved["cpu_seconds"], saved["wall_seconds"]
    if os.path.isdir(out):
        shutil.rmtree(out)
    print(shell(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), time.perf_counter()


def run_all(jobs: list[tuple[str, list[str], str]], parallel: int = 1) -> dict[str, tuple[float, float, bool]]:
    """Run the ``(name, command, out folder)`` jobs, ``parallel`` at a time: name -> (CPU seconds of
    that child alone (``os.wait4``), wall seconds, reused). A job whose folder holds a finished run of
    the same command up to ``--threads`` (``result.json`` and the ``bench-command.json`` this writes)
    is not run again."""
    done: dict[str, tuple[float, float, bool]] = {}
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, out = pending.pop(0)
            started = _launch(cmd, out)
            if isinstance(started[0], subprocess.Popen):
                running[started[0].pid] = (name, cmd, out, *started)
            else:
                done[name] = (*started, True)
        if not running:
            continue
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        name, cmd, out, proc, t0 = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed: {shell(cmd)}\n{proc.stderr.read()[-3000:]}")
        cpu, wall = usage.ru_utime + usage.ru_stime, time.perf_counter() - t0
        with open(os.path.join(out, "bench-command.json"), "w") as f:
            json.dump({"command": cmd, "cpu_seconds": cpu, "wall_seconds": wall}, f)
        done[name] = (cpu, wall, False)
    return done
