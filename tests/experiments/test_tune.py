import json
import math

import pytest
import torch

from metaphi.tasks import registry as benchmarks
from metaphi.cli import main
from metaphi.experiments.tune import Space, trial_iterations
from metaphi.outer.search import METHODS, ReinforceSearch, best_trial, search

SPACE = Space((1e-3, 1.0), (1, 2, 3, 4, 5), (4, 8, 16, 32), lr_points=7)
START = {"inner_lr": 1e-3, "inner_steps": 1, "meta_batch": 32}


def synthetic(config):
    """Best at inner_lr = 0.1, 3 steps, meta-batch 8; smooth in log lr and the counts."""
    return {"score": -((math.log10(config["inner_lr"]) + 1) ** 2 + (config["inner_steps"] - 3) ** 2
                       + 0.3 * (math.log2(config["meta_batch"]) - 3) ** 2)}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_improves_on_the_default_of_a_synthetic_problem(method):
    if method == "cma":
        pytest.importorskip("cma")
    trials = search(synthetic, SPACE, 40, method, torch.Generator().manual_seed(0), START)
    assert len(trials) == 40 and trials[0]["proposer"] == "default"
    best = best_trial(trials)
    assert best["score"] > trials[0]["score"] + 2.0
    assert best["score"] > -1.5, best  # the optimum is 0, the default -9.2


def test_reinforce_search_concentrates_on_the_best_cell():
    g = torch.Generator().manual_seed(0)
    searcher = ReinforceSearch(SPACE, g)
    for _ in range(40):
        configs = searcher.propose(4)
        searcher.observe(configs, [synthetic(c)["score"] for c in configs])
    probs = searcher.probabilities()
    assert max(range(7), key=lambda i: probs["inner_lr"][i]) in (3, 4, 5)  # the grid point 0.1 or a neighbour
    assert max(range(5), key=lambda i: probs["inner_steps"][i]) == 2  # 3 steps
    assert probs["inner_steps"][2] > 0.5


def test_a_search_is_reproducible_from_its_seed_and_does_not_rerun_repeats():
    calls = []
    objective = lambda c: calls.append(c) or synthetic(c)
    small = Space((0.01, 0.1), (1, 2), (4,), lr_points=2)
    start = {"inner_lr": 0.01, "inner_steps": 1, "meta_batch": 4}
    runs = [search(objective, small, 12, "reinforce", torch.Generator().manual_seed(3), start)
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(calls) <= 2 * 4  # four distinct cells, whatever was proposed
    assert sum(not t["cached"] for t in runs[0]) == len(calls) // 2


def test_diverged_trials_rank_below_finished_ones():
    objective = lambda c: {"score": float("-inf")} if c["inner_lr"] > 0.05 else synthetic(c)
    trials = search(objective, SPACE, 16, "es", torch.Generator().manual_seed(0), START)
    assert math.isfinite(best_trial(trials)["score"])


def test_space_round_trips_through_the_unit_cube():
    for config in ({"inner_lr": 1e-3, "inner_steps": 1, "meta_batch": 4},
                   {"inner_lr": 1.0, "inner_steps": 5, "meta_batch": 32}, {"inner_lr": 0.1, "inner_steps": 3, "meta_batch": 8}):
        back = SPACE.from_unit(SPACE.to_unit(config))
        assert back["inner_steps"] == config["inner_steps"] and back["meta_batch"] == config["meta_batch"]
        assert back["inner_lr"] == pytest.approx(config["inner_lr"])
    assert trial_iterations(300, 16, 32) == 150 and trial_iterations(300, 16, 4) == 1200


FAST = ["--benchmark", "sinusoid", "--iterations", "2", "--val-tasks", "4", "--steps", "1,2", "--meta-batches", "2,4",
        "--max-eval-steps", "2", "--quiet"]


def test_tune_writes_the_best_configuration_a_trace_and_every_trial(tmp_path, capsys, monkeypatch):
    drawn = []
    original = benchmarks.Benchmark.episodes

    def spy(self, split, *args, **kwargs):
        drawn.append(split)
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(benchmarks.Benchmark, "episodes", spy)
    out = tmp_path / "tune"
    assert main(["tune", "maml", *FAST, "--budget", "3", "--method", "es", "--out", str(out)]) == 0
    assert "test" not in drawn and "val" in drawn and "train" in drawn  # validation tasks only, never test
    best = json.loads((out / "best.json").read_text())
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3 and trials[0]["proposer"] == "default"
    assert best["val"] == min(t["val"] for t in trials)  # mse: lower is better
    assert best["default_val"] == trials[0]["val"] and best["method"] == "es"
    assert set(best["best"]) == {"inner_lr", "inner_steps", "meta_batch", "eval_steps"}
    assert best["best"]["eval_steps"] <= 2 and best["command"].startswith("metaphi run maml --benchmark sinusoid")
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert "metaphi run maml" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["tune", "maml", "--benchmark", "sinusoid", "--budget", "0"], "--budget must be a positive number"),
    (["tune", "scratch", "--benchmark", "sinusoid"], "nothing to meta-train"),
    (["tune", "maml", "--benchmark", "sinusoid", "--steps", "1,x"], "steps must be a comma list of integers"),
    (["tune", "maml", "--benchmark", "sinusoid", "--lr-range", "0.1", "0.01"], "--lr-range must be"),
    (["tune", "maml", "--benchmark", "sinusoid", "--estimator", "reptile"], "does not apply to maml"),
    (["tune", "maml", "--benchmark", "sinusoid", "--solver", "cg"], "--solver applies to the implicit estimator, not "
                                                                    "second-order"),
    (["tune", "maml", "--benchmark", "sinusoid", "--round", "0"], "--round must be a positive number"),
])
def test_bad_tune_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_tune_writes_its_config_and_reruns_from_it(tmp_path, capsys):
    """config.yaml holds the resolved search (space, estimator and its options); ``--config`` that file
    with another ``--out`` gives the same trials."""
    import yaml

    out, again = tmp_path / "tune", tmp_path / "again"
    assert main(["tune", "maml", *FAST, "--budget", "2", "--method", "random", "--loop", "--no-plot",
                 "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == [1, 2] and saved["meta_batches"] == [2, 4] and len(saved["lr_range"]) == 2
    assert saved["estimator"] == "second-order" and saved["estimator_options"]["loop"] is True
    assert main(["tune", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
    trials = lambda folder: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                             for line in (folder / "trials.jsonl").read_text().splitlines()]
    assert trials(again) == trials(out)
    assert json.loads((again / "best.json").read_text())["command"].endswith("--loop")
