"""metaphi augment: a tiny run end to end, resumption, the result file, bad input, and the Omniglot
minimal split when its archive is present."""
import json
import os

import pytest

from metaphi.cli import main
import shared_data

TINY = ["--seeds", "0,1", "--search-steps", "3", "--train-steps", "4", "--hidden", "4", "--batch", "16",
        "--val-batch", "20", "--samples", "2", "--quiet"]


def test_augment_runs_resumes_and_writes_results(tmp_path):
    out = str(tmp_path / "run")
    assert main(["augment", "--methods", "none,random,gradient,reinforce", "--out", out, *TINY]) == 0
    result = json.load(open(os.path.join(out, "result.json")))
    assert {(r["seed"], r["method"]) for r in result["rows"]} == {(s, m) for s in (0, 1)
                                                                 for m in ("none", "random", "gradient", "reinforce")}
    for r in result["rows"]:
        assert 0 <= r["test_acc"] <= 1 and r["test_images"] == 1797 - 200
        if r["method"] == "none":
            assert all(v["prob"] == 0 for v in r["policy"].values())
    summary = {e["method"]: e for e in result["summary"]}
    # the paired difference is the mean of per-seed differences
    rows = {(r["seed"], r["method"]): r["test_acc"] for r in result["rows"]}
    diff = sum(rows[(s, "gradient")] - rows[(s, "none")] for s in (0, 1)) / 2
    assert summary["gradient"]["diff_vs_none"] == pytest.approx(diff)
    assert "diff_vs_start" not in summary["gradient"]  # no start runs asked for
    assert os.path.exists(os.path.join(out, "search-0-gradient.pt"))
    assert "| gradient |" in open(os.path.join(out, "result.md")).read()
    # a rerun with the same settings finds every run done and reproduces the file's rows
    assert main(["augment", "--methods", "none,random,gradient,reinforce", "--out", out, *TINY]) == 0
    again = json.load(open(os.path.join(out, "result.json")))
    assert again["rows"] == result["rows"]
    # more methods in the same folder reuse the finished runs; other settings are a clear error
    assert main(["augment", "--methods", "none,start,gradient", "--out", out, *TINY]) == 0
    more = json.load(open(os.path.join(out, "result.json")))["rows"]
    assert [r for r in more if r["method"] != "start"] == [r for r in result["rows"] if r["method"] in
                                                           ("none", "gradient")]
    start = [r["policy"] for r in more if r["method"] == "start"]
    assert len(start) == 2 and all(v == {"prob": 0.2, "magnitude": 0.3} for v in start[0].values())
    assert main(["augment", "--methods", "none", "--out", out, *TINY[:-1], "--train-steps", "5", "--quiet"]) == 2


def test_runs_are_deterministic_per_seed(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["augment", "--methods", "random,gradient", *TINY]
    assert main([*args, "--out", a]) == 0 and main([*args, "--out", b]) == 0
    ra, rb = (json.load(open(os.path.join(d, "result.json")))["rows"] for d in (a, b))
    assert [(r["test_acc"], r["policy"]) for r in ra] == [(r["test_acc"], r["policy"]) for r in rb]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "none,autoaugment"], "--methods"),
    (["--train-per-class", "100", "--val-per-class", "100"], "fewer"),
    (["--search-steps", "0"], "--search-steps"),
    (["--init-prob", "1"], "--init-prob"),
    (["--lr", "-1"], "--lr"),
    (["--methods", "reinforce", "--init-magnitude", "0.1"], "--init-magnitude"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["augment", "--out", str(tmp_path / "x"), *TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["augment", "--out", str(blocker / "sub"), *TINY]) == 2


OMNIGLOT = str(shared_data.OMNIGLOT)


@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "images_background_small1.zip")),
                    reason=f"Omniglot minimal archive images_background_small1.zip not under {OMNIGLOT}")
def test_omniglot_small1_as_many_class_problem(tmp_path):
    out = str(tmp_path / "omni")
    assert main(["augment", "omniglot", "--data-root", OMNIGLOT, "--classes", "5", "--train-per-class", "3",
                 "--val-per-class", "3", "--methods", "none,gradient", "--out", out, *TINY]) == 0
    rows = json.load(open(os.path.join(out, "result.json")))["rows"]
    assert len(rows) == 4 and all(r["test_images"] == 5 * (20 - 6) for r in rows)


def test_config_file_round_trip_and_flags_override_it(tmp_path, capsys):
    import yaml

    first, again, other = (str(tmp_path / name) for name in ("first", "again", "other"))
    assert main(["augment", "--methods", "none,gradient", "--out", first, *TINY]) == 0
    written = yaml.safe_load(open(os.path.join(first, "config.yaml")))
    assert written["methods"] == ["none", "gradient"] and written["seeds"] == [0, 1] and written["search_steps"] == 3
    # the run's config.yaml with another --out is the same run
    assert main(["augment", "--config", os.path.join(first, "config.yaml"), "--out", again]) == 0
    rows = [json.load(open(os.path.join(d, "result.json")))["rows"] for d in (first, again)]
    assert [(r["seed"], r["method"], r["test_acc"], r["policy"]) for r in rows[0]] == \
        [(r["seed"], r["method"], r["test_acc"], r["policy"]) for r in rows[1]]
    assert yaml.safe_load(open(os.path.join(again, "config.yaml"))) == {**written, "out": again}
    # a flag on the command line wins over the file
    assert main(["augment", "--config", os.path.join(first, "config.yaml"), "--seeds", "1", "--out", other]) == 0
    assert yaml.safe_load(open(os.path.join(other, "config.yaml")))["seeds"] == [1]
    assert {r["seed"] for r in json.load(open(os.path.join(other, "result.json")))["rows"]} == {1}
    # an unknown option in a file is refused, by name
    bad = tmp_path / "bad.yaml"
    bad.write_text("search_steps: 3\nsearch_step: 4\n")
    capsys.readouterr()
    assert main(["augment", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "search_step" in err and len(err.splitlines()) == 1
