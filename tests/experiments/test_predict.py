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

CLASSES = 15


def pattern(c: int, i: int, size: int = 28) -> np.ndarray:
    """Class c: a bar at an angle of its own; drawing i: a small shift. Dark ink on white paper."""
    rng = np.random.default_rng(1000 * c + i)
    img = np.full((size, size), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size] - size / 2
    angle = np.pi * c / CLASSES
    dist = np.abs(np.cos(angle) * (yy - rng.integers(-2, 3)) - np.sin(angle) * (xx - rng.integers(-2, 3)))
    img[dist < 2.5] = 0
    return img


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
    ck = train_checkpoint(data, "protonet", tmp_path / "run", "--val-every", "1")
    run = ck.parent
    assert (run / "best.pt").exists()
    # another run's φ as this run's best, so the two files label differently
    other = train_checkpoint(data, "protonet", tmp_path / "other", "--seed", "5")
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
