"""Backbones: every registered model builds from its spec, rebuilds from it (spec -> model -> spec),
and has the shapes its spec promises."""
import json

import pytest
import torch

from metaphi.models import MODELS, MLP, Conv4, GroupNorm, GroupNormConvNet, PlainConvNet, build_model, spec_of

#: name -> (a partial spec as the studies write it, the input shape of one example)
CASES = {
    "conv4": ({"name": "conv4", "hidden": 8}, (1, 28, 28)),
    "mlp": ({"name": "mlp", "hidden": [16, 8]}, (1, 8, 8)),
    "dg-convnet": ({"name": "dg-convnet", "hidden": 8, "blocks": 2, "groups": 2}, (1, 16, 16)),
    "plain-convnet": ({"name": "plain-convnet", "hidden": 4, "blocks": 2}, (1, 12, 12)),
    "resnet12": ({"name": "resnet12", "widths": [4, 6, 8, 10]}, (3, 16, 16)),
    "wrn": ({"name": "wrn", "depth": 10, "widen": 1}, (3, 16, 16)),
    "timm": ({"name": "timm", "architecture": "tiny-test-net"}, (3, 16, 16)),
}


class _FakeTimmNet(torch.nn.Module):
    """What timm.create_model returns, reduced: forward_features, forward_head, num_features, a classifier
    and a standard batch norm."""

    def __init__(self, num_classes, in_chans):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(in_chans, 6, 3), torch.nn.BatchNorm2d(6)
        self.fc, self.num_features = torch.nn.Linear(6, num_classes), 6

    def forward_features(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def forward_head(self, x, pre_logits=False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc


@pytest.fixture(autouse=True)
def fake_timm(monkeypatch):
    """timm is an optional extra: a stand-in with its create_model, knowing one architecture."""
    import types

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3):
        assert pretrained is False  # architectures only: nothing may be downloaded
        if name != "tiny-test-net":
            raise RuntimeError(f"Unknown model ({name})")
        return _FakeTimmNet(num_classes, in_chans)

    monkeypatch.setitem(__import__("sys").modules, "timm", types.SimpleNamespace(create_model=create_model))


def test_every_model_has_a_case():
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_round_trip_and_shapes(name):
    partial, shape = CASES[name]
    torch.manual_seed(0)
    model = build_model(partial, input_shape=shape, out_features=5)
    x = torch.rand(3, *shape)
    assert model(x).shape == (3, 5)
    assert model.features(x).shape == (3, model.feature_dim)
    assert model.head.in_features == model.feature_dim and model.head.out_features == 5
    spec = spec_of(model)
    assert spec["name"] == name
    again = build_model(json.loads(json.dumps(spec)))  # checkpoints keep the spec as plain data
    assert spec_of(again) == spec and type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x), model(x))


def test_the_studies_partial_specs_build_what_their_own_builders_built():
    # distill/reweight: Conv4(c, classes, hidden=, image_size=h) and MLP(c*h*w, classes, hidden)
    for partial, direct in (({"name": "conv4", "hidden": 8}, lambda: Conv4(1, 10, hidden=8, image_size=8)),
                            ({"name": "mlp", "hidden": [32]}, lambda: MLP(64, 10, (32,)))):
        torch.manual_seed(1)
        built = build_model(partial, input_shape=(1, 8, 8), out_features=10)
        torch.manual_seed(1)
        expected = direct()
        assert built.spec == expected.spec
        for (k, a), (_, b) in zip(built.state_dict().items(), expected.state_dict().items()):
            assert torch.equal(a, b), k


def test_specs_kept_as_checkpoints_store_them():
    assert Conv4(1, 5, hidden=8).spec == {"name": "conv4", "in_channels": 1, "out_features": 5, "hidden": 8,
                                          "image_size": 28, "pool": "stride"}
    assert GroupNormConvNet(1, 3, hidden=8, blocks=2, groups=2).spec["name"] == "dg-convnet"
    # continual checkpoints and OML's meta-training folder names hold this spec: no name in it
    assert PlainConvNet(1, 4, hidden=3, blocks=2, image_size=8).spec == {
        "in_channels": 1, "num_classes": 4, "hidden": 3, "blocks": 2, "image_size": 8}


@pytest.mark.parametrize("pool,grid", [("stride", None), ("max", 2), ("max3", 4)])
def test_conv4_poolings_and_their_feature_grids(pool, grid):
    """max pools after every block (32 -> 2 x 2 positions), max3 after the first three only (4 x 4);
    stride averages its last grid away. Each flattens what its last block left, in that order."""
    net = Conv4(1, 5, hidden=6, image_size=32, pool=pool)
    x = torch.randn(3, 1, 32, 32)
    last = net.body(x)
    assert net.feature_dim == (6 if grid is None else 6 * grid * grid)
    if grid is not None:
        assert last.shape[-2:] == (grid, grid)
        torch.testing.assert_close(net.features(x), last.flatten(1))
    assert net(x).shape == (3, 5)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.body) == {"stride": 0, "max": 4, "max3": 3}[pool]
    assert build_model(net.spec).feature_dim == net.feature_dim
    with pytest.raises(ValueError, match="pool must be one of stride, max, max3, not 'avg'"):
        Conv4(1, 5, pool="avg")


def test_bad_specs_are_refused_with_a_message():
    with pytest.raises(ValueError, match="unknown model 'resnet99' \\(known: conv4, mlp, .*, timm\\)"):
        build_model({"name": "resnet99"})
    with pytest.raises(ValueError, match="unknown model 'None'"):
        build_model({"hidden": 3})
    with pytest.raises(ValueError, match="model 'conv4' takes no argument 'depth'"):
        build_model({"name": "conv4", "depth": 3})
    with pytest.raises(ValueError, match="in_channels=3 disagrees with the data's 1"):
        build_model({"name": "conv4", "in_channels": 3}, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="takes images"):
        build_model({"name": "conv4"}, input_shape=(10,))
    with pytest.raises(ValueError, match="not a registered backbone"):
        spec_of(torch.nn.Linear(2, 2))


def test_mlp_takes_vectors():
    model = build_model({"name": "mlp"}, input_shape=(1,), out_features=1)
    assert model.spec["in_features"] == 1 and model(torch.rand(4, 1)).shape == (4, 1)


@pytest.mark.parametrize("name", ["dg-convnet", "plain-convnet"])
def test_no_batch_statistics(name):
    # one example's output does not depend on the batch it comes in (unlike Conv4's task batch norm)
    partial, shape = CASES[name]
    model = build_model(partial, input_shape=shape, out_features=3).double()
    x = torch.rand(4, *shape, dtype=torch.float64)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_group_norm_is_per_example_and_needs_whole_groups():
    norm = GroupNorm(4, groups=2).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    g = norm(x).reshape(3, 2, -1)
    torch.testing.assert_close(g.mean(-1), torch.zeros(3, 2, dtype=torch.float64))
    torch.testing.assert_close(g.var(-1, unbiased=False), torch.ones(3, 2, dtype=torch.float64), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        GroupNorm(4, groups=3)


def test_plain_convnet_is_he_initialized():
    # with no normalization, He initialization keeps the signal alive through the blocks
    torch.manual_seed(0)
    net = PlainConvNet(1, 5, hidden=64, blocks=4, image_size=28)
    conv = net.body[2]
    assert abs(float(conv.weight.detach().std()) - (2 / (64 * 9)) ** 0.5) < 0.01
    assert float(conv.bias.detach().abs().max()) == 0.0


def test_the_few_shot_standard_backbones_have_their_published_sizes():
    from metaphi.models import model_named

    sizes = {name: sum(p.numel() for p in build_model(model_named(name), input_shape=(3, 84, 84),
                                                          out_features=5).parameters())
             for name in ("resnet12", "wrn-28-10")}
    # ResNet-12 of MetaOptNet/RFS: about 12.4M weights; WRN-28-10: about 36.5M
    assert 12.3e6 < sizes["resnet12"] < 12.5e6 and 36.4e6 < sizes["wrn-28-10"] < 36.6e6
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        model_named("vgg")
    assert model_named("timm:convnext_atto") == {"name": "timm", "architecture": "convnext_atto"}
    assert model_named("conv4-96") == {"name": "conv4", "hidden": 96}
    assert build_model({**model_named("conv4-96"), "pool": "max"}, input_shape=(1, 32, 32),
                       out_features=5).feature_dim == 96 * 2 * 2
    with pytest.raises(ValueError, match="timm has no architecture 'nope'"):
        build_model({"name": "timm", "architecture": "nope"}, input_shape=(3, 8, 8), out_features=2)


def test_resnet12_meta_gradients_vmapped_equal_the_loop(float64):
    from metaphi.algorithms.base import CLASSIFICATION
    from metaphi.algorithms.maml import MAML
    from metaphi.inner import SGD
    from metaphi.outer import build_estimator
    from metaphi.tasks import Task

    torch.manual_seed(0)
    model = build_model({"name": "resnet12", "widths": [3, 4, 5, 6]}, input_shape=(1, 8, 8), out_features=3).double()
    algo = MAML(model, CLASSIFICATION, SGD(0.2), trainable="head")
    phi = algo.init_meta_params()
    g = torch.Generator().manual_seed(1)
    tasks = Task((torch.rand(2, 6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(3).repeat(2).expand(2, 6)),
                 (torch.rand(2, 6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(3).repeat(2).expand(2, 6)))
    looped, _ = build_estimator("second-order", {"loop": True})(algo, phi, tasks)
    vmapped, _ = build_estimator("second-order")(algo, phi, tasks)
    for k in looped:
        torch.testing.assert_close(vmapped[k], looped[k], rtol=1e-9, atol=1e-12)
