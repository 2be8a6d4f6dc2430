"""Every bad input exits 2 with one line, no traceback, and creates nothing under --out.

A table-driven walk over every subcommand: each numeric option of each command is given a value it
must refuse (not finite, past 64 bits, not a number), each device option a device that is not here,
each result-file option a folder or a file in a missing folder, and each checkpoint argument a file
that is not a whole run checkpoint. The classes of input come from the parser itself, so an option
added later is walked too.
"""
import argparse
import os

import pytest
import torch

from metaphi.cli import build_parser, main

#: a valid command line for each subcommand, to which one bad option is added
BASE = {
    "run": ["maml", "--benchmark", "glyphs"],
    "eval": ["{ck}"],
    "predict": ["--checkpoint", "{ck}", "--support", "{tmp}", "--query", "{tmp}"],
    "compare": ["maml", "--benchmark", "glyphs"],
    "tune": ["maml", "--benchmark", "glyphs"],
    "l2o train": [],
    "l2o eval": [],
    "domaingen": [],
    "distill": [],
    "augment": [],
    "continual": [],
    "search-arch": ["random"],
    "reweight": [],
}
#: options that take a folder to write into, by command (given as {out})
FOLDER_OUT = {"run", "compare", "tune", "l2o train", "domaingen", "distill", "augment", "continual", "search-arch",
              "reweight"}


def _leaves(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _leaves(sub, prefix + (name,))
                else:
                    yield " ".join(prefix + (name,)), sub


def _kind(action) -> str | None:
    name = getattr(action.type, "__name__", "")
    if name in ("number", "float"):
        return "number"
    if name == "integer":
        return "integer"
    return None


def _owner(group_title: str) -> list[str] | None:
    """The command line an option of a family's or an estimator's group applies to (run and tune)."""
    if not group_title.endswith(" options") or group_title == "options":
        return None
    owner = group_title.removesuffix(" options")
    if owner.endswith(" estimator"):
        estimator = owner.removesuffix(" estimator")
        algorithm = {"implicit": "imaml", "reptile": "reptile"}.get(estimator, "maml")
        return [algorithm, "--benchmark", "glyphs", "--estimator", estimator]
    return [owner, "--benchmark", "glyphs"]


def matrix():
    """(command, base command line, option, bad value, words the one line must hold)."""
    cases = []
    for command, sub in _leaves(build_parser()):
        assert command in BASE, f"metaphi {command} has no entry in BASE: add one so its options are walked"
        owners = {id(a): _owner(g.title or "") for g in sub._action_groups for a in g._group_actions
                  if command in ("run", "tune")}  # run's and tune's groups are families and estimators
        for action in sub._actions:
            flags = [s for s in action.option_strings if s.startswith("--")]
            if not flags or flags[0] in ("--help", "--config"):
                continue
            if action.choices is not None:  # argparse itself refuses what is not among them
                continue
            flag, kind = flags[0], _kind(action)
            base = owners.get(id(action)) or BASE[command]
            values = []
            if kind == "number":
                values = [("nan", "must be a finite number"), ("inf", "must be a finite number")]
            elif kind == "integer":
                values = [(str(2 ** 64), "64 bits"), ("1.5", "integer")]
            elif action.dest == "device":
                values = [("banana", "not a torch device"), ("cuda:7", "cuda")]
            elif flag == "--out" and command not in FOLDER_OUT:  # a result file
                values = [("{tmp}", "is a folder"), ("{tmp}/no/such/folder/r.json", "does not exist")]
            repeat = action.nargs if isinstance(action.nargs, int) else 1
            cases += [(command, base, flag, [value] * repeat, words) for value, words in values]
    return cases


CASES = matrix()


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    assert main(["run", "maml", "--benchmark", "glyphs", "--iterations", "1", "--eval-tasks", "2", "--quiet",
                 "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def test_the_matrix_covers_every_command_and_many_options():
    commands = {c for c, *_ in CASES}
    assert commands == set(BASE), set(BASE) - commands
    assert len(CASES) > 300


@pytest.mark.parametrize("command,base,flag,values,words", CASES,
                         ids=[f"{c} {f} {v[0]}" for c, _, f, v, _ in CASES])
def test_bad_value(tmp_path, capsys, real_checkpoint, command, base, flag, values, words):
    fill = lambda s: s.format(ck=real_checkpoint, tmp=tmp_path)
    out = tmp_path / "out"
    argv = [*command.split(), *map(fill, base)]
    if command in FOLDER_OUT and flag != "--out":
        argv += ["--out", str(out)]
    code, err = _run([*argv, flag, *map(fill, values)], capsys)
    assert code == 2, f"metaphi {' '.join(argv)} {flag} {values}: exit {code}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert words in lines[0], lines[0]
    assert not out.exists(), f"{out} was created by a refused command"


def _broken(ck: dict, how: str) -> dict:
    ck = dict(ck)
    if how == "no run":
        del ck["run"]
    elif how == "unknown algorithm":
        ck["algorithm"] = {**ck["algorithm"], "class": "nope", "name": "nope"}
    elif how == "missing weight":
        ck["phi"] = dict(list(ck["phi"].items())[1:])
    elif how == "extra weight":
        ck["phi"] = {**ck["phi"], "stray": torch.zeros(1)}
    elif how == "wrong shape":
        k = next(iter(ck["phi"]))
        ck["phi"] = {**ck["phi"], k: ck["phi"][k][..., :1]}
    elif how == "not a dict":
        ck = [1, 2, 3]
    return ck


BROKEN = {"no run": "lacks 'run'", "unknown algorithm": "cannot rebuild its algorithm 'nope'",
          "missing weight": "lacks the weight", "extra weight": "does not use", "wrong shape": "has shape",
          "not a dict": "is not a metaphi checkpoint"}


@pytest.mark.parametrize("how", list(BROKEN))
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_checkpoint_that_is_not_a_whole_run(tmp_path, capsys, real_checkpoint, command, how):
    bad = tmp_path / "bad.pt"
    torch.save(_broken(torch.load(real_checkpoint, weights_only=True), how), bad)
    argv = [command, str(bad)] if command == "eval" else [command, "--checkpoint", str(bad), "--support",
                                                          str(tmp_path), "--query", str(tmp_path)]
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and BROKEN[how] in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]


def test_a_seed_past_64_bits_and_bad_domains(tmp_path, capsys):
    code, err = _run(["domaingen", "--domains", "abc", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "angles in degrees" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
