"""Import of official CondenseNetV2 release files (SPEC 7), from synthetic state dicts.

The official layouts are rebuilt (tests/helpers.py) from our masked models with loops that
follow the official conversion's definitions (not with our compact-layer code), so a
mismatch in index order or weight layout would show up as different outputs.
"""
import argparse
import warnings

import pytest
import torch

from cdnv2.checkpoint import load_official_checkpoint
from cdnv2.errors import CheckpointError
from cdnv2.layers import CompactLGC, CompactSFR, CondensingConv1x1

from helpers import converted_layout, masked_model, unconverted_layout

VARIANTS = ["cdnv2_a", pytest.param("cdnv2_b", marks=pytest.mark.slow), pytest.param("cdnv2_c", marks=pytest.mark.slow)]


def _inputs():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", VARIANTS)
def test_unconverted_official_layout_gives_our_masked_model(name):
    ref = masked_model(name)
    sd = unconverted_layout(ref)
    assert "features.se_last.fc.0.weight" in sd
    assert "features.denseblock_1.denselayer_1.conv_1._mask" in sd
    model = load_official_checkpoint({"state_dict": sd}, name)
    assert not model.training
    assert any(isinstance(m, CondensingConv1x1) for m in model.modules())
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("name", VARIANTS)
def test_converted_official_layout_gives_our_compact_model(name):
    ref = masked_model(name, seed=1)
    sd = converted_layout(ref, prefix="module.")
    assert sd["module.features.denseblock_1.denselayer_1.sfr.index"].dim() == 2
    model = load_official_checkpoint({"state_dict": sd}, name)
    assert any(isinstance(m, CompactLGC) for m in model.modules())
    assert any(isinstance(m, CompactSFR) for m in model.modules())
    x = _inputs()
    with torch.no_grad():
        want, got = ref(x), model(x)
    with torch.enable_grad():
        plain = model(x).detach()
    assert float((want - got).abs().max()) < 1e-4 * float(want.abs().max())
    assert float((want - plain).abs().max()) < 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("converted", [False, True])
def test_ema_weights_module_prefix_and_files(tmp_path, converted):
    raw, ema = masked_model("cdnv2_a", seed=2), masked_model("cdnv2_a", seed=3)
    layout = converted_layout if converted else unconverted_layout
    path = tmp_path / "official.pth.tar"
    # timm's saver (used by the official trainer) also stores its argparse arguments
    torch.save({"epoch": 349, "arch": "cdnv2_a", "args": argparse.Namespace(lr=0.4, model="cdnv2_a"),
                "state_dict": layout(raw, "module."), "state_dict_ema": layout(ema, "module.")}, path)
    x = _inputs()
    with torch.no_grad():
        for use_ema, ref in ((True, ema), (False, raw)):
            model = load_official_checkpoint(path, "cdnv2_a", use_ema=use_ema)
            want, got = ref(x), model(x)
            assert float((want - got).abs().max()) < 1e-4 * float(want.abs().max()), use_ema


def test_stage_is_read_from_the_mask_when_the_official_stage_lags():
    ref = masked_model("cdnv2_a")
    sd = unconverted_layout(ref)
    key = "features.denseblock_3.denselayer_2.sfr._stage"
    sd[key] = torch.tensor([6.0])  # the float progress window skipped the last step
    with pytest.warns(UserWarning, match="denseblock_3.denselayer_2.sfr: _stage=6 but its mask shows 7"):
        model = load_official_checkpoint(sd, "cdnv2_a")  # a bare state dict works too
    assert int(model.features.denseblock_3.denselayer_2.sfr.stage) == 7
    assert model.features.denseblock_3.denselayer_2.sfr.fully_condensed


def test_half_condensed_official_file_loads_as_a_masked_model():
    ref = masked_model("cdnv2_a", steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consistent _stage: no warning
        model = load_official_checkpoint({"state_dict": unconverted_layout(ref)}, "cdnv2_a")
    assert int(model.features.denseblock_1.denselayer_1.conv_1.stage) == 3
    with torch.no_grad():
        assert torch.equal(model(_inputs()), ref(_inputs()))


def test_wrong_variant_lists_missing_and_unexpected_keys():
    sd = unconverted_layout(masked_model("cdnv2_a"))
    with pytest.raises(CheckpointError, match=r"do not fit cdnv2_b: .*missing \(e\.g\. .*unexpected|shape"):
        load_official_checkpoint({"state_dict": sd}, "cdnv2_b")
    del sd["fc.weight"]
    sd["features.extra.weight"] = torch.zeros(1)
    both = r"1 missing \(e\.g\. fc\.weight\).*1 unexpected \(e\.g\. features\.extra\.weight\)"
    with pytest.raises(CheckpointError, match=both):
        load_official_checkpoint({"state_dict": sd}, "cdnv2_a")


def test_missing_ema_and_foreign_files(tmp_path):
    sd = unconverted_layout(masked_model("cdnv2_a"))
    with pytest.raises(CheckpointError, match="has no 'state_dict_ema'.*use_ema=False"):
        load_official_checkpoint({"state_dict": sd}, "cdnv2_a", use_ema=True)
    with pytest.raises(CheckpointError, match="no such file"):
        load_official_checkpoint(tmp_path / "nope.pth", "cdnv2_a")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="bad.pth: cannot be read"):
        load_official_checkpoint(bad, "cdnv2_a")
    with pytest.raises(CheckpointError, match="not an official CondenseNetV2 checkpoint"):
        load_official_checkpoint({"epoch": 3}, "cdnv2_a")


def test_bad_routing_matrix_is_rejected():
    sd = converted_layout(masked_model("cdnv2_a"))
    key = "features.denseblock_1.denselayer_1.sfr.index"
    sd[key][0, :] = 1.0
    with pytest.raises(CheckpointError, match="one 1 per row"):
        load_official_checkpoint(sd, "cdnv2_a")
