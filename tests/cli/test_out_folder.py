"""One run per --out: a second command on a held folder exits 2 naming the holder, a killed holder's
lock is no obstacle, leftover temporary files are removed, and --resume is checked against the
checkpoint it would continue."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from metaphi import lock
from metaphi.cli import main
from tiny import install_tiny

TINY_RUN = ["--benchmark", "tiny", "--eval-tasks", "2", "--quiet"]


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def hold_in_child(folder) -> subprocess.Popen:
    """A second process that claims ``folder`` and waits; returns once the claim is made."""
    code = textwrap.dedent(f"""
        import sys, time
        from metaphi import lock
        lock.command = "metaphi run (the holder)"
        lock.claim({str(folder)!r})
        print("held", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_run_on_a_held_folder_exits_2_naming_the_holder(tmp_path, capsys, monkeypatch):
    install_tiny(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    child = hold_in_child(out)
    try:
        assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"pid {child.pid}" in err and "metaphi run (the holder)" in err and err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the refused run
    finally:
        child.kill()
        child.wait()
    # killed with SIGKILL, the holder left its lock file but not its lock
    assert child.returncode == -signal.SIGKILL
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "1", "--out", str(out)]) == 0
    assert (out / "result.json").exists()


def test_the_folder_is_released_when_a_command_ends_and_leftover_temporaries_go(tmp_path, monkeypatch):
    install_tiny(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-abc123checkpoint.pt").write_bytes(b"half a file")  # a kill during an atomic write
    (out / "sub").mkdir()
    (out / "sub" / ".tmp-x.json").write_text("{")
    (out / "other").mkdir()
    (out / "other" / lock.LOCK).write_text("")  # a folder of its own: not ours to clean
    (out / "other" / ".tmp-y").write_text("")
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "1", "--out", str(out)]) == 0
    assert not (out / ".tmp-abc123checkpoint.pt").exists() and not (out / "sub" / ".tmp-x.json").exists()
    assert (out / "other" / ".tmp-y").exists()
    assert not lock._held  # released: the next command (here or in another process) may take it
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "2", "--out", str(out), "--resume"]) == 0


def test_resume_is_checked_against_the_checkpoint(tmp_path, capsys, monkeypatch):
    install_tiny(monkeypatch)
    out = tmp_path / "run"
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    for flags, difference in [(["--seed", "1"], "--seed 0 (this run: 1)"),
                              (["--meta-lr", "0.01"], "--meta-lr 0.001 (this run: 0.01)"),
                              (["--shots", "2"], "--shots 1 (this run: 2)"),
                              (["--rotations"], "--rotations False (this run: True)")]:
        assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "2", "--out", str(out), "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert difference in err and err.count("\n") == 1, err
    # more iterations is what resuming is for
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "2", "--out", str(out), "--resume"]) == 0


def test_resume_of_a_checkpoint_older_than_a_setting_takes_the_settings_old_meaning(tmp_path, monkeypatch, capsys):
    import torch

    from metaphi.train import ADDED_SETTINGS

    install_tiny(monkeypatch)
    out = tmp_path / "run"
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "1", "--out", str(out)]) == 0
    path = out / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    for key in ADDED_SETTINGS:  # as a checkpoint written before these records existed
        del ck["run"][key]
    torch.save(ck, path)
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "2", "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    # the resumed run wrote the record: from now on the training data is checked too
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "3", "--out", str(out), "--resume",
                      "--augment", "--augment-elastic", "0.1"]) == 2
    assert "--augment False (this run: True)" in capsys.readouterr().err


L2O = ["--family", "quadratic", "--horizon", "6", "--unroll", "3", "--iterations", "2", "--problems", "2",
       "--val-every", "1", "--val-problems", "2", "--eval-problems", "3", "--quiet"]


@pytest.mark.parametrize("argv", [
    ["run", "maml", *TINY_RUN, "--iterations", "1"],
    ["l2o", "train", *L2O],
    ["search-arch", "random", "--budget", "6", "--child-steps", "2", "--channels", "2", "--nodes", "2", "--quiet"],
], ids=["run", "l2o train", "search-arch"])
def test_resume_without_a_checkpoint_is_refused_alike_and_creates_nothing(tmp_path, capsys, monkeypatch, argv):
    install_tiny(monkeypatch)
    out = tmp_path / "nothing-here"
    assert exit_code([*argv, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: no checkpoint in" in err and "leave out --resume" in err and err.count("\n") == 1
    assert not out.exists()


def test_the_lock_is_the_systems_not_the_files(tmp_path):
    """A lock file whose process is gone (its text says who held it) is taken over at once."""
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / lock.LOCK).write_text("pid 999999 on elsewhere (metaphi run, since long ago)\n")
    started = time.perf_counter()
    lock.claim(str(folder))
    try:
        assert f"pid {os.getpid()}" in (folder / lock.LOCK).read_text()
        assert time.perf_counter() - started < 5
    finally:
        lock.release_all()


def test_eval_of_a_diverged_model_exits_3(tmp_path, capsys, monkeypatch):
    import torch

    install_tiny(monkeypatch)
    out = tmp_path / "run"
    assert exit_code(["run", "maml", *TINY_RUN, "--iterations", "1", "--out", str(out)]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    first = next(iter(ck["phi"]))
    ck["phi"][first] = torch.full_like(ck["phi"][first], float("nan"))
    torch.save(ck, out / "checkpoint.pt")
    capsys.readouterr()
    assert exit_code(["eval", str(out / "checkpoint.pt"), "--last", "--out", str(tmp_path / "e.json")]) == 3
    err = capsys.readouterr().err
    assert f"weight '{first}' is not finite" in err and err.count("\n") == 1
    assert not (tmp_path / "e.json").exists()
