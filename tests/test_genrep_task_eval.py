"""The classification codec and GenRep's evaluation: ECE, FID / precision / recall, feature networks."""

from pathlib import Path

import pytest
import torch

from genperc.data.formats import DigitsSource
from genperc.errors import UserError
from genperc.evaluation.genrep import (
    FeatureExtractor,
    classification_summary,
    frechet_distance,
    precision_recall,
    reliability_diagram,
    sample_grid,
)
from genperc.metrics import expected_calibration_error
from genperc.tasks import create_task

FIXTURE = Path(__file__).parent / "fixtures" / "world" / "single32"


def test_ece_by_hand():
    conf = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # bins of width 1/15: 0.9 → (0.8667, 0.9333]: acc 0.5 vs 0.9; 0.6 → (0.5333, 0.6]: acc 1 vs 0.6
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert expected_calibration_error(torch.ones(3), torch.ones(3)) == 0.0


def test_digits_codec_prepare_metrics_and_subset():
    task = create_task("classification")
    ds = task.dataset(DigitsSource("val", size=16), 16)
    assert task.num_classes == 10 and len(ds) == 179
    from genperc.data.datasets import collate

    batch = collate([ds[i] for i in range(6)])
    tb = task.prepare(batch)
    assert tb.x0.shape == (6, 3, 16, 16) and tb.image is None and tb.texts is None
    assert tb.class_labels.tolist() == batch["label"].tolist() and tb.extras["index"].tolist() == list(range(6))
    logits = torch.nn.functional.one_hot(batch["label"], 10).float() * 5
    per = task.metrics(logits, batch)
    summ = task.summarize(per)
    assert summ["top1"] == 1.0 and summ["top5"] == 1.0 and 0 <= summ["ece"] < 0.1
    assert torch.allclose(per["confidence"], logits.softmax(-1).max(-1).values)
    sub = create_task("classification", classes=["7", 3])
    sds = sub.dataset(DigitsSource("val", size=16), 16)
    labels = {int(sds[i]["label"]) for i in range(len(sds))}
    assert sub.class_names == ["7", "3"] and labels == {0, 1} and len(sds) < 50
    with pytest.raises(UserError, match="unknown class"):
        create_task("classification", classes=["eleven"]).dataset(DigitsSource("val", size=16), 16)


def test_world_codec_with_dense_targets():
    from genperc.data.world.format import WorldSource

    task = create_task("classification", dense=True)
    ds = task.dataset(WorldSource(FIXTURE, "train"), 32)
    item = ds[0]
    assert task.num_classes == 32 and item["semantic"].shape == (32, 32) and item["depth"].shape == (1, 32, 32)


def test_fid_and_precision_recall():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 3) == pytest.approx(72.0, rel=1e-3)
    assert precision_recall(a, a) == (1.0, 1.0)
    p, r = precision_recall(a, a + 100)
    assert p == 0.0 and r == 0.0


def test_reliability_diagram_grid_and_summary(tmp_path):
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(2))
    path = reliability_diagram(logits, labels, tmp_path / "rel.png", "test")
    assert path.stat().st_size > 1000
    s = classification_summary(logits, labels)
    assert set(s) == {"top1", "nll", "ece", "confidence"}
    grid = sample_grid(torch.rand(12, 3, 8, 8) * 2 - 1, torch.arange(3).repeat_interleave(4), 4, tmp_path / "g.png")
    from PIL import Image

    assert Image.open(grid).size == (4 * 8 * 6, 3 * 8 * 6)


class Feat(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_feature_extractor(tmp_path):
    torch.jit.script(Feat()).save(str(tmp_path / "f.pt"))
    fe = FeatureExtractor(torchscript=str(tmp_path / "f.pt"))
    f = fe(torch.zeros(3, 3, 8, 8))
    assert f.shape == (3, 3) and torch.allclose(f, torch.full((3, 3), 127.5), atol=0.6)
    with pytest.raises(UserError, match="not found"):
        FeatureExtractor(torchscript=str(tmp_path / "missing.pt"))
