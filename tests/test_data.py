"""cdnv2.data: every dataset on generated files, seeding, resume, sharding, bad data."""
from __future__ import annotations

import json
import logging
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cdnv2.data import (
    SHAPES_CLASSES,
    DataConfig,
    DataError,
    RandAugmentNoise,
    ShardSampler,
    TrainBatchSampler,
    build_data,
    build_eval_transform,
    make_shapes,
    mixup_cutmix,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "cdnv2" / "configs" / "data"
CLASSES = ["cat", "dog", "fish"]
# The paper's ImageNet train pipeline at a small crop, so tests stay fast.
IMAGENET_LIKE = dict(
    image_size=24, eval_resize=28, interpolation="bicubic", random_resized_crop=True,
    randaugment_magnitude=9.0, random_erasing=0.5, batch_size=4,
)


# ------------------------------------------------------------------ generated data
def _write_image(path: Path, seed: int, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_tree(root: Path, classes=CLASSES, per_class=(6, 3), splits=("train", "val")) -> Path:
    """root/<split>/<class>/ with JPEG and PNG files of different sizes."""
    seed = 0
    for split, n in zip(splits, per_class):
        for c in classes:
            for i in range(n):
                ext = "jpg" if i % 2 == 0 else "png"
                size = (40 + 3 * i, 30 + 2 * i)
                folder = root / split / c if split else root / c
                _write_image(folder / f"{c}_{i}.{ext}", seed, size)
                seed += 1
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return _make_tree(tmp_path / "imgs")


def _write_cifar(root: Path, name: str, n: int = 12) -> Path:
    """Tiny CIFAR files in torchvision's on-disk layout (the pickles it reads)."""
    rng = np.random.default_rng(0)

    def dump(path: Path, obj) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        for part in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            labels = [int(v) for v in rng.integers(0, 10, n)]
            dump(folder / part, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": labels})
        dump(folder / "batches.meta", {"label_names": [f"c10_{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        for part, m in (("train", 5 * n), ("test", n)):
            labels = [int(v) for v in rng.integers(0, 100, m)]
            dump(folder / part, {
                "data": rng.integers(0, 256, (m, 3072), dtype=np.uint8),
                "fine_labels": labels, "coarse_labels": [v // 5 for v in labels],
            })
        dump(folder / "meta", {"fine_label_names": [f"c100_{i}" for i in range(100)], "coarse_label_names": []})
    return root


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ------------------------------------------------------------------ shapes
def test_shapes_deterministic_balanced_and_fast():
    t0 = time.perf_counter()
    x, y = make_shapes(12000, seed=5)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"generating 12k shapes took {elapsed:.1f}s"  # ~0.5 s on 2 idle cores
    assert x.shape == (12000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [1200] * 10
    a, b = make_shapes(500, seed=5), make_shapes(500, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], make_shapes(500, seed=6)[0])
    counts = torch.bincount(make_shapes(1003, seed=0)[1], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1003
    # Colours vary per image: no class is identifiable by its mean colour.
    means = x.float().mean((1, 2, 3))
    class_means = torch.stack([means[y == c].mean() for c in range(10)])
    assert class_means.std() < 3.0, class_means


def test_shapes_build_data_defaults():
    data = build_data(DataConfig(num_train=500, num_val=120, batch_size=32), seed=0)
    assert data.class_names == list(SHAPES_CLASSES) and data.num_classes == 10
    assert data.input_size == (3, 32, 32)
    assert data.steps_per_epoch == 500 // 32 == len(data.train_loader)
    x, y = next(iter(data.train_loader))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3  # normalised
    val = _batches(data.val_loader)
    assert sum(len(yb) for _, yb in val) == 120
    assert torch.bincount(torch.cat([yb for _, yb in val]), minlength=10).tolist() == [12] * 10
    # Train and val come from different streams of the seed; the seed changes the data.
    other = build_data(DataConfig(num_train=500, num_val=120, batch_size=32), seed=1)
    assert not torch.equal(_batches(other.val_loader)[0][0], val[0][0])


# ------------------------------------------------------------------ every dataset builds
def _cfg_for(kind: str, tmp_path: Path) -> tuple[DataConfig, list[str], int, int]:
    """(config, class names, train size, val size) of one dataset option on generated files."""
    if kind == "shapes":
        return DataConfig(num_train=64, num_val=20, batch_size=8), list(SHAPES_CLASSES), 64, 20
    if kind in ("cifar10", "cifar100"):
        root = _write_cifar(tmp_path / "cifar", kind)
        n_cls = 10 if kind == "cifar10" else 100
        names = [f"c{n_cls}_{i}" for i in range(n_cls)]
        return DataConfig(name=kind, root=str(root), batch_size=8, crop_padding=4), names, 60, 12
    if kind == "imagefolder_split":
        root = _make_tree(tmp_path / "flat", per_class=(10,), splits=("",))
        cfg = DataConfig(name="imagefolder", root=str(root), val_fraction=0.2, image_size=16, batch_size=4)
        return cfg, CLASSES, 24, 6
    root = _make_tree(tmp_path / "tree")
    name = "imagenet" if kind == "imagenet" else "imagefolder"
    return DataConfig(name=name, root=str(root), **IMAGENET_LIKE), CLASSES, 18, 9


@pytest.mark.parametrize("kind", ["shapes", "cifar10", "cifar100", "imagefolder", "imagefolder_split", "imagenet"])
def test_every_dataset_builds_loaders(kind, tmp_path):
    cfg, names, n_train, n_val = _cfg_for(kind, tmp_path)
    data = build_data(cfg, seed=0)
    size = cfg.image_size
    assert data.class_names == names and data.num_classes == len(names)
    assert data.input_size == (3, size, size)
    assert data.steps_per_epoch == n_train // cfg.batch_size
    train = _batches(data.train_loader)
    assert len(train) == data.steps_per_epoch
    for x, y in train:
        assert x.shape == (cfg.batch_size, 3, size, size) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < len(names)
        assert torch.isfinite(x).all()
    val = _batches(data.val_loader)
    assert sum(len(y) for _, y in val) == n_val
    assert all(x.shape[1:] == (3, size, size) for x, _ in val)
    # The eval transform is deterministic and rebuilt from primitives alone.
    assert _same(val, _batches(data.val_loader))
    json.dumps(data.eval_preprocess)


def test_eval_transform_rebuilt_from_dict(tree):
    data = build_data(DataConfig(name="imagefolder", root=str(tree), **IMAGENET_LIKE), seed=0)
    pre = data.eval_preprocess
    assert pre == {
        "resize": 28, "crop": 24, "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    }
    transform = build_eval_transform(json.loads(json.dumps(pre)))
    first = Image.open(sorted((tree / "val" / "cat").iterdir())[0]).convert("RGB")
    x_val, _ = next(iter(data.val_loader))
    assert torch.allclose(transform(first), x_val[0])


def test_folder_class_names_and_labels(tree):
    data = build_data(DataConfig(name="imagefolder", root=str(tree), batch_size=3, image_size=16), seed=0)
    src = data.val_loader.dataset.source
    for path, label in zip(src.paths, src.targets):
        assert Path(path).parent.name == CLASSES[label]


def test_stratified_split_is_fixed_and_disjoint(tmp_path):
    root = _make_tree(tmp_path / "flat", per_class=(10,), splits=("",))
    cfg = DataConfig(name="imagefolder", root=str(root), val_fraction=0.3, image_size=16, batch_size=4)
    a = build_data(cfg, seed=0)
    b = build_data(cfg, seed=123)  # the run's seed does not move the split
    va, vb = a.val_loader.dataset.source, b.val_loader.dataset.source
    assert list(va.paths) == list(vb.paths)
    assert np.bincount(va.targets).tolist() == [3, 3, 3]
    assert not set(va.paths) & set(a.train_loader.dataset.source.paths)
    c = build_data(replace(cfg, split_seed=1), seed=0)
    assert list(c.val_loader.dataset.source.paths) != list(va.paths)


def test_imagenet_warns_on_class_count(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="cdnv2.data"):
        build_data(DataConfig(name="imagenet", root=str(tree), **IMAGENET_LIKE), seed=0)
    assert "found 3 classes" in caplog.text and "expected 1000" in caplog.text


# ------------------------------------------------------------------ seeding and resume
def test_batches_do_not_depend_on_workers(tree):
    cfg = DataConfig(name="imagenet", root=str(tree), **IMAGENET_LIKE)
    runs = {}
    for workers in (0, 2):
        data = build_data(replace(cfg, num_workers=workers), seed=7)
        epochs = []
        for epoch in range(2):
            data.set_epoch(epoch)
            epochs.append(_batches(data.train_loader))
        runs[workers] = (epochs, _batches(data.val_loader))
    assert _same(runs[0][0][0], runs[2][0][0]) and _same(runs[0][0][1], runs[2][0][1])
    assert _same(runs[0][1], runs[2][1])
    assert not _same(runs[0][0][0], runs[0][0][1])  # a new epoch, new order and augmentation
    other = build_data(cfg, seed=8)
    assert not _same(_batches(other.train_loader), runs[0][0][0])


def test_augmentation_seed_includes_the_epoch():
    """A sample's augmentation depends on (seed, epoch, index), not on the index alone."""
    data = build_data(DataConfig(num_train=16, num_val=10, batch_size=16, crop_padding=4), seed=0)
    dataset = data.train_loader.dataset
    assert all(torch.equal(dataset[(0, i)].image, dataset[(0, i)].image) for i in range(16))
    assert not all(torch.equal(dataset[(0, i)].image, dataset[(1, i)].image) for i in range(16))


def test_mid_epoch_start_gives_the_remaining_batches():
    cfg = DataConfig(num_train=200, num_val=20, batch_size=16, crop_padding=4)
    data = build_data(cfg, seed=3)
    data.set_epoch(2)
    full = _batches(data.train_loader)
    assert len(full) == data.steps_per_epoch == 12
    resumed = build_data(cfg, seed=3)  # a fresh process after a restart
    resumed.set_epoch(2, start_batch=5)
    assert len(resumed.train_loader) == 7
    assert _same(_batches(resumed.train_loader), full[5:])
    resumed.set_epoch(3)
    assert len(resumed.train_loader) == 12
    with pytest.raises(ValueError, match="start_batch"):
        resumed.set_epoch(3, start_batch=13)


def test_loading_leaves_the_global_rng_alone():
    data = build_data(DataConfig(num_train=64, num_val=10, batch_size=16, crop_padding=4), seed=0)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    _batches(data.train_loader)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ distributed sampling
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 11])
def test_shard_sampler_covers_each_sample_once(world_size, n):
    shards = [list(ShardSampler(n, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_val_loaders_cover_each_sample_once(world_size):
    cfg = DataConfig(num_train=60, num_val=31, batch_size=6, eval_batch_size=6)
    reference = torch.cat([x for x, _ in build_data(cfg, seed=0).val_loader])
    seen = []
    for rank in range(world_size):
        data = build_data(cfg, seed=0, rank=rank, world_size=world_size)
        seen += [img for x, _ in data.val_loader for img in x]
    assert len(seen) == 31
    keys = sorted(img.flatten()[:64].tolist() for img in seen)
    assert keys == sorted(img.flatten()[:64].tolist() for img in reference)


def test_train_sampler_splits_ranks_and_resumes():
    ranks = [TrainBatchSampler(50, 4, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(4)
    batches = [list(s) for s in ranks]
    assert all(len(b) == 4 == s.steps_per_epoch for b, s in zip(batches, ranks))  # 50 // 3 = 16 -> 4 batches
    flat = [key for b in batches for batch in b for key in batch]
    assert all(epoch == 4 for epoch, _ in flat)
    assert len({i for _, i in flat}) == len(flat)  # no sample on two ranks
    ranks[1].set_epoch(4, start_batch=3)
    assert list(ranks[1]) == batches[1][3:]
    with pytest.raises(DataError, match="too few"):
        TrainBatchSampler(5, 4, seed=0, rank=0, world_size=2)


def test_batch_size_must_divide_by_world_size():
    with pytest.raises(DataError, match="multiple of the world size 3"):
        build_data(DataConfig(batch_size=64), seed=0, rank=0, world_size=3)
    data = build_data(DataConfig(num_train=100, num_val=10, batch_size=64), seed=0, rank=1, world_size=2)
    assert next(iter(data.train_loader))[0].shape[0] == 32


# ------------------------------------------------------------------ bad data
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_raises_naming_the_file(tree, workers):
    bad = tree / "train" / "dog" / "dog_2.jpg"
    _truncate(bad)
    data = build_data(DataConfig(name="imagefolder", root=str(tree), num_workers=workers, **IMAGENET_LIKE), seed=0)
    with pytest.raises(DataError) as info:
        _batches(data.train_loader)
    msg = str(info.value)
    assert str(bad) in msg and "data.on_corrupt=skip" in msg
    assert "Traceback" not in msg and "worker" not in msg


def test_corrupt_image_skip_counts_and_logs(tree, caplog):
    bad_train = tree / "train" / "dog" / "dog_2.jpg"
    bad_val = tree / "val" / "fish" / "fish_1.png"
    _truncate(bad_train)
    bad_val.write_bytes(b"not an image")
    cfg = DataConfig(name="imagefolder", root=str(tree), on_corrupt="skip", **IMAGENET_LIKE)
    data = build_data(cfg, seed=0)
    with caplog.at_level(logging.WARNING, logger="cdnv2.data"):
        train = _batches(data.train_loader)
        val = _batches(data.val_loader)
    assert len(train) == data.steps_per_epoch and all(len(y) == cfg.batch_size for _, y in train)
    assert sum(len(y) for _, y in val) == 8  # the unreadable val image is dropped, not replaced
    assert data.train_loader.num_skipped == 1 and data.val_loader.num_skipped == 1 and data.num_skipped == 2
    assert str(bad_train) in caplog.text and str(bad_val) in caplog.text
    # Skipping is deterministic too: the same replacement with workers.
    again = build_data(replace(cfg, num_workers=2), seed=0)
    assert _same(_batches(again.train_loader), train)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*train/<class>/<image>"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "nope")), seed=0)
    with pytest.raises(DataError, match="data.root is not set"):
        build_data(DataConfig(name="imagenet"), seed=0)


def test_missing_train_folder(tree):
    import shutil

    shutil.rmtree(tree / "train")
    with pytest.raises(DataError, match="has val/ but no train/ folder"):
        build_data(DataConfig(name="imagenet", root=str(tree)), seed=0)


def test_missing_val_folder_suggests_val_fraction(tree):
    import shutil

    shutil.rmtree(tree / "val")
    with pytest.raises(DataError, match=r"has no val/ folder.*data.val_fraction"):
        build_data(DataConfig(name="imagefolder", root=str(tree)), seed=0)
    data = build_data(DataConfig(name="imagefolder", root=str(tree), val_fraction=0.4, batch_size=2), seed=0)
    assert len(data.val_loader.dataset) == 6  # round(0.4 * 6) = 2 per class
    assert data.class_names == CLASSES


def test_empty_class_folder(tree):
    (tree / "train" / "empty").mkdir()
    (tree / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/empty has no image files"):
        build_data(DataConfig(name="imagefolder", root=str(tree)), seed=0)


def test_unsorted_val_folder_is_explained(tree):
    import shutil

    for f in (tree / "val").rglob("*.jpg"):
        shutil.move(f, tree / "val" / f.name)
    for d in (tree / "val").iterdir():
        if d.is_dir():
            shutil.rmtree(d)
    with pytest.raises(DataError, match="images must be sorted into one folder per class"):
        build_data(DataConfig(name="imagenet", root=str(tree)), seed=0)


def test_val_class_unknown_to_train(tree):
    _write_image(tree / "val" / "zebra" / "z.png", 0)
    with pytest.raises(DataError, match="class folders that train/ does not have: zebra"):
        build_data(DataConfig(name="imagefolder", root=str(tree)), seed=0)


def _folder_sources(root: Path):
    from cdnv2.data.folders import build_folder_datasets

    train, val, classes = build_folder_datasets(str(root), "imagefolder", 0.0, 0)
    return train, val, classes


def _labels_match_real_folders(files, classes) -> None:
    real = [Path(p).resolve() for p in files.paths]
    assert len(set(real)) == len(real), "an image was counted twice"
    for path, label in zip(real, files.targets):
        assert path.parent.name.split("_")[0] == classes[label] or path.parent.parent.name == classes[label], path


@pytest.mark.timeout(60)
def test_symlink_loops_neither_hang_nor_mislabel(tree, caplog):
    train = tree / "train"
    (train / "cat" / "sub").mkdir()
    _write_image(train / "cat" / "sub" / "deep.png", 99)
    (train / "cat" / "loop_to_split").symlink_to(train, target_is_directory=True)  # back up the tree
    (train / "dog" / "loop_to_self").symlink_to(train / "dog", target_is_directory=True)
    (train / "cat" / "sub" / "loop_up").symlink_to(train / "cat", target_is_directory=True)
    (train / "fish" / "into_dog").symlink_to(train / "dog", target_is_directory=True)  # another class
    with caplog.at_level(logging.WARNING):
        files, _, classes = _folder_sources(tree)
    assert classes == CLASSES
    counts = np.bincount(files.targets, minlength=3).tolist()
    assert counts == [7, 6, 6]  # cat has its 6 images plus sub/deep.png; nothing else
    _labels_match_real_folders(files, classes)
    assert any("skipped 4 link(s)" in r.getMessage() for r in caplog.records)


def test_links_to_new_folders_are_followed(tree, tmp_path):
    elsewhere = tmp_path / "other_disk" / "birds"
    for i in range(3):
        _write_image(elsewhere / f"bird_{i}.png", 200 + i)
    (tree / "train" / "bird").symlink_to(elsewhere, target_is_directory=True)  # a class folder link
    (tree / "train" / "cat" / "more").symlink_to(tmp_path / "other_disk", target_is_directory=False)
    files, _, classes = _folder_sources(tree)
    assert classes == ["bird", "cat", "dog", "fish"]
    assert np.bincount(files.targets).tolist() == [3, 6, 6, 6]  # cat/more/birds was scanned as bird already


def test_two_class_folders_that_are_one_folder(tree):
    (tree / "train" / "kitten").symlink_to(tree / "train" / "cat", target_is_directory=True)
    with pytest.raises(DataError, match=r"train/cat and .*train/kitten are the same folder"):
        _folder_sources(tree)


def test_fewer_than_two_classes_is_a_clear_error(tmp_path):
    root = _make_tree(tmp_path / "one", classes=["only"])
    with pytest.raises(DataError, match=r"has 1 class folder \(only\); a classifier needs at least two"):
        build_data(DataConfig(name="imagefolder", root=str(root)), seed=0)
    flat = _make_tree(tmp_path / "flat", classes=["only"], per_class=(6,), splits=("",))
    with pytest.raises(DataError, match="at least two classes"):
        build_data(DataConfig(name="imagefolder", root=str(flat), val_fraction=0.5), seed=0)


def _gradient(dtype, top) -> np.ndarray:
    return (np.linspace(0, 1, 64 * 64).reshape(64, 64) * top).astype(dtype)


@pytest.mark.parametrize(
    "array, suffix, mode",
    [
        (_gradient(np.uint16, 65535), "png", "I;16"),  # 16-bit PNG
        (_gradient(np.int32, 65535), "tif", "I"),  # 16-bit values in PIL's 32-bit mode
        (_gradient(np.int32, 2**31 - 1), "tif", "I"),  # 32-bit values
        ((_gradient(np.float64, 2**32 - 1) - 2**31).astype(np.int32), "tif", "I"),  # signed 32-bit
        (_gradient(np.float32, 1.0), "tif", "F"),  # float in [0, 1]
        (_gradient(np.float32, 255.0), "tif", "F"),  # float in 8-bit units
        (_gradient(np.float32, 4000.0) - 1000, "tif", "F"),  # any other range: stretched
    ],
    ids=["png16", "tiff-int16", "tiff-int32", "tiff-int32-signed", "tiff-float01", "tiff-float255", "tiff-float-range"],
)
def test_wide_images_are_scaled_not_clipped(tmp_path, array, suffix, mode):
    from cdnv2.data.folders import load_image

    path = tmp_path / f"wide.{suffix}"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(load_image(str(path)))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    expected = np.linspace(0, 255, 64 * 64).reshape(64, 64)
    assert np.abs(rgb[..., 0].astype(float) - expected).max() <= 1.5  # a full 0..255 ramp
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def test_wide_images_train_end_to_end(tmp_path):
    root = tmp_path / "wide"
    for split, n in (("train", 4), ("val", 2)):
        for c, top in (("a", 65535), ("b", 30000)):
            for i in range(n):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(_gradient(np.uint16, top)).save(root / split / c / f"{i}.png")
    data = build_data(DataConfig(name="imagefolder", root=str(root), batch_size=4, image_size=64,
                                 mean=[0.0] * 3, std=[1.0] * 3, hflip=False), seed=0)
    x, y = next(iter(data.val_loader))
    peak = {int(label): float(img.max()) for img, label in zip(x, y)}
    assert peak[0] == pytest.approx(1.0, abs=0.02) and peak[1] == pytest.approx(30000 / 65535, abs=0.02)


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(DataError) as info:
        build_data(DataConfig(name=name, root=str(tmp_path)), seed=0)
    msg = str(info.value)
    assert str(tmp_path / folder) in msg and "data.download=true" in msg and "https://www.cs.toronto.edu" in msg


def test_relative_roots_are_shown_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / "rel" / "cifar-10-batches-py")):
        build_data(DataConfig(name="cifar10", root="rel"), seed=0)
    with pytest.raises(DataError, match=rf"data.root=rel \({tmp_path / 'rel'}\) does not exist"):
        build_data(DataConfig(name="imagefolder", root="rel"), seed=0)


def test_truncated_cifar_file_is_named(tmp_path):
    root = _write_cifar(tmp_path, "cifar10")
    _truncate(root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        build_data(DataConfig(name="cifar10", root=str(root)), seed=0)


def test_config_errors_are_data_errors():
    with pytest.raises(DataError, match="did you mean cifar10"):
        build_data(DataConfig(name="cifar1O"), seed=0)
    with pytest.raises(DataError, match="on_corrupt"):
        build_data(DataConfig(on_corrupt="ignore"), seed=0)
    with pytest.raises(DataError, match="interpolation"):
        build_data(DataConfig(interpolation="lanczos"), seed=0)
    with pytest.raises(DataError, match="3 values"):
        build_data(DataConfig(mean=[0.5]), seed=0)


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["shapes", "cifar10", "cifar100", "imagenet", "imagefolder"])
def test_yaml_matches_schema(name):
    path = CONFIG_DIR / f"{name}.yaml"
    raw = OmegaConf.load(path)
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)
    assert merged.name == name
    text = path.read_text().splitlines()
    uncommented = [line for line in text if line.strip() and not line.startswith("#") and "#" not in line]
    assert not uncommented, f"{path.name}: keys without a comment: {uncommented}"


def test_yaml_recipes():
    load = lambda n: OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIG_DIR / f"{n}.yaml"))  # noqa: E731
    imagenet = load("imagenet")
    assert (imagenet.batch_size, imagenet.image_size, imagenet.eval_resize) == (1024, 224, 256)
    assert imagenet.interpolation == "bicubic" and imagenet.random_resized_crop
    assert (imagenet.randaugment_magnitude, imagenet.randaugment_mstd, imagenet.random_erasing) == (9, 0.5, 0.2)
    for n in ("cifar10", "cifar100"):
        cifar = load(n)
        assert (cifar.batch_size, cifar.crop_padding, cifar.hflip, cifar.download) == (64, 4, True, False)
    shapes = OmegaConf.to_object(load("shapes"))
    assert isinstance(shapes, DataConfig) and shapes.randaugment_magnitude is None
    with pytest.raises(Exception, match="typo_key"):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"typo_key": 1})


def test_shapes_yaml_builds():
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIG_DIR / "shapes.yaml")))
    cfg.num_train, cfg.num_val = 256, 64
    data = build_data(cfg, seed=0)
    assert data.num_classes == 10 and next(iter(data.train_loader))[0].shape == (64, 3, 32, 32)


# ------------------------------------------------------------------ transforms
def test_randaugment_magnitude_noise():
    ra = RandAugmentNoise(magnitude=9, magnitude_std=0.5, num_magnitude_bins=11)
    torch.manual_seed(0)
    m = torch.tensor([ra.sample_magnitude() for _ in range(4000)])
    assert abs(float(m.mean()) - 9.0) < 0.05 and 0.4 < float(m.std()) < 0.55
    assert float(m.max()) <= 10.0 and float(m.min()) >= 0.0
    edge = RandAugmentNoise(magnitude=10, magnitude_std=0.5, num_magnitude_bins=11)
    assert max(edge.sample_magnitude() for _ in range(200)) == 10.0  # clipped, not beyond the scale
    exact = RandAugmentNoise(magnitude=9, magnitude_std=0.0)
    assert {exact.sample_magnitude() for _ in range(10)} == {9.0}
    with pytest.raises(DataError, match="outside the scale"):
        RandAugmentNoise(magnitude=12, num_magnitude_bins=11)


def test_randaugment_strength_is_interpolated(monkeypatch):
    """Magnitude 9.5 on 11 bins rotates by 28.5 degrees (30 * 9.5 / 10)."""
    import cdnv2.data.transforms as tr

    calls = []
    monkeypatch.setattr(tr, "_apply_op", lambda img, name, mag, **kw: calls.append((name, mag)) or img)
    ra = RandAugmentNoise(num_ops=200, magnitude=9.5, magnitude_std=0.0)
    ra(Image.new("RGB", (32, 32)))
    rot = [abs(m) for n, m in calls if n == "Rotate"]
    post = [m for n, m in calls if n == "Posterize"]
    assert rot and rot == pytest.approx([28.5] * len(rot))
    assert post and all(float(m).is_integer() for m in post)


def test_imagenet_train_pipeline_changes_images(tree):
    data = build_data(DataConfig(name="imagenet", root=str(tree), **IMAGENET_LIKE), seed=0)
    ops = [type(t).__name__ for t in data.train_loader.dataset.transform.transforms]
    assert ops == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugmentNoise", "ToFloatTensor", "Normalize", "RandomErasing"]
    erasing = data.train_loader.dataset.transform.transforms[-1]
    assert erasing.value == "random" and erasing.p == 0.5


# ------------------------------------------------------------------ mixup / cutmix
def test_mixup_cutmix():
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 5
    same_x, onehot = mixup_cutmix(x, y, 5, 0.0, 0.0)
    assert same_x is x and torch.equal(onehot, torch.nn.functional.one_hot(y, 5).float())

    a = mixup_cutmix(x, y, 5, 0.8, 0.0, torch.Generator().manual_seed(1))
    b = mixup_cutmix(x, y, 5, 0.8, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lam = float(a[1][0, y[0]])  # x[0] mixes with x[7] (a different class)
    assert torch.allclose(a[0], lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(a[1].sum(1), torch.ones(8))

    for seed in range(5):
        mixed, soft = mixup_cutmix(x, y, 5, 0.0, 1.0, torch.Generator().manual_seed(seed))
        kept = (mixed[0] == x[0]).all(0).float().mean()  # pixels of x[0] left in place
        assert torch.allclose(soft[0, y[0]], kept) and torch.allclose(soft.sum(1), torch.ones(8))
        assert torch.equal(x, x.clone())  # input untouched
    picks = {
        bool(((mixup_cutmix(x, y, 5, 1.0, 1.0, torch.Generator().manual_seed(s))[0] - x).abs() < 1e-7).any())
        for s in range(20)
    }
    assert picks == {True, False}  # both modes chosen: CutMix keeps pixels exactly, mixup does not


# ------------------------------------------------------------------ learnability (slow)
@pytest.mark.slow
def test_shapes_is_learnable_by_a_cnn_not_by_a_linear_model():
    """A small CNN reaches > 90% val accuracy in a few CPU minutes; logistic regression
    on pixels stays far below (the class lives in geometry, not in colour or position)."""
    from torch import nn

    data = build_data(DataConfig(num_train=10000, num_val=2000, batch_size=128), seed=0)

    def fit(model: nn.Module, epochs: int, lr: float) -> float:
        opt = torch.optim.Adam(model.parameters(), lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * data.steps_per_epoch)
        for epoch in range(epochs):
            data.set_epoch(epoch)
            model.train()
            for x, y in data.train_loader:
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.val_loader)
        return correct / 2000

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    cnn = nn.Sequential(
        block(3, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2),
        block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    t0 = time.perf_counter()
    cnn_acc = fit(cnn, 6, 5e-3)
    cnn_time = time.perf_counter() - t0
    linear_acc = fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), 15, 1e-3)
    print(f"shapes: CNN {cnn_acc:.3f} in {cnn_time:.0f}s, logistic regression {linear_acc:.3f}")
    assert cnn_acc > 0.90
    assert linear_acc < 0.40
