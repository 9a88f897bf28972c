"""ADDP §3.2 inside the trainer: the augmented target x0' is what gets noised into the x_t the model
sees, while the loss regresses the target of the *clean* x0 (ε* = (x_t − √ᾱ·x0)/√(1−ᾱ), x0, or
v* = √ᾱ·ε* − √(1−ᾱ)·x0), for ε-, x0- and v-prediction. Everything expected is written out here from
those definitions, with ᾱ looked up in the schedule."""

import pytest
import torch

from genperc.config import load_config
from genperc.data.datasets import collate
from genperc.data.toy import ToyShapes
from genperc.tasks.referring import ReferringTask
from genperc.training.objectives import DiffusionObjective
from genperc.training.trainer import Trainer

TINY = ["data.resolution=16", "model.sample_size=16", "train.batch_size=4", "train.progress=false",
        "model.text_max_length=8", "train.ema=false", "train.timesteps=uniform", "train.cond_dropout=0"]


class NegatedAugmentation(ReferringTask):
    """augment returns x0' = −x0: far from the clean x0 at every t."""

    def augment(self, tb, t, generator=None):
        return -tb.x0


class RecordingModel(torch.nn.Module):
    """Records the x_t and t it is given; outputs 0.5·x_t + 0.1."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x_t, t, cond):
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.scale * x_t + 0.1


class RecordingObjective:
    """Keeps the step context (for the drawn noise ε); adds no loss."""

    def __call__(self, ctx):
        self.ctx = ctx
        return {}


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_augmentation_reaches_x_t_and_the_target_stays_clean(tmp_path, text_encoder, kind):
    cfg = load_config("cpu-tiny", TINY + [f"diffusion.prediction_type={kind}"])
    model, recorder = RecordingModel(), RecordingObjective()
    tr = Trainer(cfg, tmp_path / "run", task=NegatedAugmentation(), train_source=ToyShapes(size=4, resolution=16),
                 model=model, text_encoder=text_encoder, objectives=[DiffusionObjective(), recorder])
    batch = collate([tr.dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = tr.compute_losses(batch)["diffusion"]

    (x_t, t), = model.calls
    x0 = tr.task.prepare(batch).x0
    x0_aug, noise = -x0, recorder.ctx.noise
    ab = tr.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    # (a) the model saw the augmented target noised, not the clean one
    torch.testing.assert_close(x_t, a * x0_aug + s * noise)
    assert (x_t - (a * x0 + s * noise)).abs().max() > 0.1
    # (b) the loss regresses the clean target given that x_t
    eps_star = (x_t - a * x0) / s
    target = {"eps": eps_star, "x0": x0, "v": a * eps_star - s * x0}[kind]
    augmented_target = {"eps": noise, "x0": x0_aug, "v": a * noise - s * x0_aug}[kind]
    out = 0.5 * x_t + 0.1
    torch.testing.assert_close(loss, (out - target).pow(2).mean())
    assert abs(float(loss) - float((out - augmented_target).pow(2).mean())) > 1e-2
