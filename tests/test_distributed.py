"""Meta-training on several processes: two gloo ranks on the CPU against one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from metaphi import distributed
from metaphi.cli import main
from metaphi.tasks import Task
from metaphi.train import load_checkpoint


def test_shards_cover_the_meta_batch_in_order():
    assert distributed.shard_sizes(5, 2) == [3, 2]
    assert distributed.shard_sizes(8, 3) == [3, 3, 2]
    x = torch.arange(5.0).view(5, 1)
    tasks = Task((x, x), (x, x))
    parts = [distributed.shard(tasks, r, 2) for r in range(2)]
    assert [p.support[0].flatten().tolist() for p in parts] == [[0.0, 1.0, 2.0], [3.0, 4.0]]


def test_without_a_process_group_nothing_is_reduced():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    grads = {"w": torch.ones(3)}
    out, metrics = distributed.all_reduce_mean(grads, {"loss": 2.0}, 1, 1)
    assert torch.equal(out["w"], grads["w"]) and metrics == {"loss": 2.0}
    assert distributed.init_from_env("cpu") == "cpu"


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "no-such-checkpoint.pt"]) == 2
    assert "only 'metaphi run'" in capsys.readouterr().err


RUN = ["run", "maml", "--benchmark", "sinusoid", "--iterations", "3", "--meta-batch", "5", "--eval-tasks", "20",
       "--val-every", "2", "--val-tasks", "5", "--no-baselines", "--quiet", "--seed", "3"]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    """torchrun with 2 ranks and a meta-batch of 5 (3 + 2 tasks) takes the steps of one process with 5."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "metaphi", *RUN, "--out", str(two)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*RUN, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)

    a, b = load_checkpoint(str(one / "checkpoint.pt")), load_checkpoint(str(two / "checkpoint.pt"))
    assert a["iteration"] == b["iteration"] == 3
    for k in a["phi"]:
        torch.testing.assert_close(b["phi"][k], a["phi"][k], rtol=1e-5, atol=1e-6)
    log_one = [json.loads(line) for line in open(one / "metrics.jsonl")]
    log_two = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert [r["iteration"] for r in log_two] == [1, 2, 3]
    for r1, r2 in zip(log_one, log_two):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert ("val" in r2) == ("val" in r1)
    result = json.loads((two / "result.json").read_text())
    assert result["processes"] == 2
    assert result["mean"] == pytest.approx(json.loads((one / "result.json").read_text())["mean"], rel=1e-4)
    # rank 0 alone writes: no stray temporary files from a second writer
    assert sorted(p.name for p in two.iterdir() if p.name != ".lock") == ["best.pt", "checkpoint.pt", "config.yaml", "metrics.jsonl", "result.json"]
