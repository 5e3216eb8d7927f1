"""features_only backbones: shapes and feature_info for every model, in every structure."""
import pytest
import torch

import cdnv2
from cdnv2.compact import model_structure, to_compact_training

from helpers import make, randomize

SLOW = {"cdnv2_c", "condensenet_74_c4", "condensenet_74_c8", "densenet169"}
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in cdnv2.list_models()]


def _input(model, size=None):
    stride = getattr(getattr(model, "cfg", None), "stem_stride", 2)
    size = size or (32 if stride == 1 else 64)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", MODELS)
def test_features_only_shapes_match_feature_info(name):
    """Every registered model: the maps' shapes are feature_info's, and the deepest map is
    forward_features (models/features.py's promise; the torchvision DenseNet's included)."""
    torch.manual_seed(0)
    full = randomize(cdnv2.create_model(name)).eval()  # BN shifts: a missing final ReLU shows
    net = cdnv2.models.features_only(full)
    x = _input(full)
    with torch.no_grad():
        maps = net(x)
        assert torch.equal(maps[-1], full.forward_features(x))
    info = net.feature_info
    assert len(maps) == len(info) == len(full.feature_info)
    assert info.channels() == [d["num_chs"] for d in full.feature_info]
    reductions = info.reduction()
    assert reductions == sorted(reductions) and len(set(reductions)) == len(reductions)
    for m, c, r in zip(maps, info.channels(), reductions):
        assert m.shape == (2, c, x.shape[2] // r, x.shape[3] // r), (name, m.shape, c, r)
        assert torch.isfinite(m).all()
    assert not any(k.startswith(("classifier", "fc.", "se_last", "net.classifier")) for k in net.state_dict())


def test_deepest_map_is_forward_features_and_keys_match_the_classifier_model():
    torch.manual_seed(0)
    model = randomize(cdnv2.create_model("cdnv2_tiny")).eval()
    net = cdnv2.models.features_only(model, out_indices=(-1,))
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(net(x)[0], model.forward_features(x))
    head = ("classifier.", "fc.", "se_last.")
    assert set(net.state_dict()) == {k for k in model.state_dict() if not k.startswith(head)}


def test_out_indices_select_blocks_and_bad_ones_are_refused():
    net = cdnv2.create_model("cdnv2_a", features_only=True, out_indices=(1, 3, 4))
    assert net.feature_info.channels() == [32, 288, 800]
    assert net.feature_info.reduction() == [4, 16, 32]
    assert net.feature_info.module_name(0) == "features.denseblock_2"
    assert len(net(torch.randn(1, 3, 64, 64))) == 3
    with pytest.raises(ValueError, match="5 dense blocks"):
        cdnv2.create_model("cdnv2_a", features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match="increasing"):
        cdnv2.create_model("cdnv2_a", features_only=True, out_indices=(2, 1))
    with pytest.raises(ValueError, match="features_only"):
        cdnv2.create_model("cdnv2_a", out_indices=(1,))


def test_masked_compact_training_and_compact_give_the_same_maps():
    masked = make("cdnv2_tiny")
    x = _input(masked)
    compact_train = make("cdnv2_tiny")
    to_compact_training(compact_train)
    compact = cdnv2.convert_model(masked, example_input=x)
    with torch.no_grad():
        ref = cdnv2.models.features_only(masked)(x)
        for other in (compact_train.eval(), compact):
            maps = cdnv2.models.features_only(other)(x)
            assert len(maps) == len(ref)
            for a, b in zip(ref, maps):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_compact_backbone_trains():
    compact = cdnv2.convert_model(make("cdnv2_tiny"))
    net = cdnv2.models.features_only(compact).train()
    maps = net(_input(compact))
    sum(m.float().mean() for m in maps).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_load_model_features_only(tmp_path):
    masked = make("cdnv2_tiny", num_classes=5)
    x = _input(masked)
    compact = cdnv2.convert_model(masked, example_input=x)
    path = cdnv2.save_compact(tmp_path / "m.pt", compact, model_name="cdnv2_tiny",
                              model_kwargs=masked.arch_kwargs(), class_names=list("abcde"))
    net = cdnv2.load_model(path, features_only=True, out_indices=(0, 2))
    assert net.feature_info.channels() == [32, 128]
    assert net.cdnv2_meta["class_names"] == list("abcde")
    with torch.no_grad():
        ref = cdnv2.models.features_only(masked, (0, 2))(x)
        for a, b in zip(ref, net(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- detection example
def _detection_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "detection_example.py"
    spec = importlib.util.spec_from_file_location("detection_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detection_backbone_wiring():
    det = _detection_module()
    backbone = det.compact_backbone("cdnv2_tiny", stem_stride=2)
    assert model_structure(backbone) == "compact"
    fpn = det.BlockFPN(backbone, out_channels=16)
    levels = fpn(torch.randn(2, 3, 64, 64))
    assert list(levels) == ["0", "1", "2", "pool"]
    assert [tuple(v.shape[1:]) for v in levels.values()] == [(16, 32, 32), (16, 16, 16), (16, 8, 8), (16, 4, 4)]
    samples = det.make_detection_set(4, seed=0, size=64)
    for image, target in samples:
        assert image.shape == (3, 64, 64) and 0 <= float(image.min()) and float(image.max()) <= 1
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) >= 1
        assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes.max()) <= 64
        assert bool((target["labels"] >= 1).all()) and bool((target["labels"] <= len(det.OBJECTS)).all())


def test_detection_one_training_step_reaches_the_backbone():
    det = _detection_module()
    torch.manual_seed(0)
    detector = det.build_detector(det.compact_backbone("cdnv2_tiny", stem_stride=2), size=64, fpn_channels=16)
    stem = detector.backbone.body.features.init_conv.weight
    before = stem.detach().clone()
    opt = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    losses = det.train_step(detector, det.make_detection_set(2, seed=1, size=64), opt)
    assert set(losses) >= {"loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert not torch.equal(stem, before)  # gradients flowed through the compact backbone
    detector.eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
