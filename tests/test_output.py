"""Summary tables and progress text: nothing leaves its box, nothing says what did not happen."""
from __future__ import annotations

from cdnv2.cli.eval import model_description
from cdnv2.engine.health import HealthWindow
from cdnv2.engine.init_from import InitReport
from cdnv2.engine.trainer import progress_loss
from cdnv2.tables import format_grid, format_table


def _box_widths(table: str) -> set[int]:
    return {len(line) for line in table.splitlines()}


def test_a_long_title_stays_inside_its_box():
    title = "int8 vs fp32 (1000 val images of cdnv2_tiny's data; ms per batch, same runtime)"
    table = format_grid(["runtime", "file", "top-1"], [["ort", "m.onnx", "99.1"]], title)
    assert len(_box_widths(table)) == 1, table  # every line exactly as wide as the box
    assert " ".join(table.replace("|", " ").split()).find("same runtime)") >= 0


def test_init_table_wraps_long_cells():
    loaded = [f"features.denseblock_{b}.denselayer_{i}.conv_{k}.weight" for b in range(4) for i in range(20) for k in (1, 2)]
    report = InitReport(
        source="/a/rather/long/folder/name/for/the/weights/converted_cdnv2_a.pth.tar", kind="official",
        model_name="cdnv2_a", structure="compact", weights="ema", condensation="fully condensed (kept)",
        loaded=loaded, reinitialised=["classifier.weight", "classifier.bias"],
        reinit_reason="1000 classes in the file, 10 configured", ignored=[f"extra.{i}" for i in range(30)],
    )
    table = report.table()
    assert len(_box_widths(table)) == 1 and max(_box_widths(table)) <= 100, table
    flat = " ".join(table.replace("|", " ").split())
    assert "extra.29" in flat and "classifier.bias" in flat  # wrapped, not cut


def test_short_tables_are_unchanged():
    assert format_table([("a", "1"), ("bb", "22")]) == (
        "+----+----+\n| a  |  1 |\n| bb | 22 |\n+----+----+"
    )


def test_progress_shows_skip_only_for_skipped_steps():
    assert progress_loss(HealthWindow()) == {}  # a checkpoint already looked at these steps
    assert progress_loss(HealthWindow(loss=0.1234, good=3)) == {"loss": "0.123"}
    assert progress_loss(HealthWindow(bad_steps=[7])) == {"loss": "skip"}


def test_eval_names_kind_and_structure_once():
    r = {"model": "cdnv2_tiny", "kind": "compact", "structure": "compact", "weights": "raw"}
    assert model_description(r) == "cdnv2_tiny (compact, raw weights)"
    assert model_description({**r, "kind": "train", "structure": "masked"}) == "cdnv2_tiny (train, masked, raw weights)"
