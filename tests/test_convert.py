"""Masked -> compact conversion: parity, refusal, artifacts, cost rules, training form."""
import copy
import itertools

import pytest
import torch
from torch import nn

import cdnv2
from cdnv2.checkpoint import load_model, save_compact
from cdnv2.compact import (
    CompactDenseBlock,
    CompactDenseLayer,
    CompactFeatures,
    ParityError,
    check_parity,
    convert_model,
    release_workspace,
    restructure_for_state_dict,
    to_compact_training,
)
from cdnv2.condense import condense_fully
from cdnv2.errors import CheckpointError
from cdnv2.layers import (
    CompactLGC,
    CompactLinear,
    CompactSFR,
    CompactTrainLGC,
    CondensingConv1x1,
    LearnedGroupConv,
    SparseFeatureReactivation,
)
from cdnv2.layers.index_kernels import gather_lgc_weight, gather_linear_weight, gather_sfr_weight

from helpers import example, make, randomize

MODELS = [n for n in cdnv2.list_models() if not n.startswith("densenet")]
BIG = {"cdnv2_c", "condensenet_74_c4", "condensenet_74_c8"}


def max_rel_diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in MODELS])
def test_compact_matches_masked_on_every_registered_model(name):
    masked = make(name)
    x = example(masked)
    compact = convert_model(masked, example_input=x)
    assert not any(isinstance(m, CondensingConv1x1) for m in compact.modules())
    assert any(isinstance(m, CompactDenseBlock) for m in compact.modules())
    with torch.no_grad():
        ref = masked(x)
        fused = compact(x)  # eval + no_grad: the fused block path
    with torch.enable_grad():
        plain = compact(x)  # autograd on: module-by-module reference path
    assert ref.abs().max() > 1e-3  # a meaningful output scale
    assert max_rel_diff(ref, fused) < 1e-4
    assert max_rel_diff(ref, plain.detach()) < 1e-4
    assert not compact.training


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BIG))
def test_big_models_convert_at_full_resolution(name):
    masked = make(name)
    x = torch.randn(1, 3, 224, 224)
    compact = convert_model(masked, example_input=x)
    assert check_parity(masked, compact, x).ok


def test_every_fused_kernel_choice_matches(monkeypatch):
    masked = make("cdnv2_a")
    x = torch.randn(3, 3, 96, 96)
    compact = convert_model(masked, example_input=x)
    with torch.no_grad():
        ref = masked(x)
    layers = [m for m in compact.modules() if isinstance(m, CompactDenseLayer)]
    for lgc, sfr, conv3 in itertools.product(("dense", "grouped"), ("dense", "grouped"), ("depthwise", "conv")):
        for layer in layers:
            layer.fast_modes = {"lgc": lgc, "sfr": sfr, "conv3": conv3}
        with torch.no_grad():
            out = compact(x)
        assert max_rel_diff(ref, out) < 1e-4, (lgc, sfr, conv3)


def test_fused_path_handles_negative_and_zero_bn_scales_and_odd_sizes():
    masked = make("cdnv2_tiny", seed=3)
    with torch.no_grad():
        for m in masked.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(torch.where(torch.rand_like(m.weight) < 0.5, -1.0, 1.0))
    x = torch.randn(5, 3, 33, 31)  # odd sizes: pools drop the last row/column
    compact = convert_model(masked, example_input=x)
    with torch.no_grad():
        assert max_rel_diff(masked(x), compact(x)) < 1e-4


def test_fused_path_workspace_is_reused_safely_across_batch_sizes():
    masked = make("cdnv2_tiny")
    compact = convert_model(masked)
    xs = [torch.randn(b, 3, 32, 32) for b in (4, 2, 7, 4, 1)]
    with torch.no_grad():
        outs = [compact(x) for x in xs]
        again = compact(xs[0])
        for x, out in zip(xs, outs):
            assert max_rel_diff(masked(x), out) < 1e-4
    assert torch.equal(outs[0], again)  # an earlier result is not overwritten later


def test_fused_path_switches_between_inference_mode_and_no_grad():
    masked = make("cdnv2_tiny")
    compact = convert_model(masked, check=False)
    x = example(masked)
    release_workspace()
    with torch.inference_mode():
        a = compact(x)  # scratch made here are inference tensors
    with torch.no_grad():
        b = compact(x)  # ... and must not be written in place out here
    with torch.inference_mode():
        c = compact(x)
    assert torch.equal(a, b) and torch.equal(b, c)
    with torch.no_grad():
        assert max_rel_diff(masked(x), b) < 1e-4


def test_fused_forward_leaves_the_modules_unchanged_and_collectable():
    import gc
    import weakref

    compact = convert_model(make("cdnv2_tiny"))
    before = {n: dict(vars(m)) for n, m in compact.named_modules()}
    with torch.no_grad():
        compact(example(compact))  # builds plans (kept in side stores, not on the modules)
    after = {n: dict(vars(m)) for n, m in compact.named_modules()}
    assert {n: set(d) for n, d in after.items()} == {n: set(d) for n, d in before.items()}
    ref = weakref.ref(compact)
    del compact, before, after
    gc.collect()
    assert ref() is None  # the side stores do not keep a model alive


def test_hooks_added_after_a_fused_call_still_fire():
    masked = make("cdnv2_tiny")
    compact = convert_model(masked)
    x = example(masked)
    with torch.no_grad():
        fused = compact(x)
        seen = []
        layer = compact.features.denseblock_2.denselayer_1
        handle = layer.conv_1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        hooked = compact(x)  # hooks present: the module-by-module path runs
        handle.remove()
    assert seen == [(2, layer.conv_1.out_channels, 16, 16)]
    assert max_rel_diff(fused, hooked) < 1e-4


def test_compact_layers_keep_the_masked_layer_math():
    torch.manual_seed(0)
    lgc = LearnedGroupConv(24, 32, groups=4, condense_factor=4, act="hswish")
    sfr = SparseFeatureReactivation(8, 24, groups=4, condense_factor=4, act="relu")
    for m in (lgc, sfr):
        randomize(m)
        condense_fully(m)
        m.eval()
    x, h = torch.randn(2, 24, 5, 5), torch.randn(2, 8, 5, 5)
    c_lgc, c_sfr = CompactLGC.from_masked(lgc).eval(), CompactSFR.from_masked(sfr).eval()
    assert torch.allclose(c_lgc(x), lgc(x), atol=1e-5)
    assert torch.allclose(c_sfr(x, h), sfr(x, h), atol=1e-5)
    # The stored indices are the kept channels in group order, as small integers.
    assert c_lgc.index.dtype == torch.int16
    assert c_lgc.index.tolist() == lgc.kept_indices().flatten().tolist()
    assert c_sfr.index.tolist() == sfr.kept_indices().flatten().tolist()
    # Duplicated SFR targets sum: the dense equivalent is exactly W * M.
    assert torch.equal(c_sfr.dense_weight(), sfr.masked_weight()[:, :, 0, 0])


def test_compact_linear_for_condensed_classifier():
    masked = make("condensenet_50", classifier_condense=2)
    compact = convert_model(masked)
    assert isinstance(compact.classifier, CompactLinear)
    x = example(masked)
    with torch.no_grad():
        assert max_rel_diff(masked(x), compact(x)) < 1e-4


# ----------------------------------------------------------------------------- refusal
def test_refuses_a_half_condensed_model_naming_the_first_unfinished_layer():
    model = randomize(cdnv2.create_model("cdnv2_a"))
    for _ in range(3):
        model.features.denseblock_1.denselayer_1.conv_1.condense_step()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"features\.denseblock_1\.denselayer_1\.conv_1 is at stage 3 of 7"):
        convert_model(model)
    with pytest.raises(ValueError, match="is at stage"):
        to_compact_training(model)
    for k, v in model.state_dict().items():  # untouched
        assert torch.equal(v, before[k])


def test_parity_failure_raises():
    masked = make("cdnv2_tiny")
    x = example(masked)
    compact = convert_model(masked, example_input=x)
    with torch.no_grad():
        compact.classifier.bias.add_(1.0)
    result = check_parity(masked, compact, x)
    assert not result.ok and result.max_abs_diff > 0.5
    # float rounding differs between the forms, so a zero tolerance must fail loudly
    with pytest.raises(ParityError, match="does not match"):
        convert_model(masked, example_input=x, atol_rel=0.0)


def test_convert_leaves_the_input_model_untouched():
    masked = make("cdnv2_tiny").train()
    state = copy.deepcopy(masked.state_dict())
    compact = convert_model(masked)
    assert masked.training and not compact.training
    assert set(masked.state_dict()) == set(state)
    for k, v in masked.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(isinstance(m, LearnedGroupConv) for m in [masked.features.denseblock_1.denselayer_1.conv_1])


# ----------------------------------------------------------------------------- cost rules
@pytest.mark.parametrize("name", ["cdnv2_a", "cdnv2_tiny", "condensenet_50"])
def test_paper_rule_params_and_flops_match_the_masked_model(name):
    masked = make(name, classifier_condense=2) if name == "condensenet_50" else make(name)
    compact = convert_model(masked)
    size = (3, 32, 32) if masked.cfg.stem_stride == 1 else (3, 64, 64)
    cm, cc = cdnv2.count_cost(masked, size), cdnv2.count_cost(compact, size)
    assert cc.paper_params == pytest.approx(cm.paper_params, rel=1e-9)
    assert cc.paper_flops == pytest.approx(cm.paper_flops, rel=1e-9)
    # what executes: far fewer multiply-adds than the masked model, a few moves added
    assert cc.exec_flops < 0.6 * cm.exec_flops
    assert cc.params == pytest.approx(cm.paper_params, rel=1e-9)  # nothing pruned is stored


def test_paper_numbers_of_compact_cdnv2_b():
    compact = convert_model(make("cdnv2_b"))
    cost = cdnv2.count_cost(compact)
    assert cost.paper_flops / 1e6 == pytest.approx(146.47, abs=0.01)
    assert cost.paper_params / 1e6 == pytest.approx(3.59, abs=0.01)


# ----------------------------------------------------------------------------- artifacts
def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_save_compact_load_model_round_trip(tmp_path):
    masked = make("cdnv2_a")
    compact = convert_model(masked)
    path = save_compact(
        tmp_path / "a.pt", compact, model_name="cdnv2_a", model_kwargs=masked.arch_kwargs(),
        class_names=[f"c{i}" for i in range(1000)], preprocess={"size": 224, "mean": [0.5] * 3},
        metrics={"top1": 12.5},
    )
    raw = torch.load(path, weights_only=True)
    assert {"format", "kind", "version", "model_name", "model_kwargs", "structure", "model_state",
            "class_names", "preprocess", "metrics"} <= set(raw)
    assert (raw["format"], raw["kind"], raw["version"], raw["structure"]) == ("cdnv2", "compact", 1, "compact")
    assert not any(k.endswith(".mask") for k in raw["model_state"])
    # one file, no routing matrices: within 10% of the parameter bytes
    size = path.stat().st_size
    assert size <= 1.10 * _param_bytes(compact), (size, _param_bytes(compact))
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.cdnv2_meta["class_names"][:2] == ["c0", "c1"]
    assert loaded.cdnv2_meta["preprocess"]["size"] == 224
    assert loaded.cdnv2_meta["model_name"] == "cdnv2_a"
    assert any(isinstance(m, CompactFeatures) for m in loaded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), compact(x), atol=1e-6)
        assert max_rel_diff(masked(x), loaded(x)) < 1e-4
    for k, v in compact.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["cdnv2_b", pytest.param("cdnv2_c", marks=pytest.mark.slow)])
def test_artifact_size_close_to_parameter_bytes(tmp_path, name):
    compact = convert_model(make(name), check=False)
    path = save_compact(tmp_path / "m.pt", compact, model_name=name, model_kwargs={})
    assert path.stat().st_size <= 1.10 * _param_bytes(compact)


def test_save_compact_refuses_masked_models(tmp_path):
    with pytest.raises(ValueError, match="masked"):
        save_compact(tmp_path / "m.pt", make("cdnv2_tiny"), model_name="cdnv2_tiny", model_kwargs={})


def _train_ckpt(model, ema, structure):
    return {
        "format": "cdnv2", "kind": "train", "version": 1, "model_name": "cdnv2_tiny",
        "model_kwargs": model.arch_kwargs(), "structure": structure,
        "model_state": model.state_dict(), "ema_state": ema.state_dict() if ema is not None else None,
        "class_names": ["a", "b"], "preprocess": None, "metrics": {},
    }


@pytest.mark.parametrize("structure", ["masked", "compact_train"])
def test_load_model_reads_training_checkpoints(tmp_path, structure):
    model = make("cdnv2_tiny", seed=1)
    ema = make("cdnv2_tiny", seed=2)
    if structure == "compact_train":
        to_compact_training(model)
        to_compact_training(ema)
    path = tmp_path / "last.pt"
    torch.save(_train_ckpt(model, ema, structure), path)
    x = example(model)
    with torch.no_grad():
        for weights, ref in (("ema", ema), ("raw", model)):
            loaded = load_model(path, weights=weights)
            assert loaded.cdnv2_meta["weights"] == weights
            assert loaded.cdnv2_meta["class_names"] == ["a", "b"]
            assert torch.allclose(loaded(x), ref.eval()(x), atol=1e-6)
    ckpt = _train_ckpt(model, None, structure)
    assert load_model(ckpt).cdnv2_meta["weights"] == "raw"  # no EMA: raw weights, from a dict too


def test_restructure_for_state_dict_then_strict_load():
    compact = convert_model(make("cdnv2_tiny"))
    fresh = cdnv2.create_model("cdnv2_tiny")
    restructure_for_state_dict(fresh, compact.state_dict())
    fresh.load_state_dict(compact.state_dict(), strict=True)
    x = example(fresh)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), compact(x))


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "cannot be read"),
    (b"PK\x03\x04 truncated zip", "cannot be read"),
    ([1, 2, 3], "not a cdnv2 checkpoint"),
    ({"state_dict": {}}, "not a cdnv2 checkpoint"),
    ({"format": "cdnv2", "kind": "compact", "version": 1}, "lacks key"),
    ({"format": "cdnv2", "kind": "weights"}, "unknown checkpoint kind"),
])
def test_bad_checkpoints_raise_checkpoint_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)


class _RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint would carry."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_checkpoint_that_would_run_code_is_refused_naming_the_global(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "cdnv2", "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="contains code that cannot be loaded safely") as e:
        load_model(path)
    assert "posix.system" in str(e.value) or "nt.system" in str(e.value)
    assert str(path) in str(e.value) and "truncated" not in str(e.value)


def test_truncated_artifact_raises_checkpoint_error(tmp_path):
    compact = convert_model(make("cdnv2_tiny"))
    path = save_compact(tmp_path / "m.pt", compact, model_name="cdnv2_tiny", model_kwargs=compact.arch_kwargs())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(path)


def test_artifact_of_another_variant_raises_checkpoint_error(tmp_path):
    compact = convert_model(make("cdnv2_tiny"))
    path = save_compact(tmp_path / "m.pt", compact, model_name="cdnv2_tiny",
                        model_kwargs={**compact.arch_kwargs(), "growth": [8, 16, 32]})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


# ----------------------------------------------------------------------------- training form
def _sgd_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("name", ["cdnv2_tiny", "condensenet_50"])
def test_compact_training_form_matches_masked_training(name):
    kwargs = {"classifier_condense": 2} if name == "condensenet_50" else {}
    masked = make(name, **kwargs).train()
    x = example(masked, batch=4)
    y = torch.randint(0, 10, (4,))
    opt_m = torch.optim.SGD(masked.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    _sgd_step(masked, opt_m, x, y)  # some momentum to carry over
    compact = copy.deepcopy(masked)
    opt_c = torch.optim.SGD(compact.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    opt_c.load_state_dict(copy.deepcopy(opt_m.state_dict()))  # no shared buffers
    n_params = [len(g["params"]) for g in opt_c.param_groups]
    to_compact_training(compact, opt_c)
    assert [len(g["params"]) for g in opt_c.param_groups] == n_params
    assert {id(p) for g in opt_c.param_groups for p in g["params"]} == {id(p) for p in compact.parameters()}
    assert any(isinstance(m, CompactTrainLGC) for m in compact.modules())
    assert any(isinstance(m, CompactSFR) for m in compact.modules()) == (name == "cdnv2_tiny")
    assert not any(isinstance(m, CondensingConv1x1) for m in compact.modules())

    # forward in both modes, then gradients of the surviving weights
    for train in (True, False):
        masked.train(train)
        compact.train(train)
        with torch.no_grad():
            assert torch.allclose(compact(x), masked(x), atol=1e-5)
    masked.train()
    compact.train()
    _sgd_step(masked, opt_m, x, y)
    _sgd_step(compact, opt_c, x, y)
    masked_mods = dict(masked.named_modules())
    checked = 0
    for name_, m in compact.named_modules():
        if isinstance(m, (CompactTrainLGC, CompactSFR, CompactLinear)):
            old = masked_mods[name_]
            kept = old.kept_indices()
            if isinstance(m, CompactTrainLGC):
                gather = gather_lgc_weight
                new_w, args = m.conv.weight, (kept, old.groups)
            elif isinstance(m, CompactSFR):
                gather = gather_sfr_weight
                new_w, args = m.conv.weight, (kept, old.groups)
            else:
                gather = gather_linear_weight
                new_w, args = m.linear.weight, (kept,)
            assert torch.allclose(new_w, gather(old.conv.weight, *args), atol=1e-5), name_
            assert torch.allclose(new_w.grad, gather(old.conv.weight.grad, *args), atol=1e-5), name_
            mom_new = opt_c.state[new_w]["momentum_buffer"]
            mom_old = opt_m.state[old.conv.weight]["momentum_buffer"]
            assert torch.allclose(mom_new, gather(mom_old, *args), atol=1e-5), name_
            checked += 1
    assert checked > 0
    # every other parameter (BN, 3x3, head) is updated identically too
    masked_params = dict(masked.named_parameters())
    for pname, p in compact.named_parameters():
        if pname in masked_params and p.shape == masked_params[pname].shape:
            assert torch.allclose(p, masked_params[pname], atol=1e-5), pname
    # running statistics keep training on the full input
    for bname, b in compact.named_buffers():
        if bname.endswith("running_mean"):
            assert torch.allclose(b, dict(masked.named_buffers())[bname], atol=1e-5), bname


def test_compact_training_form_runs_under_autocast():
    masked = make("cdnv2_tiny").train()
    compact = copy.deepcopy(masked)
    to_compact_training(compact)
    x = example(masked, batch=4)
    outs = []
    for model in (masked, compact):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        outs.append(out.float())
    diff, scale = (outs[0] - outs[1]).detach().abs().max(), outs[0].detach().abs().max()
    assert float(diff) < 0.05 * float(scale)
    assert all(p.grad is not None for p in compact.parameters() if p.requires_grad)


def test_unchanged_parameters_keep_their_optimizer_state_objects():
    model = make("cdnv2_tiny").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = example(model, 4), torch.randint(0, 10, (4,))
    _sgd_step(model, opt, x, y)
    bn = model.features.denseblock_1.denselayer_1.conv_1.norm
    state_before = opt.state[bn.weight]
    to_compact_training(model, opt)
    assert model.features.denseblock_1.denselayer_1.conv_1.norm is bn
    assert opt.state[bn.weight] is state_before


def test_resume_after_compact_training_rebuilds_optimizer_in_the_same_order():
    """What the trainer does on resume: restructure, a fresh optimizer, load its state."""
    model = make("cdnv2_tiny").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = example(model, 4), torch.randint(0, 10, (4,))
    _sgd_step(model, opt, x, y)
    to_compact_training(model, opt)
    _sgd_step(model, opt, x, y)
    fresh = cdnv2.create_model("cdnv2_tiny")
    restructure_for_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert p.shape == q.shape
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    _sgd_step(model, opt, x, y)
    _sgd_step(fresh, opt2, x, y)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_compact_training_model_converts_to_the_inference_form():
    masked = make("cdnv2_tiny")
    trained = copy.deepcopy(masked)
    to_compact_training(trained)
    x = example(masked)
    compact = convert_model(trained.eval(), example_input=x)
    assert not any(isinstance(m, CompactTrainLGC) for m in compact.modules())
    with torch.no_grad():
        assert max_rel_diff(masked(x), compact(x)) < 1e-4


def test_count_cost_on_compact_training_form():
    model = make("cdnv2_tiny")
    paper = cdnv2.count_cost(model, (3, 32, 32))
    to_compact_training(model)
    compact_cost = cdnv2.count_cost(model, (3, 32, 32))
    assert compact_cost.paper_flops == pytest.approx(paper.paper_flops, rel=1e-9)
