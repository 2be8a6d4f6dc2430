"""``metaphi continual``: checkpoints that resume to the same result, the files it writes, bad input."""
import json

import pytest
import torch
from PIL import Image

from metaphi import checkpoint
from metaphi.cli import main
from metaphi.continual import build_method
from metaphi.tasks import streams as st
from metaphi.continual.runner import run_stream
from metaphi.tasks.glyphs import generate_glyphs


@pytest.fixture(scope="module")
def stream():
    data = generate_glyphs(alphabets=2, characters=8, drawers=6, size=16)
    return st.class_incremental(data, experiences=3, classes_per_experience=2, train_per_class=4, test_per_class=2,
                                seed=1)


def _final_state(folder):
    return checkpoint.load(folder / "checkpoint.pt")["state"]  # plain data: the weights-only reader takes it


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


def test_cli_config_file_reproduces_the_run_and_flags_override_it(tmp_path):
    import yaml

    root = _folder_stream(tmp_path / "seq")
    base = ["continual", "--stream", f"folder:{root}", "--method", "finetune,ewc", "--init", "scratch", "--seeds", "0",
            "--test-per-class", "2", "--image-size", "16", "--hidden", "4", "--blocks", "2", "--batch", "4",
            "--lr", "0.1", "--ewc-lambda", "3", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["method"] == ["finetune", "ewc"] and saved["init"] == "scratch"
    assert saved["method_options"] == {"finetune": {"lr": 0.1, "batch": 4, "epochs": 1},
                                       "ewc": {"lr": 0.1, "batch": 4, "epochs": 1, "lam": 3.0, "step": "proximal"}}
    assert main(["continual", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")]) == 0
    first, again = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("a", "b"))
    assert [r["R"] for r in again["runs"]] == [r["R"] for r in first["runs"]]
    # a flag on the command line wins over the file, for a method's option too
    assert main(["continual", "--config", str(tmp_path / "a" / "config.yaml"), "--ewc-lambda", "30",
                 "--out", str(tmp_path / "c")]) == 0
    changed = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["method_options"]
    assert changed["ewc"]["lam"] == 30.0 and changed["finetune"] == saved["method_options"]["finetune"]


def test_cli_init_pretrain_takes_pretrains_meta_training_options():
    from metaphi.cli import build_parser
    from metaphi.cli.continual import config_from_args

    args = build_parser().parse_args(["continual", "--method", "finetune", "--meta-iterations", "7"])
    config = config_from_args(args)
    assert set(config.method_options) == {"finetune", "pretrain"}
    assert config.method_options["pretrain"].meta_iterations == 7
    assert not hasattr(config.method_options["pretrain"], "online_lr")  # the body's options only


@pytest.mark.parametrize("argv,message", [
    (["--method", "finetune", "--memory", "5"], "--memory applies to replay, lamaml, which this run does not use"),
    (["--method", "finetune", "--init", "scratch", "--meta-iterations", "5"], "--meta-iterations applies to oml"),
    (["--method", "finetune", "--online-lr", "0.1"], "--online-lr applies to oml, pretrain"),
    (["--method", "replay", "--ewc-lambda", "5"], "--ewc-lambda applies to ewc"),
    (["--method", "lamaml", "--alpha", "-1"], "--alpha must be positive"),
])
def test_cli_refuses_a_method_option_the_run_does_not_use(tmp_path, capsys, argv, message):
    assert main(["continual", "--out", str(tmp_path), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_config_file_options_of_a_method_not_run_are_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("method: [finetune]\ninit: scratch\nmethod_options:\n  ewc: {lam: 3}\n")
    assert main(["continual", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path), "--quiet"]) == 2
    assert "ewc is not used by this run" in capsys.readouterr().err
