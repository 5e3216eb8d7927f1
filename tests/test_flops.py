"""FLOPs and params against the papers (SPEC 2 counting rules)."""
import pytest

import cdnv2

# (model, input size, paper-rule MFLOPs, M params, tolerance in the papers' rounding)
PAPER = [
    ("cdnv2_a", 224, 45.87, 2.04, 0.005),
    ("cdnv2_b", 224, 146.47, 3.59, 0.005),
    ("cdnv2_c", 224, 309.74, 6.18, 0.005),
    ("condensenet_74_c4", 224, 529, 4.8, 0.5),
    ("condensenet_74_c8", 224, 274, 2.9, 0.5),
    ("condensenet_50", 32, 28.6, 0.22, 0.05),
    ("condensenet_74", 32, 51.9, 0.41, 0.05),
    ("condensenet_86", 32, 65.8, 0.52, 0.05),
    ("condensenet_98", 32, 81.3, 0.65, 0.05),
    ("condensenet_110", 32, 98.2, 0.79, 0.05),
    ("condensenet_122", 32, 116.7, 0.95, 0.05),
]


@pytest.mark.parametrize("name,size,mflops,mparams,tol", PAPER)
def test_paper_rule_counts(name, size, mflops, mparams, tol):
    report = cdnv2.count_cost(cdnv2.create_model(name), (3, size, size))
    assert report.paper_flops / 1e6 == pytest.approx(mflops, abs=tol)
    # params are published to 2 significant decimals
    assert report.paper_params / 1e6 == pytest.approx(mparams, abs=max(tol, 0.005))


@pytest.mark.parametrize("name,mflops", [("cdnv2_a", 153.0), ("cdnv2_b", 463.5), ("cdnv2_c", 1403.8)])
def test_masked_model_executes_dense_cost(name, mflops):
    report = cdnv2.count_cost(cdnv2.create_model(name))
    assert report.exec_flops / 1e6 == pytest.approx(mflops, abs=0.05)
    assert report.params == sum(p.numel() for p in cdnv2.create_model(name).parameters())


def test_per_layer_breakdown_sums_to_totals():
    report = cdnv2.count_cost(cdnv2.create_model("cdnv2_tiny"), (3, 32, 32))
    assert sum(r.paper_flops for r in report.layers) == pytest.approx(report.paper_flops)
    lgc = [r for r in report.layers if r.kind == "LearnedGroupConv"]
    assert lgc and all(r.exec_flops == pytest.approx(4 * r.paper_flops) for r in lgc)
    d = report.as_dict()
    assert d["units"]["flops"].startswith("multiply-adds")
