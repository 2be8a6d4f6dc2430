"""The online bilevel loop (metaphi/train_online.py): a resumed run is the uninterrupted run bit for bit
(per-step generators and one stream), the checkpoint is plain data read back without unpickling code,
a non-finite metric stops the run and keeps the last checkpoint, a checkpoint of another run is
refused; and the update rules the online problems share against torch.optim."""
from __future__ import annotations

import json
import math

import pytest
import torch

from metaphi import train_online
from metaphi.inner.rules import MomentumSGD, TorchAdam, build_rule
from metaphi.train import NonFiniteLoss

D = torch.float64


def _data(seed: int, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=D)
    y = x @ torch.arange(1.0, 6.0, dtype=D) + 0.1 * torch.randn(n, generator=g, dtype=D)
    return x, y


def _problem(nan_at: int | None = None):
    """θ: linear regression weights; φ: log step sizes per coordinate of the lookahead
    θ' = θ − exp(φ) ⊙ ∇L_train(θ), judged by L_val(θ'); θ then steps with its gradient scaled by exp(φ)."""
    (x, y), (xv, yv) = _data(0), _data(1)
    theta_rule, phi_rule = MomentumSGD(1.0, 0.9, 1e-3, clip=5.0), TorchAdam(0.05, weight_decay=1e-4)

    def step(state, t, g):
        idx, vidx = torch.randint(len(y), (16,), generator=g), torch.randint(len(yv), (16,), generator=g)
        theta = state["theta"].detach().requires_grad_()
        phi = state["phi"]["log_lr"].detach().requires_grad_()
        train = ((x[idx] @ theta - y[idx]) ** 2).mean()
        (grad,) = torch.autograd.grad(train, theta, create_graph=True)
        val = ((xv[vidx] @ (theta - phi.exp() * grad) - yv[vidx]) ** 2).mean()
        (g_phi,) = torch.autograd.grad(val, phi)
        phi_new, phi_opt = phi_rule.update(state["phi"], {"log_lr": g_phi}, state["phi_opt"], {})
        (g_theta,) = torch.autograd.grad(((x[idx] @ theta - y[idx]) ** 2).mean(), theta)
        scaled = {"w": phi_new["log_lr"].exp() * g_theta}
        new, velocity = theta_rule.update({"w": state["theta"]}, scaled, state["velocity"], {})
        loss = float("nan") if nan_at == t else float(train.detach())
        return ({"theta": new["w"], "velocity": velocity, "phi": phi_new, "phi_opt": phi_opt},
                {"step": t + 1, "train_loss": loss, "val_loss": float(val.detach()), "note": None})

    theta0 = torch.zeros(5, dtype=D)
    phi0 = {"log_lr": torch.full((5,), math.log(0.05), dtype=D)}
    start = {"theta": theta0, "velocity": theta_rule.init({"w": theta0}), "phi": phi0, "phi_opt": phi_rule.init(phi0)}
    return step, start


class _Stop(Exception):
    pass


def _stop_at(k):
    def on_step(done, metrics):
        if done == k:
            raise _Stop
    return on_step


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.parametrize("rng", ["seed", "stream"])
def test_a_resumed_run_is_the_uninterrupted_run_bitwise(tmp_path, rng):
    def randomness():
        return {"seed": 3} if rng == "seed" else {"generator": torch.Generator().manual_seed(3)}

    step, start = _problem()
    whole = train_online.run(step, start, 9, **randomness())
    assert whole["step"] == 9 and len(whole["history"]) == 9
    # the state moved: φ learned something, θ trained
    assert not torch.equal(whole["state"]["phi"]["log_lr"], start["phi"]["log_lr"])
    assert whole["history"][-1]["train_loss"] < whole["history"][0]["train_loss"]

    ck, log = str(tmp_path / "ck.pt"), str(tmp_path / "metrics.jsonl")
    # stopped twice: after step 5 (checkpoint at 4), then after step 8 (checkpoint at 8)
    for stop in (5, 8):
        with pytest.raises(_Stop):
            train_online.run(step, start, 9, checkpoint=ck, every=4, on_step=_stop_at(stop), metrics_file=log,
                             **randomness())
    resumed = train_online.run(step, start, 9, checkpoint=ck, every=4, metrics_file=log, **randomness())
    assert _equal(resumed["state"], whole["state"])
    assert resumed["history"] == whole["history"]
    assert [json.loads(line) for line in open(log)] == whole["history"]
    # a finished run resumes to itself without running a step
    again = train_online.run(step, start, 9, checkpoint=ck, every=4, on_step=_stop_at(1), **randomness())
    assert _equal(again["state"], whole["state"])


def test_the_checkpoint_is_plain_data(tmp_path):
    step, start = _problem()
    ck = str(tmp_path / "ck.pt")
    train_online.run(step, start, 3, generator=torch.Generator().manual_seed(0), checkpoint=ck, every=2,
                     identity={"lr": 0.05, "name": "toy", "sizes": [5, 1]})
    saved = torch.load(ck, weights_only=True)  # only tensors and containers: no code runs
    assert saved["format"] == train_online.FORMAT and saved["step"] == 3
    assert saved["identity"] == {"lr": 0.05, "name": "toy", "sizes": [5, 1]}
    assert set(saved["state"]) == {"theta", "velocity", "phi", "phi_opt"}
    assert isinstance(saved["generator"], torch.Tensor) and isinstance(saved["state"]["phi_opt"]["step"], int)
    train_online.require_plain(saved)

    # an object a weights_only reader could not rebuild is refused when written, naming where it is
    bad = dict(start, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(TypeError, match=r"state\.optimizer is a SGD"):
        train_online.run(lambda s, t, g: (s, {}), bad, 1, seed=0, checkpoint=str(tmp_path / "bad.pt"))


def test_a_non_finite_metric_stops_and_keeps_the_last_checkpoint(tmp_path):
    step, start = _problem(nan_at=4)
    ck = str(tmp_path / "ck.pt")
    with pytest.raises(NonFiniteLoss, match=r"train_loss became nan at step 5; lower --lr"):
        train_online.run(step, start, 10, seed=0, checkpoint=ck, every=2, hint="lower --lr")
    assert torch.load(ck, weights_only=True)["step"] == 4
    # the same run without the fault: its first four steps are what the checkpoint kept
    clean_step, _ = _problem()
    clean = train_online.run(clean_step, start, 4, seed=0)
    assert _equal(torch.load(ck, weights_only=True)["state"], clean["state"])


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    step, start = _problem()
    ck = str(tmp_path / "ck.pt")
    train_online.run(step, start, 2, seed=0, checkpoint=ck, identity={"lr": 0.1})
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train_online.run(step, start, 3, seed=0, checkpoint=ck, identity={"lr": 0.2})
    with pytest.raises(ValueError, match="exactly one"):
        train_online.run(step, start, 3)
    torch.save({"something": 1}, str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match="not written by metaphi.train_online"):
        train_online.run(step, start, 3, seed=0, checkpoint=str(tmp_path / "foreign.pt"))
    # resume=False starts again and overwrites
    fresh = train_online.run(step, start, 3, seed=0, checkpoint=ck, identity={"lr": 0.2}, resume=False)
    assert fresh["step"] == 3 and torch.load(ck, weights_only=True)["identity"] == {"lr": 0.2}


def test_max_seconds_stops_early_and_says_so():
    step, start = _problem()
    out = train_online.run(step, start, 50, seed=0, max_seconds=0.0)
    assert out["stopped"] and out["step"] == 1


# --- the shared update rules ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_adam_is_torch_optim_adam_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(4, 3, generator=g, dtype=dtype), "b": torch.randn(6, generator=g, dtype=dtype)}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    reference = torch.optim.Adam(list(leaves.values()), lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    rule = build_rule(TorchAdam(3e-3, (0.5, 0.999), weight_decay=1e-3).spec())
    state, current = rule.init(params), dict(params)
    for i in range(12):
        grads = {k: (i + 1) * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
        for k, v in leaves.items():
            v.grad = grads[k].clone()
        reference.step()
        before = {k: v.clone() for k, v in current.items()}
        current, state = rule.update(current, grads, state, {})
    for k in params:
        assert torch.equal(current[k], leaves[k].detach()), k
        assert torch.equal(state["exp_avg"][k], reference.state[leaves[k]]["exp_avg"])
    assert state["step"] == 12
    assert not torch.equal(before["a"], current["a"])  # pure: the last input was not written over


def test_momentum_sgd_is_torch_sgd_and_clips_the_global_norm():
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(5, generator=g, dtype=D), "b": torch.randn(2, generator=g, dtype=D)}
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    reference = torch.optim.SGD(list(leaves.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    rule = build_rule({"name": "momentum-sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "clip": None})
    state, current = rule.init(params), params
    for _ in range(6):
        grads = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in params.items()}
        for k, v in leaves.items():
            v.grad = grads[k].clone()
        reference.step()
        current, state = rule.update(current, grads, state, {})
    for k in params:  # the same update, summed in another order
        torch.testing.assert_close(current[k], leaves[k].detach(), rtol=1e-12, atol=1e-12)

    big = {"w": torch.full((5,), 10.0, dtype=D), "b": torch.zeros(2, dtype=D)}
    clipped = MomentumSGD(1.0, 0.0, 0.0, clip=2.0)
    new, velocity = clipped.update({k: torch.zeros_like(v) for k, v in big.items()}, big, clipped.init(big), {})
    norm = float(torch.sqrt(sum((v ** 2).sum() for v in velocity.values())))
    assert abs(norm - 2.0) < 1e-5 and torch.allclose(new["w"], -velocity["w"])
