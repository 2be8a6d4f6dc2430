"""``metaphi continual``: checkpoints that resume to the same result, the files it writes, bad input."""
import json

import pytest
import torch
from PIL import Image

from metaphi.cli import main
from metaphi.continual import build_method
from metaphi.continual import streams as st
from metaphi.continual.runner import run_stream
from metaphi.tasks.glyphs import generate_glyphs


@pytest.fixture(scope="module")
def stream():
    data = generate_glyphs(alphabets=2, characters=8, drawers=6, size=16)
    return st.class_incremental(data, experiences=3, classes_per_experience=2, train_per_class=4, test_per_class=2,
                                seed=1)


def _final_state(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=False)["state"]


@pytest.mark.parametrize("name,options", [("replay", {"memory": 5, "batch": 3}),
                                          ("lamaml", {"memory": 5, "batch": 3, "first_order": True}),
                                          ("ewc", {"batch": 4})])
def test_a_killed_run_resumes_to_the_same_result(tmp_path, stream, name, options):
    options = {**options, "epochs": 2, **({"alpha": 0.3} if name == "lamaml" else {"lr": 0.3})}
    run = lambda seed, folder=None, **kw: run_stream(build_method(name, **options), stream, seed=seed,
                                                     folder=folder and str(tmp_path / folder), hidden=4, blocks=2, **kw)
    whole = run(2, "whole")
    part = run(2, "killed", stop_after=1)
    assert not part["finished"] and len(part["R"]) == 1
    resumed = run(2, "killed")
    assert resumed["finished"] and resumed["R"] == whole["R"] and resumed["initial"] == whole["initial"]
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "killed")
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])  # bit for bit
    if "memory" in a:
        assert torch.equal(a["memory"]["y"], b["memory"]["y"]) and a["memory"]["seen"] == b["memory"]["seen"]
    again = run(2, "killed")
    assert again.get("reused") and again["R"] == whole["R"]
    # another seed is another run (initial weights, the memory's draws)
    run(3, "other")
    c = _final_state(tmp_path / "other")
    assert not torch.equal(a["params"]["head.weight"], c["params"]["head.weight"])


def _folder_stream(root):
    g = torch.Generator().manual_seed(0)
    for exp, classes in (("01", ("a", "b")), ("02", ("c", "d")), ("03", ("e", "f"))):
        for c in classes:
            (root / exp / c).mkdir(parents=True)
            base = (torch.rand(16, 16, generator=g) > 0.7).float() * 255  # a class is a noisy fixed pattern
            for k in range(6):
                noisy = (base + torch.randn(16, 16, generator=g) * 20).clamp(0, 255).to(torch.uint8)
                Image.fromarray(noisy.numpy(), "L").save(root / exp / c / f"{k}.png")
    return root


def test_cli_on_a_folder_sequence_writes_table_json_and_plot(tmp_path, capsys):
    root = _folder_stream(tmp_path / "seq")
    out = tmp_path / "out"
    argv = ["continual", "--stream", f"folder:{root}", "--method", "finetune,ewc,replay,lamaml", "--init", "scratch",
            "--seeds", "0,1", "--test-per-class", "2", "--image-size", "16", "--hidden", "4", "--blocks", "2",
            "--batch", "4", "--lr", "0.1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| finetune (scratch) |" in table and "| lamaml (scratch) |" in table
    summary = json.loads((out / "results.json").read_text())
    entry = summary["streams"][f"folder:{root}"]
    assert entry["stream"]["kind"] == "class-incremental" and entry["stream"]["experiences"] == 3
    assert set(entry["table"]) == {"finetune", "ewc", "replay", "lamaml"}
    runs = [r for r in summary["runs"] if r["method"] == "finetune"]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert all(len(r["R"]) == 3 and len(r["accuracy_over_time"]) == 3 for r in runs)
    assert entry["table"]["finetune"]["seeds"] == [0, 1]
    assert (out / "results.md").read_text().startswith(f"**folder:{root}**")
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # run again: every run is reused from its result file
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["runs"][0]["R"] == summary["runs"][0]["R"]


def test_cli_glyphs_with_meta_learners(tmp_path):
    out = tmp_path / "out"
    argv = ["continual", "--stream", "glyphs", "--method", "oml,pretrain,finetune", "--seeds", "0",
            "--experiences", "2", "--classes-per-experience", "2", "--meta-iterations", "2", "--meta-batch", "1",
            "--hidden", "4", "--blocks", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["streams"]["glyphs"]["table"]) == {"oml", "pretrain", "finetune"}
    # meta-training runs are kept, one per method and seed; finetune starts from pretrain's body (--init)
    assert sorted(p.name.split("-")[0] for p in (out / "meta").iterdir()) == ["oml", "pretrain"]


@pytest.mark.parametrize("argv,message", [
    (["--method", "sgd"], "unknown method 'sgd'"),
    (["--seeds", "a"], "comma list of integers"),
    (["--angles", "0,x"], "comma list of numbers"),
    (["--stream", "nope"], "unknown stream 'nope'"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    try:
        code = main(["continual", "--out", str(tmp_path), "--quiet", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_meta_learners_need_meta_training_classes(tmp_path, capsys):
    root = _folder_stream(tmp_path / "seq")
    assert main(["continual", "--stream", f"folder:{root}", "--method", "oml", "--test-per-class", "2",
                 "--image-size", "16", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no meta-training classes" in capsys.readouterr().err
