"""Per-step perception analysis (ADDP Fig. 1a) and the ``genperc analyze`` commands."""

import json

import pytest
import torch
from typer.testing import CliRunner

from genperc.analyze import app
from genperc.config import SampleConfig, load_config
from genperc.data.datasets import ReferringDataset, collate
from genperc.data.toy import ToyShapes
from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
from genperc.errors import UserError
from genperc.evaluation.trajectory import read_step_csv, step_metrics, write_step_csv, write_step_metrics
from genperc.models.latent import PixelSpace
from genperc.models.registry import create_denoiser
from genperc.tasks.referring import ReferringTask

SCHED = NoiseSchedule(DiffusionConfig(prediction_type="x0", timestep_spacing="trailing"))
SAMPLE = SampleConfig(sampler="ddim", steps=3, batch_size=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset():
    return ReferringDataset(ToyShapes(size=5, resolution=16, split="val"), resolution=16)


class Oracle:
    """x0-prediction model returning the exact target of the items being sampled: without guidance
    the sampler calls it once per step, and the batches come in dataset order."""

    def __init__(self, dataset, task, steps, batch_size):
        b = collate([dataset[i] for i in range(len(dataset))])
        self.targets = task.encode_target(b["image"], b["mask"])
        self.steps, self.batch_size, self.calls = steps, batch_size, 0

    def __call__(self, x, t, cond):
        start = (self.calls // self.steps) * self.batch_size
        self.calls += 1
        return self.targets[start:start + x.shape[0]]


def test_step_metrics_shapes_files_and_round_trip(tmp_path, dataset, text_encoder):
    task = ReferringTask()
    model = create_denoiser("unet-tiny", sample_size=16, in_channels=3, cond_channels=3, text_dim=text_encoder.dim,
                            seed=0)
    res = step_metrics(model, task, dataset, schedule=SCHED, space=PixelSpace(), text_encoder=text_encoder,
                       sample_cfg=SAMPLE, samples=5, seed=0)
    assert res.metric == "IoU" and res.matrix.shape == (5, 3) and res.indices == [0, 1, 2, 3, 4]
    assert res.timesteps.tolist() == SCHED.timesteps("ddim", 3).tolist() and res.timesteps[0] > res.timesteps[-1]
    assert set(res.values) == {"I", "U", "IoU"}  # the per-sample tensors; lists (family) are kept once:
    assert res.labels["family"] == [dataset[i]["family"] for i in range(5)]
    paths = write_step_metrics(res, tmp_path / "out", {"T": 1000})
    assert paths["plot"].stat().st_size > 1000
    summary = json.loads(paths["json"].read_text())
    assert summary["T"] == 1000 and summary["metric"] == "IoU" and len(summary["per_step"]["IoU"]["median"]) == 3
    m, ts, name = read_step_csv(paths["csv"])
    assert name == "IoU" and ts == res.timesteps.tolist() and torch.equal(m, res.matrix.double())

    # the final column is what `evaluate` scores with the same seed and batches
    from genperc.evaluation.evaluate import evaluate

    ev = evaluate(model, task, dataset, schedule=SCHED, space=PixelSpace(), text_encoder=text_encoder,
                  sample_cfg=SAMPLE, seed=0, limit=5)
    assert torch.allclose(ev.per_sample["IoU"].double(), res.matrix[:, -1].double())


def test_oracle_model_scores_one_at_every_step(dataset):
    task = ReferringTask()
    res = step_metrics(Oracle(dataset, task, 4, SAMPLE.batch_size), task, dataset, schedule=SCHED, space=PixelSpace(), text_encoder=None,
                       sample_cfg=SAMPLE, steps=4, seed=1)
    assert res.matrix.shape == (len(dataset), 4) and torch.equal(res.matrix, torch.ones(len(dataset), 4))


def test_csv_reader_accepts_plain_headers_and_rejects_bad_files(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("999,500,0\n0.1,0.2,0.3\n0.4,,0.6\n")
    m, ts, name = read_step_csv(p)
    assert ts == [999, 500, 0] and m.shape == (2, 3) and torch.isnan(m[1, 1]) and name == "metric"
    p.write_text("sample,a,b\n0,1,2\n")
    with pytest.raises(UserError, match="timestep"):
        read_step_csv(p)
    p.write_text("999,0\n0.1,x\n")
    with pytest.raises(UserError):
        read_step_csv(p)
    with pytest.raises(UserError):
        read_step_csv(tmp_path / "missing.csv")
    with pytest.raises(UserError):
        write_step_csv(p, torch.zeros(2, 3), [1, 0], "IoU")


def _synthetic_csv(path, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g, dtype=torch.float64)
    cols = [torch.rand(n, generator=g, dtype=torch.float64) for _ in range(3)] + [z] * 6 + [z]
    return write_step_csv(path, torch.stack(cols, 1), [950 - 100 * j for j in range(10)], "IoU")


def test_cli_contributions_from_csv(tmp_path):
    from genperc.diffusion.timesteps import load_contributions

    csv_path = _synthetic_csv(tmp_path / "steps_IoU.csv")
    out = tmp_path / "c.json"
    r = CliRunner().invoke(app, ["contributions", "--metrics", str(csv_path), "--out", str(out),
                                 "--compare", "addp-referring"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["bins"] == 10 and abs(sum(data["factors"]) - 1) < 1e-5 and data["metric"] == "IoU"
    assert max(range(10), key=lambda b: data["factors"][b]) == 6  # column 3 (t = 650) makes the final metric
    assert out.with_suffix(".png").exists()
    assert load_contributions(str(out), 1000).shape == (1000,)
    assert "c² per bin" in r.output


def test_cli_augment_figure(tmp_path):
    out = tmp_path / "aug.png"
    r = CliRunner().invoke(app, ["augment", "--task", "referring", "--resolution", "16", "--samples", "2",
                                 "--timesteps", "0,500,999", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000


def test_augmentation_grid_columns_share_one_seed(dataset):
    """Column k is x0' at timesteps[k] drawn with a fresh generator of the same seed; t = 0 is the
    clean target."""
    from genperc.analyze import augmentation_grid
    from genperc.tasks.augment import referring_augment

    task = ReferringTask()
    task.augment_intensity, task.num_train_timesteps = 1.0, 1000
    batch = task.prepare(collate([dataset[i] for i in range(3)]))
    grid = augmentation_grid(task, batch, [0, 400, 999], seed=7)
    assert torch.equal(grid[0], batch.x0)
    for k, t in enumerate([400, 999], start=1):
        expected = referring_augment(batch.image, batch.extras["mask"], torch.full((3,), t), 1000, 1.0,
                                     torch.Generator().manual_seed(7))
        assert torch.equal(grid[k], expected)


def _fake_run(tmp_path):
    """A run directory as `genperc train` leaves it, with an untrained tiny model (no text encoder)."""
    from genperc import build

    cfg = load_config("cpu-tiny", ["data.resolution=16", "model.sample_size=16", "model.text_encoder=none",
                                   "sample.steps=2", "sample.batch_size=2", "data.options={size: 4}"])
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    task = build.build_task(cfg)
    model = build.build_model(cfg, task, build.build_space(cfg), None)
    model.save_pretrained(run / "checkpoints" / "step-00000001" / "model")
    return run


def test_cli_trajectory_and_contributions_from_a_run(tmp_path, monkeypatch):
    run = _fake_run(tmp_path)
    out = tmp_path / "traj"
    r = CliRunner().invoke(app, ["trajectory", str(run), "--samples", "3", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m, ts, name = read_step_csv(out / "steps_IoU.csv")
    assert m.shape == (3, 2) and name == "IoU" and (out / "trajectory.png").exists()
    assert json.loads((out / "trajectory.json").read_text())["T"] == 1000

    # --run computes the matrix first (an untrained model's IoU is constant, so feed known values)
    import genperc.evaluation.trajectory as traj

    real = traj.step_metrics

    def fake(*args, **kwargs):
        res = real(*args, **kwargs)
        g = torch.Generator().manual_seed(0)
        z = torch.rand(res.matrix.shape[0], generator=g)
        res.values["IoU"] = torch.stack([torch.rand_like(z), z], 1)
        return res

    monkeypatch.setattr(traj, "step_metrics", fake)
    c = tmp_path / "c.json"
    r = CliRunner().invoke(app, ["contributions", "--run", str(run), "--samples", "4", "--out", str(c),
                                 "--compare", "diffusion"])
    assert r.exit_code == 0, r.output
    assert json.loads(c.read_text())["n_samples"] == 4 and (tmp_path / "c-trajectory" / "steps_IoU.csv").exists()


def test_main_cli_mounts_analyze_and_reports_user_errors(capsys):
    from genperc.cli import main

    assert main(["analyze", "contributions"]) == 2
    assert "exactly one of --metrics" in capsys.readouterr().err
