"""What a new user meets first: the config tree, the README's command sequence and snippet."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cli, run_like_cli

ROOT = Path(__file__).resolve().parents[1]
# A tiny imagefolder run: seconds on one thread.
TINY = [
    "data.image_size=32", "data.eval_resize=36", "data.batch_size=8", "data.num_workers=0",
    "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.parity_samples=4",
    "trainer.progress=none", "trainer.threads=1",
]


def _image_tree(root: Path, classes=("cat", "dog"), per_split=(8, 4)) -> Path:
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_split):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_top_level_configs_show_the_tree_the_wheel_ships():
    top = ROOT / "configs"
    assert (top / "train.yaml").is_file() and (top / "data" / "imagefolder.yaml").is_file()
    assert (top / "train.yaml").resolve() == (ROOT / "src/cdnv2/configs/train.yaml").resolve()
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cdnv2"]
    assert "configs/**/*.yaml" in globs


@pytest.mark.ci
def test_readme_train_then_finetune_on_the_same_folder(tmp_path):
    """The README's sequence: train on a folder, fine-tune on it, evaluate the fine-tune."""
    readme = (ROOT / "README.md").read_text()
    assert "cdnv2-eval checkpoint=runs/cdnv2_a-imagefolder-finetune-from-converted_cdnv2_a/model_compact.pt" in readme
    images = _image_tree(tmp_path / "images")
    first = ["data=imagefolder", f"data.root={images}", *TINY]
    r = cli("cdnv2-train", *first, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    init = "runs/cdnv2_tiny-imagefolder/model_compact.pt"
    assert (tmp_path / init).is_file()
    r = cli("cdnv2-train", "experiment=finetune", "data=imagefolder", f"data.root={images}", f"init={init}",
            *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tuned = tmp_path / "runs/cdnv2_tiny-imagefolder-finetune-from-model_compact/model_compact.pt"
    assert tuned.is_file()
    r = cli("cdnv2-eval", f"checkpoint={tuned}", "threads=1", "progress=none", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_run_name_suffix():
    from cdnv2.cli.common import run_name_suffix

    assert run_name_suffix(None, None, None) == ""
    assert run_name_suffix("finetune", "/w/converted_cdnv2_a.pth.tar", "x") == "-finetune-from-converted_cdnv2_a-x"
    assert run_name_suffix(None, "a b/c d.pt", None) == "-from-c_d"


@pytest.mark.slow  # cdnv2_b at 224: counting, condensing and the parity check take ~2 min on a loaded 2-core CPU
def test_readme_python_snippet_runs(tmp_path):
    """The README's first Python block, as written, after the quickstart (a stand-in artifact)."""
    import cdnv2
    from cdnv2.checkpoint import save_compact

    block = re.search(r"From Python:\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    tiny = cdnv2.convert_model(cdnv2.condense_fully(cdnv2.create_model("cdnv2_tiny").eval()))
    save_compact(tmp_path / "runs/cdnv2_tiny-shapes/model_compact.pt", tiny, model_name="cdnv2_tiny", model_kwargs={})
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FLOPs" in r.stdout or "flops" in r.stdout.lower(), r.stdout


@pytest.mark.parametrize("model", ["cdnv2_tiny", "cdnv2_a"])
def test_quick_experiment_is_small_for_cifar_and_imagenet_models(model, tmp_path):
    """experiment=quick: 32 px, a few dozen images, 8 steps, every condensation step, convert."""
    from cdnv2.cli.train import compose_train_config

    overrides = ["experiment=quick", f"model={model}", "trainer.threads=1", "trainer.progress=none"]
    cfg = compose_train_config(overrides)
    assert cfg.data.image_size == 32 and cfg.data.num_train <= 64 and cfg.data.num_val <= 32
    assert cfg.trainer.epochs * cfg.trainer.max_steps_per_epoch <= 8
    report = run_like_cli(tmp_path, *overrides)
    assert report["epochs"] == 2 and report["compact"]["parity_max_abs_diff"] < 1e-3
    assert (tmp_path / "model_compact.pt").is_file()
    print(f"{model}: {report['train_seconds']:.1f} s of training")  # measured, not asserted
