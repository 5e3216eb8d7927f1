"""The compact model's static path: torch.compile(fullgraph=True) and torch.export trace it
whole (batch dynamic), and it matches the eager compact model."""
import pytest
import torch
from torch import nn

import cdnv2
from cdnv2.compact import CompactDenseLayer, convert_model
from cdnv2.compact import static_run
from cdnv2.compact.static_run import STATIC_BUFFERS
from cdnv2.condense import condense_fully

SMALL = ["cdnv2_tiny", "cdnv2_cifar_s14"]  # by default; the other models are slow tests
LARGE = [n for n in cdnv2.list_models() if not n.startswith("densenet") and n not in SMALL]


def _compact(name: str, seed: int = 0) -> nn.Module:
    """A compact model with random BN statistics (mixed signs, so the folds matter)."""
    torch.manual_seed(seed)
    masked = cdnv2.create_model(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in masked.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g) * 0.6 + 0.3)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    masked = condense_fully(masked).eval()
    return convert_model(masked, example_input=_images(masked, 2))


def _images(model: nn.Module, batch: int, seed: int = 1) -> torch.Tensor:
    size = 32 if model.cfg.stem_stride == 1 else 64
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref - out).abs().max() / ref.abs().max())


def _export(model: nn.Module, x: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})


@pytest.mark.parametrize("name", [n if n == "cdnv2_tiny" else pytest.param(n, marks=pytest.mark.ci) for n in SMALL]
                         + [pytest.param(n, marks=pytest.mark.slow) for n in LARGE])  # ci: ~50 s on the shared CPU
def test_export_traces_the_whole_model_with_a_dynamic_batch(name):
    compact = _compact(name)
    program = _export(compact, _images(compact, 2))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "aten.cat.default" not in ops  # block buffers, no concatenation per layer
    for batch in (1, 3):
        x = _images(compact, batch, seed=batch)
        with torch.no_grad():
            ref = compact(x)
            out = program.module()(x)
        assert _rel(ref, out) < 1e-4, batch


@pytest.mark.parametrize("widest", [0, pytest.param(64, marks=pytest.mark.ci)])  # ci: ~60 s (unrolled sums)
def test_every_layer_in_one_form_traces_exactly(monkeypatch, widest):
    """0: every 1x1 a GEMM and every 3x3 a conv; 64: every grouped conv as multiply-adds
    (the default mixes both on cdnv2_tiny: 3 of its 8 LGCs pointwise, tested above)."""
    monkeypatch.setattr(static_run, "POINTWISE_MAX_READS", widest)
    monkeypatch.setattr(static_run, "POINTWISE_MAX_3X3_INPUTS", widest)
    compact = _compact("cdnv2_tiny")
    layers = [m for m in compact.modules() if isinstance(m, CompactDenseLayer)]
    on = widest > 0
    assert [static_run.pointwise_forms(m) for m in layers] == [(on, on, on and m.sfr is not None) for m in layers]
    program = _export(compact, _images(compact, 2))
    for batch in (1, 3):
        x = _images(compact, batch, seed=batch)
        with torch.no_grad():
            assert _rel(compact(x), program.module()(x)) < 1e-4


def test_default_forms_mix_pointwise_and_gemm_layers():
    forms = [static_run.pointwise_forms(m) for m in _compact("cdnv2_tiny").modules()
             if isinstance(m, CompactDenseLayer)]
    assert 0 < sum(f[0] for f in forms) < len(forms) and any(f[1] for f in forms) and any(f[2] for f in forms)


@pytest.mark.parametrize("name", ["cdnv2_tiny", pytest.param("cdnv2_a", marks=pytest.mark.slow)])
def test_compile_fullgraph_captures_the_whole_model(name):
    """Dynamo captures one graph (a host read or a Python cache would break it)."""
    torch._dynamo.reset()
    compact = _compact(name)
    compiled = torch.compile(compact, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        for batch in (2, 5):
            x = _images(compact, batch)
            assert _rel(compact(x), compiled(x)) < 1e-4


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    torch._dynamo.reset()
    compact = _compact("cdnv2_tiny")
    compiled = torch.compile(compact, fullgraph=True)
    x = _images(compact, 4)
    with torch.no_grad():
        assert _rel(compact(x), compiled(x)) < 1e-4


def test_static_buffers_follow_eval_load_and_to_but_stay_out_of_the_state_dict():
    compact = _compact("cdnv2_tiny")
    layer = next(m for m in compact.modules() if isinstance(m, CompactDenseLayer))
    assert not any(k.rsplit(".", 1)[-1] in STATIC_BUFFERS for k in compact.state_dict())
    assert layer.static_ready and layer.static_weight.abs().sum() > 0
    other = _compact("cdnv2_tiny", seed=5)
    other.load_state_dict(compact.state_dict())  # in eval mode: refolded on load
    twin = next(m for m in other.modules() if isinstance(m, CompactDenseLayer))
    assert torch.equal(twin.static_weight, layer.static_weight)
    compact.train()
    assert not layer.static_ready  # a training-mode BN is no fixed map
    with torch.no_grad():
        layer.conv_2.norm.running_var.mul_(4)
    compact.eval()  # refolds
    assert layer.static_ready and not torch.equal(twin.static_weight, layer.static_weight)
    compact.double()
    assert layer.static_weight.dtype == torch.float64  # .to() casts them with the weights
