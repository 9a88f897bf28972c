"""The DDAE linear probe (genperc.experiments.probe, `genperc probe`) and the class-labelled sources it reads:
CIFAR-10/100 binary files, class subfolders, the world's single-object classes, the digits."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genperc.cli import main
from genperc.config import load_config
from genperc.data.formats import CifarSource, ClassFolderSource, FolderSource, open_source
from genperc.errors import UserError
from genperc.experiments.probe import (
    FeatureExtractor,
    ProbeConfig,
    ProbeData,
    linear_probe,
    load_probe_data,
    probe_blocks,
    probe_timesteps,
    random_crop_flip,
    resolve_blocks,
)
from genperc.inference import load_run
from genperc.models.registry import create_denoiser

WORLD = Path(__file__).parent / "fixtures" / "world" / "single32"
COLOURS = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])  # class = colour
FAST = ProbeConfig(epochs=4, batch_size=16, lr=0.02, padding=1, min_updates=0)


def _save_run(root: Path, arch: str) -> Path:
    """A run directory as the trainer writes it (config.yaml + checkpoints/step-*/ema) around a tiny
    random class-conditional denoiser (10 digit classes + null) at 8 px."""
    kw = dict(num_layers=3, num_attention_heads=2, attention_head_dim=8) if arch == "dit-small" else {}
    model = create_denoiser(arch, sample_size=8, num_classes=10, learned_variance=True, seed=0, **kw)
    model.save_pretrained(root / "checkpoints" / "step-00000001" / "ema")
    load_config("genrep-cpu", [f"model.arch={arch}", "model.sample_size=8", "data.resolution=8",
                               "data.options={size: 8}"]).save(root / "config.yaml")
    return root


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    return load_run(_save_run(tmp_path_factory.mktemp("unet"), "unet-tiny"), device="cpu")


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    return load_run(_save_run(tmp_path_factory.mktemp("dit"), "dit-small"), device="cpu")


def colour_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of 8x8 whose class (0-3) is their colour, plus texture noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = COLOURS[labels][:, :, None, None] * 0.7 + 0.25 * torch.randn(n, 3, 8, 8, generator=g)
    return images.clamp(-1, 1), labels


def colour_data(shuffle: bool = False) -> ProbeData:
    (xtr, ytr), (xte, yte) = colour_images(64, 1), colour_images(32, 2)
    if shuffle:  # labels no longer say anything about the image
        ytr = ytr[torch.randperm(64, generator=torch.Generator().manual_seed(3))]
    return ProbeData(xtr.half(), ytr, xte.half(), yte, classes=["r", "g", "b", "y"], name="colours")


# ---- blocks, features, t ---------------------------------------------------------------------


def test_hooks_find_every_unet_and_dit_block_with_pooled_features(unet_run, dit_run):
    assert probe_blocks(unet_run.model) == ["down0", "down1", "down2", "mid", "up0", "up1", "up2"]
    assert probe_blocks(dit_run.model) == ["blk0", "blk1", "blk2"]
    for run, dims in ((unet_run, {"down0": 32, "down1": 64, "down2": 64, "mid": 64, "up0": 64, "up1": 64, "up2": 32}),
                      (dit_run, {"blk0": 16, "blk1": 16, "blk2": 16})):
        ex = FeatureExtractor(run, probe_blocks(run.model))
        assert ex.dims() == dims
        feats = ex(torch.zeros(5, 3, 8, 8), 10, torch.Generator().manual_seed(0))
        assert {b: tuple(f.shape) for b, f in feats.items()} == {b: (5, d) for b, d in dims.items()}
        ex.close()
        assert not any(m._forward_hooks for m in run.model.modules())  # close removed every hook


def test_unknown_block_lists_the_names_and_dotted_names_are_accepted(unet_run, dit_run):
    with pytest.raises(UserError, match="unknown block 'up9'.*down0, down1, down2, mid, up0, up1, up2"):
        resolve_blocks(unet_run.model, ["up9"])
    with pytest.raises(UserError, match="blk0, blk1, blk2"):
        resolve_blocks(dit_run.model, ["mid"])
    assert resolve_blocks(unet_run.model, ["up.2", "down.0", "mid", "up2"]) == ["up2", "down0", "mid"]
    assert resolve_blocks(dit_run.model, ["dit.1"]) == ["blk1"]
    assert resolve_blocks(dit_run.model, None) == ["blk0", "blk1", "blk2"]


def test_timesteps_are_ddae_s_scaled_to_the_schedule(unet_run, dit_run):
    assert probe_timesteps(unet_run.model, 1000, grid=True) == [1, 11, 21, 51, 101, 201]
    assert probe_timesteps(unet_run.model, 100, grid=True) == [0, 1, 2, 5, 10, 20]
    assert probe_timesteps(unet_run.model, 1000) == [11] and probe_timesteps(dit_run.model, 1000) == [121]
    assert probe_timesteps(unet_run.model, 1000, [50, 5, 50]) == [50, 5]
    with pytest.raises(UserError, match="outside the run's schedule"):
        probe_timesteps(unet_run.model, 1000, [1000])


def test_the_condition_is_null_class_null_text_and_zero_image(unet_run):
    """The label must not leak: every pass sees the null class (index num_classes), the null text and
    a zero image condition, whichever of them the model takes."""

    class NullText:  # stands in for the run's text encoder: its null() is the embedding of ""
        def null(self):
            return torch.full((1, 2, 16), 0.5), torch.ones(1, 2, dtype=torch.bool)

    model = create_denoiser("unet-tiny", sample_size=8, num_classes=3, text_dim=16, cond_channels=3, seed=0).eval()
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, args, kw: seen.update(x=args[0], **kw), with_kwargs=True)
    run = replace(unet_run, model=model, text_encoder=NullText())
    FeatureExtractor(run, ["mid"])(torch.rand(2, 3, 8, 8), 5, torch.Generator())
    assert seen["class_labels"].tolist() == [3, 3]
    assert torch.equal(seen["encoder_hidden_states"], torch.full((2, 2, 16), 0.5))
    assert seen["x"].shape == (2, 6, 8, 8) and not seen["x"][:, 3:].any() and seen["x"][:, :3].any()


def test_crop_and_flip_keep_a_window_of_the_padded_image_and_are_seeded():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    a = random_crop_flip(x, 2, True, torch.Generator().manual_seed(0))
    assert torch.equal(a, random_crop_flip(x, 2, True, torch.Generator().manual_seed(0)))
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator()), x)
    for i in range(2):
        candidates = [torch.nn.functional.pad(v, (2,) * 4, value=-1.0) for v in (x[i], x[i].flip(-1))]
        windows = [p[:, dy:dy + 6, dx:dx + 6] for p in candidates for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], w) for w in windows)


# ---- the probe ---------------------------------------------------------------------------------


def test_probe_learns_colour_classes_and_is_at_chance_on_shuffled_labels(unet_run):
    good = linear_probe(unet_run, colour_data(), [1], ["mid", "up2"], FAST)
    assert good.best[2] > 0.9, good.top1
    assert good.settings["anchors"]["chance"] == 0.25 and good.settings["anchors"]["pixels"] > 0.9
    fresh = good.settings["anchors"]["random_init"]
    assert fresh["t"] == 1 and fresh["block"] in ("mid", "up2") and 0 <= fresh["top1"] <= 1
    chance = linear_probe(unet_run, colour_data(shuffle=True), [1], ["mid", "up2"], FAST, anchors=False)
    assert max(chance.top1.values()) < 0.5, chance.top1


def test_fresh_and_cached_noise_are_seeded_and_a_grid_cell_equals_its_single_probe(unet_run):
    data = colour_data()
    cfg = ProbeConfig(epochs=2, batch_size=16, lr=0.02, min_updates=0)
    fresh = linear_probe(unet_run, data, [1, 200], ["down1", "up1"], cfg, anchors=False)
    assert fresh.top1 == linear_probe(unet_run, data, [1, 200], ["down1", "up1"], cfg, anchors=False).top1
    single = linear_probe(unet_run, data, [200], ["up1"], cfg, anchors=False)
    assert single.top1[(200, "up1")] == fresh.top1[(200, "up1")]
    cached_cfg = ProbeConfig(epochs=2, batch_size=16, lr=0.02, cache=True, min_updates=0)
    cached = linear_probe(unet_run, data, [1, 200], ["down1", "up1"], cached_cfg, anchors=False)
    assert cached.top1 == linear_probe(unet_run, data, [1, 200], ["down1", "up1"], cached_cfg, anchors=False).top1
    assert cached.settings["noise"] == "cached (1 views)" and fresh.settings["noise"] == "fresh"


def test_epochs_grow_to_ddae_update_count_and_cached_views_cycle(unet_run, monkeypatch):
    """DDAE's 15 epochs are 5,865 updates on CIFAR-10; a small split gets more epochs, not fewer updates."""
    cfg = ProbeConfig()
    assert cfg.epochs_for(50_000) == 15 and cfg.epochs_for(1_259) == 587  # ⌈5865 / ⌈1259/128⌉⌉
    assert ProbeConfig(min_updates=0).epochs_for(1_259) == 15
    data = colour_data()
    cfg = ProbeConfig(epochs=1, batch_size=16, lr=0.02, cache=True, cache_draws=3, min_updates=10)
    views = []
    import genperc.experiments.probe as probe_mod
    real = probe_mod._extract
    monkeypatch.setattr(probe_mod, "_extract", lambda f, images, *a: views.append(images.clone()) or real(f, images, *a))
    result = linear_probe(unet_run, data, [1], ["mid"], cfg, anchors=False)
    per_epoch = -(-len(data.train_labels) // 16)
    assert result.settings["epochs_run"] == -(-10 // per_epoch) and result.settings["updates"] >= 10
    train_views = [v for v in views if len(v) == len(data.train_images)][:3]
    assert torch.equal(train_views[0], data.train_images.float()) or torch.equal(train_views[0], data.train_images)
    assert not torch.equal(train_views[1].float(), data.train_images.float())  # augmented views differ
    assert not torch.equal(train_views[1], train_views[2])


def _class_folders(root: Path) -> Path:
    for split, n in (("train", 16), ("test", 8)):
        images, labels = colour_images(n, {"train": 1, "test": 2}[split])
        for k, (img, y) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / ["red", "green", "blue", "yellow"][int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = ((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            Image.fromarray(pixels).save(folder / f"{k:03d}.png")
    return root


def test_cli_grid_on_a_dit_writes_heatmap_csv_and_the_best_cell(dit_run, tmp_path, capsys):
    data = _class_folders(tmp_path / "colours")
    out = tmp_path / "probe"
    code = main(["probe", str(dit_run.run_dir), "--dataset", f"folder:{data}", "--grid", "--t", "1,50",
                 "--epochs", "2", "--min-updates", "0", "--cache", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    rows = list(csv.DictReader((out / "probe.csv").open()))
    assert [(r["t"], r["block"]) for r in rows] == [(t, b) for t in ("1", "50") for b in ("blk0", "blk1", "blk2")]
    record = json.loads((out / "probe.json").read_text())
    best = max(rows, key=lambda r: float(r["top1"]))
    assert record["best"]["top1"] == pytest.approx(float(best["top1"]), abs=1e-6)
    assert f"best: t={record['best']['t']}, block {record['best']['block']}" in text
    assert "anchors: chance 0.2500, the same probe on the clean pixels" in text
    assert record["settings"]["classes"] == 4 and record["settings"]["grid"] is True
    assert Image.open(out / "probe.png").size[0] > 100
    assert main(["probe", str(dit_run.run_dir), "--dataset", f"folder:{data}", "--block", "mid"]) == 2
    assert "blk0, blk1, blk2" in capsys.readouterr().err


# ---- class-labelled sources ---------------------------------------------------------------------


def _cifar_file(path: Path, labels: list[list[int]], seed: int) -> np.ndarray:
    """Records of label bytes then R, G, B planes (1,024 bytes each, row-major); returns [N, 32, 32, 3]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for lab, img in zip(labels, images, strict=True):
            f.write(bytes(lab) + img.transpose(2, 0, 1).tobytes())
    return images


def test_cifar10_binary_batches_decode_to_images_and_labels(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    first = _cifar_file(root / "data_batch_1.bin", [[3], [9]], 0)
    second = _cifar_file(root / "data_batch_2.bin", [[0]], 1)
    test = _cifar_file(root / "test_batch.bin", [[7]], 2)
    (root / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    train = open_source("cifar10", tmp_path, "train")  # the parent folder is found too
    assert len(train) == 3 and train.classes[9] == "c9"
    for i, (img, label) in enumerate([(first[0], 3), (first[1], 9), (second[0], 0)]):
        rec = train[i]
        assert rec.class_label == label and np.array_equal(rec.image, img)
    rec = CifarSource(root, "test")[0]
    assert rec.class_label == 7 and np.array_equal(rec.image, test[0]) and rec.image.dtype == np.uint8


def test_cifar100_fine_labels_by_default_and_coarse_on_request(tmp_path):
    root = tmp_path / "cifar-100-binary"
    images = _cifar_file(root / "train.bin", [[4, 57], [19, 99]], 0)
    _cifar_file(root / "test.bin", [[1, 2]], 1)
    fine = open_source("cifar100", root, "train")
    assert [fine[i].class_label for i in range(2)] == [57, 99] and len(fine.classes) == 100
    assert np.array_equal(fine[1].image, images[1])
    coarse = open_source("cifar100", root, "train", labels="coarse")
    assert [coarse[i].class_label for i in range(2)] == [4, 19] and len(coarse.classes) == 20


def test_bad_cifar_files_are_one_line_errors_with_the_fix(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    (root / "data_batch_1.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(UserError, match="not a whole number of 3073-byte CIFAR records — use the binary") as e:
        open_source("cifar10", root, "train")
    assert "\n" not in str(e.value)
    _cifar_file(root / "data_batch_1.bin", [[12]], 0)
    with pytest.raises(UserError, match="labels up to 12"):
        open_source("cifar10", root, "train")
    with pytest.raises(UserError, match="no test_batch.bin"):
        open_source("cifar10", root, "test")
    with pytest.raises(UserError, match="use one of train, test"):
        open_source("cifar10", root, "val")


def test_class_subfolders_are_the_folder_layout_without_images_dir(unet_run, tmp_path):
    root = _class_folders(tmp_path / "c")
    src = open_source("folder", root, "train")
    assert isinstance(src, ClassFolderSource) and src.classes == ["blue", "green", "red", "yellow"]
    assert len(src) == 16 and [src[i].class_label for i in (0, 4, 15)] == [0, 1, 3]
    (tmp_path / "f" / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "f" / "images" / "a.png")
    assert isinstance(open_source("folder", tmp_path / "f", None), FolderSource)
    with pytest.raises(UserError, match="no class folders with images"):
        ClassFolderSource(tmp_path / "f" / "images")
    for f in (root / "test" / "yellow").iterdir():
        f.unlink()
    (root / "test" / "yellow").rmdir()
    with pytest.raises(UserError, match="different classes"):
        load_probe_data(unet_run, f"folder:{root}")


def test_probe_data_from_the_world_the_digits_and_the_run_s_own_data(unet_run):
    world = load_probe_data(unet_run, f"world:{WORLD}")
    assert world.train_images.shape == (16, 3, 8, 8) and len(world.test_labels) == 8  # test falls back to val
    assert world.classes[:2] == ["gray cube", "red cube"] and world.num_classes == 32
    digits = load_probe_data(unet_run, "digits", limit=20)
    assert digits.num_classes == 10 and digits.train_images.shape == (20, 3, 8, 8)
    assert digits.train_images.dtype == torch.float16 and -1 <= float(digits.train_images.min())
    own = load_probe_data(unet_run, None, limit=12)  # genrep-cpu: the digits, test split = data.val_split
    assert own.classes == digits.classes and own.name == "digits" and len(own.test_labels) == 12
    with pytest.raises(UserError, match="not a class-labelled source"):
        load_probe_data(unet_run, "cifar10")  # needs a path
    with pytest.raises(UserError, match="not a class-labelled source"):
        load_probe_data(unet_run, "imagenet:/x")
    with pytest.raises(UserError, match="pass the folder above it"):
        load_probe_data(unet_run, f"world:{WORLD / 'train'}")
