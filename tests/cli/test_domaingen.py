"""``metaphi domaingen``: every held-out domain, reuse and resume, bad input, the config file."""
import json

import pytest

from metaphi import checkpoint
from metaphi.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_domaingen_command_runs_every_held_out_domain_and_resumes(tmp_path, capsys):
    out = tmp_path / "dg"
    argv = ["domaingen", "glyph-styles", "--domains", "plain,inverted,bold", "--classes", "3", "--iterations", "2",
            "--seeds", "0,1", "--methods", "erm,mldg-fo", "--batch", "3", "--hidden", "8", "--blocks", "2",
            "--test-per-class", "2", "--adapt-per-class", "2", "--adapt-shots", "1,2", "--adapt-steps", "2",
            "--adapt-draws", "2", "--checkpoint-every", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| erm |" in table and "| mldg-fo |" in table and "average" in table
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["runs"]) == 2 * 3 * 2
    assert {r["run"]["held_out"] for r in summary["runs"]} == {"plain", "inverted", "bold"}
    avg = summary["table"]["erm"]["dg"]["average"]
    per_seed = [sum(r["accuracy"] for r in summary["runs"] if r["run"]["seed"] == s and r["run"]["method"] == "erm") / 3
                for s in (0, 1)]
    assert avg["mean"] == pytest.approx(sum(per_seed) / 2)
    assert set(summary["table"]["mldg-fo"]) >= {"dg", "adapt1", "adapt2"}
    assert (out / "results.md").exists()
    # a second identical command reuses every finished run
    before = (out / "results.json").read_text()
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in json.loads(before)["runs"]]
    # an unfinished run resumes from its checkpoint to the same result
    folder = out / "glyph-styles" / "erm" / "held-plain" / "seed-0"
    first = json.loads((folder / "result.json").read_text())
    (folder / "result.json").unlink()
    ck = checkpoint.load(folder / "checkpoint.pt")  # plain data: the weights-only reader takes it
    assert ck["iteration"] == 2
    assert main(argv) == 0
    assert json.loads((folder / "result.json").read_text())["accuracy"] == first["accuracy"]
    # other settings in the same folder are refused rather than overwritten
    (folder / "result.json").unlink()
    assert main([*argv[:-3], "--iterations", "3", "--out", str(out), "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_domaingen_rejects_bad_input(tmp_path, capsys):
    base = ["domaingen", "glyph-styles", "--out", str(tmp_path), "--quiet"]
    assert main([*base, "--methods", "erm,dann"]) == 2
    assert "dann" in capsys.readouterr().err
    assert main([*base, "--held-out", "watercolour", "--domains", "plain,bold", "--classes", "3"]) == 2
    assert "unknown domain" in capsys.readouterr().err
    assert main([*base, "--adapt-shots", "9"]) == 2
    assert main(["domaingen", "folder:/no/such/folder", "--out", str(tmp_path), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err


TINY = ["glyph-styles", "--domains", "plain,inverted,bold", "--classes", "3", "--iterations", "2", "--seeds", "0",
        "--methods", "erm,mldg", "--batch", "3", "--hidden", "8", "--blocks", "2", "--test-per-class", "2",
        "--adapt-per-class", "2", "--adapt-shots", "1", "--adapt-steps", "2", "--adapt-draws", "2",
        "--held-out", "bold", "--beta", "0.5", "--quiet"]


def test_domaingen_config_file_reproduces_the_run_and_flags_override_it(tmp_path):
    import yaml

    assert main(["domaingen", *TINY, "--out", str(tmp_path / "a")]) == 0
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["data"] == "glyph-styles" and saved["methods"] == ["erm", "mldg"] and saved["beta"] == 0.5
    assert saved["domains"] == ["plain", "inverted", "bold"] and saved["adapt_shots"] == [1]
    assert main(["domaingen", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")]) == 0
    first, again = (json.loads((tmp_path / f / "results.json").read_text()) for f in ("a", "b"))
    assert not any(r.get("reused") for r in again["runs"])  # trained again, in the new folder
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in first["runs"]]
    assert again["table"]["mldg"]["dg"]["average"]["mean"] == first["table"]["mldg"]["dg"]["average"]["mean"]
    # a flag given on the command line wins over the file
    assert main(["domaingen", "--config", str(tmp_path / "a" / "config.yaml"), "--methods", "erm",
                 "--beta", "1", "--out", str(tmp_path / "c")]) == 0
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["methods"] == ["erm"]


@pytest.mark.parametrize("argv,message", [
    (["--methods", "erm", "--beta", "0.5"], "--beta applies to mldg"),
    (["--methods", "erm", "--inner-lr", "0.5"], "--inner-lr applies to mldg"),
    (["--meta-lr", "0"], "--meta-lr must be positive"),
    (["--seeds", "0,x"], "comma list of integers"),
])
def test_domaingen_refuses_options_that_do_not_apply(tmp_path, capsys, argv, message):
    assert main(["domaingen", "glyph-styles", "--out", str(tmp_path), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_domaingen_config_file_with_an_unknown_option_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: glyph-styles\nlearning_rate: 0.1\n")
    assert main(["domaingen", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path), "--quiet"]) == 2
    assert "learning_rate" in capsys.readouterr().err
