"""``metaphi run`` and ``eval`` on config dataclasses: config files (a run's config.yaml reruns it,
flags override a file, unknown keys refused), family and estimator options as flags, and options that
do not apply to the chosen algorithm or estimator refused with one line."""
import json

import pytest
import yaml

from metaphi.cli import main
from metaphi.experiments.fewshot import RunConfig, complete
from metaphi.tasks.registry import build_benchmark

FAST = ["--benchmark", "sinusoid", "--iterations", "3", "--meta-batch", "2", "--eval-tasks", "10", "--val-tasks", "3",
        "--no-baselines", "--quiet"]


def result(folder):
    return json.loads((folder / "result.json").read_text())


def test_a_runs_config_yaml_reruns_it(tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["run", "imaml", *FAST, "--seed", "3", "--reg", "1.5", "--solver-steps", "3", "--out", str(first)]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    # fully resolved: the benchmark's sizes, the estimator and every family and estimator option written out
    assert saved["algorithm"] == "imaml" and saved["seed"] == 3 and saved["ways"] == 1 and saved["inner_lr"] == 0.01
    assert saved["estimator"] == "implicit" and saved["algorithm_options"]["reg"] == 1.5
    assert saved["estimator_options"]["solver_steps"] == 3 and saved["estimator_options"]["solver"] == "cg"
    assert saved["out"] == str(first)
    assert main(["run", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    a, b = result(first), result(again)
    assert b["mean"] == a["mean"] and b["seed"] == a["seed"] == 3 and b["iterations"] == 3
    assert yaml.safe_load((again / "config.yaml").read_text()) == {**saved, "out": str(again)}


def test_flags_override_the_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("algorithm: maml\nbenchmark: sinusoid\niterations: 2\nmeta_batch: 2\neval_tasks: 4\n"
                      "val_tasks: 2\nseed: 1\nbaselines: false\nquiet: true\nestimator_options: {loop: true}\n")
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--seed", "7", "--iterations", "1", "--out", str(out)]) == 0
    r = result(out)
    assert r["seed"] == 7 and r["iterations"] == 1 and r["eval_tasks"] == 4 and r["algorithm"] == "maml"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["estimator_options"]["loop"] is True
    # a flag for an estimator option overrides the file's mapping, key by key
    out2 = tmp_path / "out2"
    assert main(["run", "--config", str(config), "--no-loop", "--task-chunk", "1", "--out", str(out2)]) == 0
    saved = yaml.safe_load((out2 / "config.yaml").read_text())
    assert saved["estimator_options"]["loop"] is False and saved["estimator_options"]["task_chunk"] == 1
    # the algorithm on the command line wins over the file's
    out3 = tmp_path / "out3"
    assert main(["run", "fomaml", "--config", str(config), "--out", str(out3)]) == 0
    assert result(out3)["algorithm"] == "fomaml" and result(out3)["estimator"] == "first-order"


def test_another_algorithm_or_estimator_on_the_command_line_drops_the_files_options_for_the_old_one(tmp_path,
                                                                                                      capsys):
    first = tmp_path / "imaml"
    assert main(["run", "imaml", *FAST, "--reg", "1.5", "--out", str(first)]) == 0
    config = str(first / "config.yaml")
    # the file spells out imaml's reg and the implicit solver's options: MAML takes its own estimator and defaults
    maml = tmp_path / "maml"
    assert main(["run", "maml", "--config", config, "--out", str(maml)]) == 0
    saved = yaml.safe_load((maml / "config.yaml").read_text())
    assert saved["algorithm"] == "maml" and saved["estimator"] == "second-order"
    assert saved["algorithm_options"] == {} and "solver" not in saved["estimator_options"]
    # another estimator for the same algorithm keeps the family's options, not the old estimator's
    es = tmp_path / "es"
    assert main(["run", "--config", config, "--estimator", "es", "--out", str(es)]) == 0
    saved = yaml.safe_load((es / "config.yaml").read_text())
    assert saved["algorithm_options"]["reg"] == 1.5 and saved["estimator"] == "es"
    assert "solver" not in saved["estimator_options"] and "population" in saved["estimator_options"]
    # a flag for the new estimator still reaches it; one for the old is still refused
    assert main(["run", "maml", "--config", config, "--solver", "cg", "--out", str(tmp_path / "bad")]) == 2
    assert "--solver applies to the implicit estimator" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("algorithm: maml\nbogus: 1\n", "unknown option bogus"),
    ("algorithm: maml\nalgorithm_options: {reg: 2.0}\n", "--reg applies to imaml, not maml"),
    ("algorithm: maml\nestimator_options: {solver: cg}\n",
     "--solver applies to the implicit estimator, not second-order"),
    ("algorithm: imaml\nalgorithm_options: {reg: -1}\n", "--reg must be a positive number"),
    ("algorithm: maml\nshots: 0\n", "--shots must be a positive number, got 0"),
    ("algorithm: maml\nways: many\n", "ways must be an integer"),
    ("- maml\n", "must hold a mapping of options"),
    ("algorithm: maml\nestimator_options: 3\n", "estimator_options"),
])
def test_bad_config_files_exit_2_naming_the_option(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["run", "--config", str(config), "--benchmark", "sinusoid", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args, message", [
    (["maml", "--solver", "neumann"], "--solver applies to the implicit estimator, not second-order"),
    (["maml", "--estimator", "es", "--task-chunk", "2"],
     "--task-chunk applies to the second-order and first-order estimators, not es"),
    (["maml", "--estimator", "es", "--checkpoint-inner"], "--checkpoint-inner applies to the second-order and "
                                                          "first-order estimators, not es"),
    (["maml", "--estimator", "es", "--compile"], "--compile applies to the second-order and first-order estimators, "
                                                 "not es"),
    (["maml", "--population", "8"], "--population applies to the es estimator, not second-order"),
    (["maml", "--reg", "2"], "--reg applies to imaml, not maml"),
    (["imaml", "--task-chunk", "2"],
     "--task-chunk applies to the second-order and first-order estimators, not implicit"),
    (["reptile", "--loop"], "--loop applies to the second-order, first-order, implicit and es estimators, not reptile"),
    (["imaml", "--fce"], "--fce applies to matching and matching-fce, not imaml"),
    (["maml", "--estimator", "es", "--population", "3"], "--population must be an even number"),
    (["maml", "--compile", "--checkpoint-inner"], "do not go together"),
    (["run-nothing"], "invalid choice: 'run-nothing'"),
])
def test_options_that_do_not_apply_exit_2_with_one_line(tmp_path, capsys, args, message):
    if args[0] == "run-nothing":
        with pytest.raises(SystemExit) as stop:
            main(["run", *args])
        assert stop.value.code == 2 and message in capsys.readouterr().err
        return
    assert main(["run", *args, *FAST, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "checkpoint.pt").exists()  # refused before any training


def test_run_without_an_algorithm_says_so(tmp_path, capsys):
    assert main(["run", *FAST, "--out", str(tmp_path)]) == 2
    assert "name the algorithm" in capsys.readouterr().err


def test_family_and_estimator_options_reach_them(tmp_path, capsys):
    out = tmp_path / "es"
    assert main(["run", "maml", *FAST, "--estimator", "es", "--population", "4", "--sigma", "0.05", "--out",
                 str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["estimator"] == "es" and saved["estimator_options"]["population"] == 4
    assert saved["estimator_options"]["sigma"] == 0.05 and saved["algorithm_options"] == {}


def test_help_lists_every_family_and_estimator_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--reg", "--solver", "--solver-steps", "--population", "--task-chunk", "--loop", "--config",
                 "--distance", "--reptile-steps"):
        assert flag in text
    assert "imaml options:" in text and "implicit estimator options:" in text
    assert text.count("--loop,") == 1  # shared by four estimators: one flag
    assert "(default: glyphs)" in text and "(default: cg)" in text and "(default: 100)" in text


def test_family_defaults_decide_reptiles_inner_steps():
    benchmark = build_benchmark("sinusoid")
    assert benchmark.defaults["inner_steps"] < 5
    assert complete(RunConfig(algorithm="reptile"), benchmark).inner_steps == 5
    assert complete(RunConfig(algorithm="reptile", inner_steps=2), benchmark).inner_steps == 2
    assert complete(RunConfig(algorithm="maml"), benchmark).inner_steps == benchmark.defaults["inner_steps"]


def test_eval_takes_a_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "fomaml", *FAST, "--out", str(out)]) == 0
    config = tmp_path / "eval.yaml"
    config.write_text(f"checkpoint: {out / 'checkpoint.pt'}\neval_tasks: 10\nout: {tmp_path / 'e.json'}\n")
    assert main(["eval", "--config", str(config)]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["mean"] == pytest.approx(result(out)["mean"], rel=1e-6)
    config.write_text("checkpoint: x.pt\nbogus: 1\n")
    capsys.readouterr()
    assert main(["eval", "--config", str(config)]) == 2
    assert "unknown option bogus" in capsys.readouterr().err
