"""cdnv2-viz: connectivity matrices against hand computations, and the PNGs it writes."""
import copy
import json
import math
import sys

import pytest
import torch

import cdnv2
from cdnv2.errors import CheckpointError, ConfigError
from cdnv2.models import create_model
from cdnv2.viz import VizError, block_connectivity, connectivity_matrix, lgc_group_mask, read_metrics

from helpers import cli

nan = math.nan
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _same(a, b) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and torch.allclose(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


def test_connectivity_matrix_hand_example():
    # Block input 4 channels, growth 2, three layers, two groups. Layer t reads
    # [block input (4) | layer 1 (2) | layer 2 (2)][: 4 + 2 (t-1)].
    masks = [
        torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]]),
        torch.tensor([[1, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0, 1]]),
        torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]]),
    ]
    # any: channel kept by at least one group. Layer 1: channels 0,1,2 of 4 -> 0.75.
    # Layer 2: input {0} of 4 -> 0.25, layer-1 channels {4,5} -> 1. Layer 3: only 6,7.
    assert _same(connectivity_matrix(masks, 4, 2, "any"), [[0.75, nan, nan], [0.25, 1.0, nan], [0.0, 0.0, 1.0]])
    # mean over groups: layer 1 per channel (.5, 1, .5, 0) -> 0.5; layer 2 input (1,0,0,0)
    # -> 0.25, layer-1 channels (.5, 1) -> 0.75; layer 3 layer-2 channels (.5, 1) -> 0.75.
    assert _same(connectivity_matrix(masks, 4, 2, "mean"), [[0.5, nan, nan], [0.25, 0.75, nan], [0.0, 0.0, 0.75]])
    # a layer without the connection (no SFR) is a NaN row
    assert _same(connectivity_matrix([None, masks[1]], 4, 2), [[nan, nan], [0.25, 1.0]])
    with pytest.raises(ValueError, match="expected \\(groups, 6\\)"):
        connectivity_matrix([masks[0], masks[0]], 4, 2)


def _fully_condensed_tiny() -> torch.nn.Module:
    return cdnv2.condense_fully(create_model("cdnv2_tiny").eval())


def test_block_connectivity_from_masks_matches_a_hand_count():
    model = _fully_condensed_tiny()
    blocks = block_connectivity(model)
    assert [b.name for b in blocks] == ["features.denseblock_1", "features.denseblock_2", "features.denseblock_3"]
    b2 = blocks[1]
    assert (b2.block_in, b2.growth) == (32, 16) and b2.lgc.shape == (3, 3)
    # Layer 3 of block 2 straight from the raw masks: an input channel is read when any
    # output row of the LGC mask keeps it; an earlier channel is rewritten when any SFR
    # input column writes to it. Sources: block input 0..31, layer 1 32..47, layer 2 48..63.
    layer = model.features.denseblock_2.denselayer_3
    read = layer.conv_1.mask.flatten(1).amax(0) > 0  # (64,)
    written = layer.sfr.mask.flatten(1).amax(1) > 0  # (64,)
    segments = [(0, 32), (32, 48), (48, 64)]
    for s, (a, b) in enumerate(segments):
        assert b2.lgc[2, s].item() == pytest.approx(read[a:b].float().mean().item())
        assert b2.sfr[2, s].item() == pytest.approx(written[a:b].float().mean().item())
    # with C=4 every group keeps a quarter, so at least a quarter of the channels are read
    assert torch.nanmean(b2.lgc).item() >= 0.25


def test_hand_set_masks_and_compact_forms_agree():
    model = create_model("cdnv2_tiny").eval()
    lgc = model.features.denseblock_1.denselayer_2.conv_1  # 24 inputs = 16 block input + 8 layer 1
    gm = torch.zeros(lgc.groups, 24, dtype=torch.bool)
    gm[:, 16:] = True  # every group reads only layer 1's output
    lgc._set_group_mask(gm)
    m = block_connectivity(model)[0].lgc
    assert m[1, 0].item() == 0.0 and m[1, 1].item() == 1.0
    assert m[0, 0].item() == 1.0  # untouched layer: dense

    condensed = _fully_condensed_tiny()
    compact = cdnv2.convert_model(condensed)
    train_form = copy.deepcopy(condensed)
    cdnv2.to_compact_training(train_form)
    ref = block_connectivity(condensed, "mean")
    for other in (compact, train_form):
        got = block_connectivity(other, "mean")
        for a, b in zip(ref, got):
            assert _same(a.lgc, b.lgc) and _same(a.sfr, b.sfr)
    assert torch.equal(lgc_group_mask(compact.features.denseblock_1.denselayer_1.conv_1),
                       condensed.features.denseblock_1.denselayer_1.conv_1.group_mask())


def test_models_without_learned_connectivity_are_refused():
    with pytest.raises(VizError, match="no dense blocks with learned group convolutions"):
        block_connectivity(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    from cdnv2.viz import plot_curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(VizError, match=r"pip install 'cdnv2\[viz\]'"):
        plot_curves({"train/loss": ([1], [1.0])}, tmp_path / "c.png")


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The session's tiny run, every step logged (read-only)."""
    return tiny_run


def test_viz_command_draws_curves_and_connectivity(run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing needs the cdnv2[viz] extra")
    r = cli("cdnv2-viz", f"run_dir={run_dir}", f"out={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("curves.png", "connectivity.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    # the JSON beside the picture holds the matrices of the run's last checkpoint
    saved = json.loads((tmp_path / "connectivity.json").read_text())
    assert saved["checkpoint"].endswith("checkpoints/last.pt") and saved["structure"] == "compact_train"
    model = cdnv2.load_model(run_dir / "checkpoints/last.pt")
    for block, ref in zip(saved["blocks"], block_connectivity(model)):
        assert _same([[nan if v is None else v for v in row] for row in block["lgc"]], ref.lgc)
    series = read_metrics(run_dir / "metrics.jsonl")
    assert {"val/top1", "train/loss", "train/lr", "condense/density_lgc"} <= set(series)


def test_viz_compact_artifact_and_errors(run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing needs the cdnv2[viz] extra")
    from cdnv2.cli.viz import VizConfig, run

    written = run(VizConfig(checkpoint=str(run_dir / "model_compact.pt"), out=str(tmp_path), reduce="mean"))
    assert set(written) == {"connectivity", "connectivity_json"}
    assert (tmp_path / "connectivity.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(CheckpointError, match="no such file"):
        run(VizConfig(checkpoint=str(tmp_path / "nope.pt")))
    with pytest.raises(ConfigError, match="checkpoint=PATH"):
        run(VizConfig())


def _drawn_figure(monkeypatch, draw):
    """Run ``draw`` and return the figure it closed (matplotlib's own state, read back)."""
    plt = pytest.importorskip("matplotlib.pyplot", reason="drawing needs the cdnv2[viz] extra")
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    draw()
    return figures[-1]


def test_connectivity_colours_span_the_datas_range(monkeypatch, tmp_path):
    from cdnv2.viz import BlockConnectivity, color_range, plot_connectivity

    m = torch.tensor([[0.56, nan], [0.75, 0.6]], dtype=torch.float64)
    blocks = [BlockConnectivity("features.denseblock_1", 4, 2, m, None)]
    assert color_range(blocks) == pytest.approx((0.56, 0.75))
    fig = _drawn_figure(monkeypatch, lambda: plot_connectivity(blocks, tmp_path / "c.png"))
    assert fig.axes[0].images[0].get_clim() == pytest.approx((0.56, 0.75))
    flat = [BlockConnectivity("b", 4, 2, torch.full((1, 1), 0.5, dtype=torch.float64), None)]
    assert color_range(flat) == pytest.approx((0.475, 0.525))  # one value: a narrow scale, not 0/0


def test_curves_mark_condensation_steps_and_clip_the_spike(monkeypatch, tmp_path):
    from cdnv2.viz import plot_curves

    steps = list(range(1, 41))
    loss = [2.0 - 0.03 * s for s in steps]
    loss[20] = 40.0  # the val-loss spike right after a pruning step
    series = {"train/loss": (steps, loss), "condense/density_lgc": ([10, 20], [0.5, 0.25])}
    fig = _drawn_figure(monkeypatch, lambda: plot_curves(series, tmp_path / "curves.png"))
    loss_ax = next(ax for ax in fig.axes if ax.get_title() == "loss")
    low, high = loss_ax.get_ylim()
    assert high < 5.0 and low < min(loss)  # the spike is cut, the rest keeps its scale
    for ax in fig.axes:
        marked = {line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1}
        assert {10, 20} <= marked, ax.get_title()
