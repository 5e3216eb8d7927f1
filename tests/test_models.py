"""Every registered model builds, runs forward/backward and honours the common API."""
import pytest
import torch

import cdnv2
from cdnv2.models import CondenseNet

ALL = cdnv2.list_models()


@pytest.mark.parametrize("name", ALL)
def test_builds_runs_and_every_parameter_gets_a_gradient(name):
    model = cdnv2.create_model(name, num_classes=7)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    feats = model.forward_features(x)
    assert feats.dim() == 4 and feats.shape[1] == model.num_features
    torch.testing.assert_close(model.forward_head(feats), model(x))


@pytest.mark.parametrize("name", ["cdnv2_a", "cdnv2_tiny", "condensenet_74_c4", "densenet121"])
def test_reset_classifier_and_any_input_size(name):
    model = cdnv2.create_model(name).eval()
    model.reset_classifier(3)
    for size in (32, 57, 96):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)


def test_official_layer_layout_and_widths():
    widths = {"cdnv2_a": 800, "cdnv2_b": 1176, "cdnv2_c": 2064}
    for name, c_last in widths.items():
        m = cdnv2.create_model(name)
        assert m.num_features == c_last
        sd = m.state_dict()
        assert "features.init_conv.weight" in sd
        assert "features.denseblock_1.denselayer_1.conv_1.mask" in sd
        assert "features.denseblock_1.denselayer_1.sfr.conv.weight" in sd
        assert "features.denseblock_5.denselayer_1.se.fc.2.weight" in sd
        assert "features.denseblock_4.denselayer_1.se.fc.0.weight" in sd
        assert "features.denseblock_3.denselayer_1.se.fc.0.weight" not in sd
        assert sd["features.init_conv.weight"].shape[0] == 2 * m.cfg.growth[0]


def test_activation_choice_per_block():
    m = cdnv2.create_model("cdnv2_a")
    assert isinstance(m.features.denseblock_2.denselayer_1.conv_1.act, torch.nn.ReLU)
    assert isinstance(m.features.denseblock_3.denselayer_1.conv_1.act, torch.nn.Hardswish)


def test_init_matches_release():
    m = cdnv2.create_model("cdnv2_a")
    sfr = m.features.denseblock_1.denselayer_1.sfr
    assert torch.equal(sfr.norm.weight, torch.ones_like(sfr.norm.weight))
    z = cdnv2.create_model("cdnv2_a", sfr_zero_init=True)
    assert z.features.denseblock_1.denselayer_1.sfr.norm.weight.abs().sum() == 0


def test_registry_errors():
    with pytest.raises(ValueError, match="cdnv2_b"):
        cdnv2.create_model("cdnv2_bb")
    with pytest.raises(ValueError, match="already registered"):
        cdnv2.register_model(cdnv2.models.condensenet.cdnv2_a)
    with pytest.raises(ValueError, match="growth"):
        cdnv2.create_model("cdnv2_a", growht=(1, 2))
    with pytest.raises(ValueError, match="stages"):
        cdnv2.create_model("cdnv2_a", stages=(1, 2))
    assert cdnv2.list_models("condensenet_7*") == ["condensenet_74", "condensenet_74_c4", "condensenet_74_c8"]


def test_config_round_trip_rebuilds_same_architecture():
    m = cdnv2.create_model("cdnv2_b", num_classes=10)
    assert isinstance(m, CondenseNet)
    again = cdnv2.create_model("cdnv2_b", **m.arch_kwargs())
    assert again.cfg == m.cfg
    again.load_state_dict(m.state_dict())
