"""metaphi.config: the device check every command's --device goes through."""
from __future__ import annotations

import pytest
import torch

from metaphi.config import device_problem


def test_cpu_is_always_usable_and_nonsense_is_named():
    assert device_problem("cpu") is None
    assert "not a torch device" in device_problem("banana")
    assert "not a torch device" in device_problem("cuda:-x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_what_to_do():
    for name in ("cuda", "cuda:1"):
        problem = device_problem(name)
        assert "CUDA is not available" in problem and "--device cpu" in problem


@pytest.mark.parametrize("command", [
    ["run", "maml"], ["eval", "no-such-run"], ["tune", "maml"],
    ["predict", "--checkpoint", "x", "--support", "y", "--query", "z"],
])
@pytest.mark.parametrize("device", ["banana", "cuda:99"])
def test_every_command_refuses_an_unusable_device_with_one_line(command, device, tmp_path, capsys):
    from metaphi.cli import main

    if device.startswith("cuda") and torch.cuda.device_count() > 99:
        pytest.skip("this machine has the device")
    out = tmp_path / "out"
    assert main([*command, "--device", device, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metaphi: error: --device:"), err
    assert not out.exists()
