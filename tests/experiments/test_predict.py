"""`metaphi predict` on checkpoints of every algorithm, with images of any size and mode."""
import csv
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from metaphi.algorithms import ALGORITHMS
from metaphi.cli import main
from tiny import bar_drawing

CLASSES = 15


def pattern(c: int, i: int, size: int = 28) -> np.ndarray:
    return bar_drawing(c, i, CLASSES, size)


def save(img: np.ndarray, path, mode: str = "L", size: int = 28):
    pil = Image.fromarray(img).resize((size, size))
    if mode == "RGB":
        pil = pil.convert("RGB")
    elif mode == "RGBA":
        pil = pil.convert("RGBA")
    elif mode == "P":
        pil = pil.convert("P")
    pil.save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    train = root / "train"
    for c in range(CLASSES):
        (train / f"class{c:02d}").mkdir(parents=True)
        for i in range(4):
            save(pattern(c, i), train / f"class{c:02d}" / f"{i}.png")
    support, query = root / "support", root / "query"
    query.mkdir()
    modes = ["L", "RGB", "RGBA", "P"]
    for c, name in enumerate(["ring", "bar", "slash"]):
        (support / name).mkdir(parents=True)
        save(pattern(c * 5, 0), support / name / "a.png", modes[c], size=64)
        # the query holds other drawings of the same characters, as jpg and png of other sizes and modes
        ext = "jpg" if c == 1 else "png"
        save(pattern(c * 5, 1), query / f"{name}.{ext}", "RGB" if ext == "jpg" else modes[(c + 1) % 4], size=40)
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "metaphi", *args], capture_output=True, text=True, timeout=600)


def train_checkpoint(data, name, out, *extra):
    args = ["run", name, "--benchmark", f"folder:{data / 'train'}", "--image-size", "28", "--channels", "1",
            "--invert", "--ways", "3", "--shots", "1", "--query", "1", "--iterations", "2", "--meta-batch", "2",
            "--eval-tasks", "2", "--val-tasks", "1", "--no-baselines", "--quiet", "--out", str(out), *extra]
    assert main(args) == 0
    return out / "checkpoint.pt"


def rows(text: str):
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_predict_works_for_every_algorithm(data, tmp_path, name, capsys):
    ck = train_checkpoint(data, name, tmp_path / "run")
    capsys.readouterr()
    out = tmp_path / "labels.csv"
    assert main(["predict", "--checkpoint", str(ck), "--support", str(data / "support"), "--query",
                 str(data / "query"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    table = rows(printed)
    assert [r["file"] for r in table] == ["bar.jpg", "ring.png", "slash.png"]
    for r in table:
        assert r["prediction"] in {"ring", "bar", "slash"}
        assert 1 / 3 - 1e-6 <= float(r["confidence"]) <= 1.0


def test_fine_tuning_labels_the_query_correctly(data, tmp_path, capsys):
    ck = train_checkpoint(data, "scratch", tmp_path / "run", "--inner-lr", "0.5")
    capsys.readouterr()
    query = tmp_path / "q"
    query.mkdir()
    for c, name in enumerate(["ring", "bar", "slash"]):
        save(pattern(c * 5, 0), query / f"{name}.png", "RGB", size=28)
    assert main(["predict", "--checkpoint", str(ck), "--support", str(data / "support"), "--query", str(query),
                 "--inner-steps", "40"]) == 0
    table = rows(capsys.readouterr().out)
    assert {r["file"]: r["prediction"] for r in table} == {"ring.png": "ring", "bar.png": "bar", "slash.png": "slash"}


def test_predict_errors_are_one_line_with_exit_2(data, tmp_path):
    ck = train_checkpoint(data, "maml", tmp_path / "run")
    empty = tmp_path / "support-empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    save(pattern(0, 0), empty / "a" / "x.png")
    bad_query = tmp_path / "badq"
    bad_query.mkdir()
    (bad_query / "broken.png").write_bytes(b"not an image at all")
    many = tmp_path / "many"
    for c in range(6):
        (many / f"c{c}").mkdir(parents=True)
        save(pattern(c, 0), many / f"c{c}" / "x.png")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "no checkpoint at"),
        (["--support", str(empty)], "empty class folder"),
        (["--query", str(bad_query)], "broken.png"),
        (["--query", str(tmp_path / "nope")], "not found"),
        (["--support", str(many)], "meta-trained for 3-way tasks"),
    ]
    for override, message in cases:
        args = {"--checkpoint": str(ck), "--support": str(data / "support"), "--query": str(data / "query")}
        args.update(dict(zip(override[::2], override[1::2])))
        proc = run_cli("predict", *[x for kv in args.items() for x in kv])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (override, proc.stderr)


def test_predict_refuses_a_regression_checkpoint(tmp_path):
    assert main(["run", "maml", "--benchmark", "sinusoid", "--iterations", "1", "--meta-batch", "2",
                 "--eval-tasks", "2", "--val-tasks", "1", "--no-baselines", "--quiet", "--out", str(tmp_path)]) == 0
    proc = run_cli("predict", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--support", str(tmp_path),
                   "--query", str(tmp_path))
    assert proc.returncode == 2 and "not on images" in proc.stderr


def test_predict_takes_a_config_file(data, tmp_path, capsys):
    ck = train_checkpoint(data, "scratch", tmp_path / "run", "--inner-lr", "0.5")
    config = tmp_path / "predict.yaml"
    config.write_text(f"checkpoint: {ck}\nsupport: {data / 'support'}\nquery: {data / 'query'}\ninner_steps: 5\n")
    capsys.readouterr()
    assert main(["predict", "--config", str(config), "--out", str(tmp_path / "labels.csv")]) == 0
    assert [r["file"] for r in rows(capsys.readouterr().out)] == ["bar.jpg", "ring.png", "slash.png"]
    assert (tmp_path / "labels.csv").exists()  # the flag beside the file
    assert main(["predict", "--support", str(data / "support")]) == 2
    assert "give --checkpoint, --query" in capsys.readouterr().err


def test_predict_on_a_run_folder_takes_best_pt_and_last_takes_checkpoint_pt(data, tmp_path, capsys):
    # stride pooling: ProtoNet's max-pooling recipe is sure of every label after 2 iterations, and the
    # confidences below are what tells the two φ apart
    ck = train_checkpoint(data, "protonet", tmp_path / "run", "--val-every", "1", "--pool", "stride")
    run = ck.parent
    assert (run / "best.pt").exists()
    # another run's φ as this run's best, so the two files label differently
    other = train_checkpoint(data, "protonet", tmp_path / "other", "--seed", "5", "--pool", "stride")
    (run / "best.pt").write_bytes(other.read_bytes())
    capsys.readouterr()

    def labels(*args):
        assert main(["predict", *args, "--support", str(data / "support"), "--query", str(data / "query")]) == 0
        captured = capsys.readouterr()
        return captured.out, captured.err

    by_best, by_last = labels("--checkpoint", str(other)), labels("--checkpoint", str(ck), "--last")
    assert by_best[0] != by_last[0]  # the confidences tell the two φ apart
    for args, expected, name in ((["--checkpoint", str(run)], by_best, "best.pt"),
                                 (["--checkpoint", str(ck)], by_best, "best.pt"),
                                 (["--checkpoint", str(run), "--last"], by_last, "checkpoint.pt")):
        out, err = labels(*args)
        assert out == expected[0] and f"labelled with {run / name}" in err, (args, err)
    renamed = tmp_path / "model.pt"  # a file of another name is itself; --last does not apply to it
    renamed.write_bytes(ck.read_bytes())
    assert labels("--checkpoint", str(renamed))[0] == by_last[0]
    assert main(["predict", "--checkpoint", str(renamed), "--last", "--support", str(data / "support"), "--query",
                 str(data / "query")]) == 2
    assert "--last: " in capsys.readouterr().err


# -- test-time augmentation and fine-tuning (issue 18) ---------------------------------------------------

def _loaded(data, tmp_path, name="protonet"):
    from metaphi.experiments.predict import load_for_prediction
    from metaphi.tasks.folder import load_folder, load_query_images

    ck_path = train_checkpoint(data, name, tmp_path / "run")
    ck, algorithm, spec = load_for_prediction(str(ck_path))
    support = load_folder(data / "support", channels=1, image_size=28, invert=True, cache_dir=False)
    _, query = load_query_images(data / "query", 1, 28, 28, invert=True)
    xs, ys, xq = support.images.float().div(255), support.targets, query.float().div(255)
    return ck_path, ck, algorithm, (xs, ys), xq


def test_tta_and_finetune_off_give_exactly_todays_predictions(data, tmp_path, capsys):
    import torch

    from metaphi.experiments.predict import class_probabilities

    ck_path, ck, algorithm, support, xq = _loaded(data, tmp_path)
    before = {k: v.clone() for k, v in ck["phi"].items()}
    today = torch.softmax(algorithm.predict(ck["phi"], support, xq, None)[:, :3].double(), dim=-1)
    assert torch.equal(class_probabilities(algorithm, ck["phi"], support, xq, 3), today)
    assert torch.equal(class_probabilities(algorithm, ck["phi"], support, xq, 3, tta=0, finetune_steps=0), today)
    class_probabilities(algorithm, ck["phi"], support, xq, 3, tta=3, finetune_steps=3)
    assert all(torch.equal(before[k], v) for k, v in ck["phi"].items())  # the checkpoint's φ is never changed
    args = ["predict", "--checkpoint", str(ck_path), "--support", str(data / "support"), "--query", str(data / "query")]
    capsys.readouterr()
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--tta", "0", "--finetune-steps", "0"]) == 0
    assert capsys.readouterr().out == plain


def test_tta_is_deterministic_for_a_seed_and_changes_the_probabilities(data, tmp_path, capsys):
    import torch

    from metaphi.experiments.predict import class_probabilities

    ck_path, ck, algorithm, support, xq = _loaded(data, tmp_path)
    plain = class_probabilities(algorithm, ck["phi"], support, xq, 3)
    a = class_probabilities(algorithm, ck["phi"], support, xq, 3, tta=4, seed=7, invert=True)
    b = class_probabilities(algorithm, ck["phi"], support, xq, 3, tta=4, seed=7, invert=True)
    c = class_probabilities(algorithm, ck["phi"], support, xq, 3, tta=4, seed=8, invert=True)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, plain)
    assert torch.allclose(a.sum(-1), torch.ones(len(xq), dtype=torch.float64))
    assert torch.equal(class_probabilities(algorithm, ck["phi"], support, xq, 3, tta=1), plain)  # the image alone
    args = ["predict", "--checkpoint", str(ck_path), "--support", str(data / "support"), "--query",
            str(data / "query"), "--tta", "4", "--seed", "7"]
    capsys.readouterr()
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_prototype_head_reproduces_protonet_logits_before_fine_tuning(data, tmp_path):
    import torch

    from metaphi.experiments.predict import finetuned_scorer

    _, ck, algorithm, support, xq = _loaded(data, tmp_path)
    phi = {k: v.double() for k, v in ck["phi"].items()}
    support = (support[0].double(), support[1])
    xq = xq.double()
    proto = algorithm.predict(phi, support, xq, None)
    head = finetuned_scorer(algorithm, phi, support, xq, 0, 1e-3)(xq)
    assert torch.equal(head.argmax(-1), proto.argmax(-1))
    # the two differ by ‖f(x)‖², one constant per row: equal softmax
    diff = head - proto
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-8)
    assert torch.allclose(torch.softmax(head, -1), torch.softmax(proto, -1), atol=1e-10)


def test_fine_tuning_on_a_separable_support_set_does_not_hurt_support_accuracy():
    import torch
    from torch import nn

    from metaphi.algorithms.protonet import ProtoNet
    from metaphi.experiments.predict import finetuned_scorer

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 4)
            self.head = nn.Linear(4, 3)

        def features(self, x):
            return torch.tanh(self.body(x))

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        algorithm = ProtoNet(Body())
    phi = algorithm.init_meta_params()
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    ys = torch.arange(3).repeat_interleave(5)
    xs = centres[ys] + 0.3 * torch.randn(15, 2, generator=g)
    xq = centres[torch.arange(3)] + 0.3 * torch.randn(3, 2, generator=g)
    start = finetuned_scorer(algorithm, phi, (xs, ys), xq, 0, 1e-2)(xs)
    tuned = finetuned_scorer(algorithm, phi, (xs, ys), xq, 50, 1e-2)(xs)
    accuracy = lambda logits: (logits.argmax(-1) == ys).float().mean()
    loss = lambda logits: torch.nn.functional.cross_entropy(logits, ys)
    assert accuracy(tuned) >= accuracy(start) and accuracy(tuned) == 1.0
    assert loss(tuned) < loss(start)
    assert all(torch.equal(v, algorithm.init_meta_params()[k]) for k, v in phi.items())  # φ untouched


def test_fine_tuning_refusals_exit_2_with_one_line(data, tmp_path):
    for name, message in (("maml", "set how many with --inner-steps"), ("matching", "applies to protonet")):
        ck = train_checkpoint(data, name, tmp_path / name)
        proc = run_cli("predict", "--checkpoint", str(ck), "--support", str(data / "support"), "--query",
                       str(data / "query"), "--finetune-steps", "3")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    proc = run_cli("predict", "--checkpoint", str(ck), "--support", str(data / "support"), "--query",
                   str(data / "query"), "--tta", "-1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--tta" in proc.stderr


def test_fine_tuned_protonet_labels_through_the_cli(data, tmp_path, capsys):
    ck = train_checkpoint(data, "protonet", tmp_path / "run")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(ck), "--support", str(data / "support"), "--query",
                 str(data / "query"), "--finetune-steps", "5", "--finetune-lr", "0.01", "--tta", "2"]) == 0
    table = rows(capsys.readouterr().out)
    assert [r["file"] for r in table] == ["bar.jpg", "ring.png", "slash.png"]
    assert all(r["prediction"] in {"ring", "bar", "slash"} for r in table)


# -- ensembles of checkpoints (--checkpoint A,B,...) ------------------------------------------------------

def _support_and_query(data):
    from metaphi.tasks.folder import load_folder, load_query_images

    support = load_folder(data / "support", channels=1, image_size=28, invert=True, cache_dir=False)
    _, query = load_query_images(data / "query", 1, 28, 28, invert=True)
    return (support.images.float().div(255), support.targets), query.float().div(255)


def test_an_ensemble_labels_by_its_members_geometric_mean_probabilities(data, tmp_path, capsys):
    import torch

    from metaphi.experiments.predict import class_probabilities, load_for_prediction
    from metaphi.train import choose_checkpoint

    # stride pooling: max pooling is sure of every label after 2 iterations, and the confidences are what
    # tells the members and their ensemble apart
    a = train_checkpoint(data, "protonet", tmp_path / "a", "--pool", "stride")
    b = train_checkpoint(data, "protonet", tmp_path / "b", "--pool", "stride", "--seed", "5")
    support, xq = _support_and_query(data)
    # independently: each member's probabilities, their geometric mean, normalized
    each = []
    chosen = [choose_checkpoint(str(path)) for path in (a, b)]  # each run's best.pt, as predict takes it
    for path in chosen:
        ck, algorithm, _ = load_for_prediction(path)
        each.append(class_probabilities(algorithm, ck["phi"], support, xq, 3))
    assert not torch.allclose(each[0], each[1], atol=1e-3)
    expected = (each[0] * each[1]).sqrt()
    expected = expected / expected.sum(-1, keepdim=True)
    capsys.readouterr()
    where = ["--support", str(data / "support"), "--query", str(data / "query")]
    assert main(["predict", "--checkpoint", f"{a},{b}", *where]) == 0
    captured = capsys.readouterr()
    table = rows(captured.out)
    # query files sorted by name, support classes too: class k of the probabilities is classes[k]
    classes = ["bar", "ring", "slash"]
    assert [r["file"] for r in table] == ["bar.jpg", "ring.png", "slash.png"]
    for r, p in zip(table, expected):
        assert r["prediction"] == classes[int(p.argmax())]
        assert abs(float(r["confidence"]) - float(p.max())) < 1e-4
    assert "an ensemble of 2" in captured.err and all(path in captured.err for path in chosen)
    # the same member twice labels as that member alone
    assert main(["predict", "--checkpoint", str(a), *where]) == 0
    alone = capsys.readouterr().out
    assert main(["predict", "--checkpoint", f"{a},{a}", *where]) == 0
    twice = capsys.readouterr().out
    assert twice == alone


def test_ensemble_probabilities_stay_finite_where_members_underflow():
    import torch

    from metaphi.experiments.predict import ensemble

    # two members each sure of another class, so sure that each one's probability of the other's class is 0
    logits = [torch.tensor([[0.0, -2000.0, -5.0]], dtype=torch.float64),
              torch.tensor([[-2000.0, 0.0, -5.0]], dtype=torch.float64)]
    assert torch.softmax(logits[0], -1)[0, 1] == 0
    p = ensemble([torch.log_softmax(x, -1) for x in logits])
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(1, dtype=torch.float64))
    assert int(p.argmax()) == 2  # the class neither rules out


def test_ensemble_members_must_read_images_alike(data, tmp_path):
    a = train_checkpoint(data, "protonet", tmp_path / "a")
    b = train_checkpoint(data, "protonet", tmp_path / "b", "--image-size", "20")
    proc = run_cli("predict", "--checkpoint", f"{a},{b}", "--support", str(data / "support"), "--query",
                   str(data / "query"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "must read images alike" in lines[0] and "height 20" in lines[0] and "height 28" in lines[0]
    proc = run_cli("predict", "--checkpoint", f"{a},{tmp_path / 'missing'}", "--support", str(data / "support"),
                   "--query", str(data / "query"))
    assert proc.returncode == 2 and "no checkpoint at" in proc.stderr
