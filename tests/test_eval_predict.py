"""`genperc eval` and `genperc predict` end to end on tiny runs of the three ADDP tasks, and their
one-line user errors."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genperc.cli import main
from genperc.config import load_config
from genperc.data.toy import ToyShapes
from genperc.inference import evaluate_run, load_run, predict_files
from genperc.training.trainer import Trainer

TINY = ["data.resolution=16", "model.sample_size=16", "train.batch_size=4", "train.steps=2", "train.warmup_steps=1",
        "train.progress=false", "train.checkpoint_every=2", "model.text_max_length=8", "sample.steps=2",
        "sample.batch_size=8", "data.options={size: 6}"]
PRESETS = {"depth": "cpu-depth", "referring": "cpu-tiny", "generalist": "cpu-generalist"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_encoder):
    out = {}
    root = tmp_path_factory.mktemp("runs")
    for task, preset in PRESETS.items():
        cfg = load_config(preset, TINY)
        Trainer(cfg, root / task, train_source=ToyShapes(size=6, resolution=16),
                text_encoder=text_encoder if task != "depth" else None).train()
        out[task] = root / task
    return out


@pytest.fixture(scope="module")
def image_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(ToyShapes(size=1, resolution=24, split="test")[0].image).save(path)
    return path


@pytest.mark.parametrize("task", list(PRESETS))
def test_evaluate_run_writes_metrics_and_per_sample_rows(runs, task, text_encoder, tmp_path):
    run = load_run(runs[task], text_encoder=text_encoder if task != "depth" else None)
    res = evaluate_run(run, "val", limit=5, out=tmp_path, ensemble=2 if task == "depth" else 1)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["task"] == task and data["summary"] == pytest.approx(res.summary, nan_ok=True)
    assert data["settings"]["task_settings"] and data["machine"]["cores"] >= 1
    assert data["settings"]["steps"] == 2 and data["settings"]["items"] == 5
    rows = list(csv.DictReader((tmp_path / "samples.csv").open()))
    assert len(rows) == 5 and "index" in rows[0]
    main_key = {"depth": "AbsRel", "referring": "oIoU", "generalist": "depth/AbsRel"}[task]
    assert main_key in res.summary


def test_eval_cli_prints_and_writes(runs, tmp_path, capsys):
    rc = main(["eval", str(runs["referring"]), "--limit", "3", "--steps", "1", "--sampler", "euler-a",
               "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "oIoU" in text and "threshold=50.0" in text
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert settings["sampler"] == "euler-a" and settings["steps"] == 1


def test_eval_baselines_cli_scores_the_same_items(runs, tmp_path, capsys):
    """`genperc eval --baselines`: the depth baselines printed under the model's headline metrics
    and written to metrics.json on the same items, with the object-pixel depth metrics."""
    rc = main(["eval", str(runs["depth"]), "--limit", "3", "--steps", "1", "--baselines",
               "--baseline-fit-items", "4", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "baselines on the same 3 items" in text and "objects/AbsRel" in text
    assert "training mean map" in text and "row ramp" in text
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["settings"]["items"] == 3 and data["settings"]["baselines"]["fit_items"] == 4
    assert set(data["baselines"]) == {"training mean map", "row ramp"}
    for summary in data["baselines"].values():
        assert summary["items"] == 3 and summary["objects/n"] == 3 and 0 <= summary["AbsRel"] < 1
    assert data["summary"]["objects/n"] == 3 and "objects/delta1" in data["summary"]


@pytest.mark.parametrize("task", ["referring", "generalist"])
def test_evaluate_run_with_baselines(runs, task, text_encoder, tmp_path):
    run = load_run(runs[task], text_encoder=text_encoder)
    res = evaluate_run(run, "val", limit=4, steps=1, out=tmp_path, baselines=True, baseline_fit_items=6)
    data = json.loads((tmp_path / "metrics.json").read_text())
    names = {"referring": {"empty mask", "all objects", "named shape"},
             "generalist": {"training mean map", "row ramp", "all background", "best constant box"}}[task]
    assert set(data["baselines"]) == set(res.baselines) == names
    assert all(summary["items"] == res.settings["items"] == 4 for summary in res.baselines.values())
    if task == "referring":
        assert res.baselines["empty mask"]["oIoU"] == 0 and res.baselines["named shape"]["n"] == 4
    else:  # the first 4 generalist items: one depth item, then segment items
        assert res.baselines["row ramp"]["depth/n"] == res.summary["depth/n"] == 1
        assert res.baselines["all background"]["segment/n"] == res.summary["segment/n"] == 3


SAMPLING_KEYS = ("sampler", "steps", "spacing", "eta", "text_scale", "image_scale", "ensemble", "batch_size", "seed",
                 "weights", "checkpoint", "prediction_type")


def _expected_settings(run_dir, **used):
    """What a run's defaults are, with the settings a command was given in their place."""
    from genperc.build import latest_checkpoint
    from genperc.config import load_run_config

    cfg = load_run_config(run_dir)
    return {"sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "spacing": cfg.diffusion.timestep_spacing,
            "eta": cfg.sample.eta, "text_scale": cfg.sample.text_scale, "image_scale": cfg.sample.image_scale,
            "ensemble": 1, "batch_size": cfg.sample.batch_size, "seed": 0, "weights": "ema",
            "checkpoint": str(latest_checkpoint(run_dir)), "prediction_type": cfg.diffusion.prediction_type} | used


def test_eval_records_every_sampling_setting(runs, tmp_path, capsys):
    """metrics.json holds each sampling setting with the value used: --spacing and --steps given, the
    rest the run's (the run was trained with trailing spacing, so leading is the option's)."""
    rc = main(["eval", str(runs["depth"]), "--spacing", "leading", "--steps", "2", "--limit", "2", "--seed", "3",
               "--batch-size", "2", "--out", str(tmp_path)])
    assert rc == 0 and "ddim 2 leading steps" in capsys.readouterr().out
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    expected = _expected_settings(runs["depth"], spacing="leading", steps=2, seed=3, batch_size=2)
    assert load_config("cpu-depth").diffusion.timestep_spacing == "trailing"
    assert {k: settings[k] for k in SAMPLING_KEYS} == expected


def test_predict_records_every_sampling_setting(runs, image_png, tmp_path, capsys):
    rc = main(["predict", str(runs["depth"]), "--image", str(image_png), "--spacing", "linspace", "--steps", "3",
               "--seed", "5", "--ensemble", "2", "--weights", "model", "--out", str(tmp_path)])
    assert rc == 0
    info = json.loads((tmp_path / "prediction.json").read_text())
    expected = _expected_settings(runs["depth"], spacing="linspace", steps=3, seed=5, ensemble=2, weights="model",
                                  batch_size=1)  # one image per sampler call
    assert {k: info[k] for k in SAMPLING_KEYS} == expected


class _TimestepSpy(torch.nn.Module):
    """The run's denoiser, noting the timestep of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.timesteps = model, []

    def forward(self, x, t, cond):
        self.timesteps.append(int(t[0]))
        return self.model(x, t, cond)


@pytest.mark.parametrize("spacing,timesteps", [("trailing", [999, 499]), ("leading", [500, 0]),
                                               (None, [999, 499])])  # None: the run's (trailing)
def test_spacing_reaches_the_sampler(runs, image_png, spacing, timesteps, tmp_path):
    """Two DDIM steps visit t = 999, 499 with trailing spacing and 500, 0 with leading (diffusers'
    rules), in evaluation and in prediction alike."""
    run = load_run(runs["depth"])
    run.model = spy = _TimestepSpy(run.model)
    res = evaluate_run(run, "val", steps=2, sampler="ddim", spacing=spacing, limit=1)
    assert spy.timesteps == timesteps and res.settings["spacing"] == (spacing or "trailing")
    spy.timesteps.clear()
    predict_files(run, image_png, tmp_path, steps=2, sampler="ddim", spacing=spacing)
    assert spy.timesteps == timesteps
    assert run.schedule.config.timestep_spacing == "trailing"  # the run's own schedule is untouched


@pytest.mark.parametrize("task,prompt,files", [
    ("depth", None, ["prediction_depth16.png", "prediction_depth_color.png"]),
    ("referring", "the disc", ["prediction_mask.png", "prediction_overlay.png"]),
    ("generalist", "detect the square", ["prediction_boxes.json", "prediction_boxes.png"]),
])
def test_predict_writes_task_files_at_the_input_size(runs, image_png, task, prompt, files, tmp_path, text_encoder):
    run = load_run(runs[task], text_encoder=text_encoder if task != "depth" else None)
    paths, notes = predict_files(run, image_png, tmp_path, prompt)
    names = {p.name for p in paths}
    assert set(files) <= names and "prediction_generated.png" in names and "prediction.json" in names
    assert any("resized from 24x24" in n for n in notes)
    first = Image.open(tmp_path / files[0]) if files[0].endswith(".png") else None
    if task == "depth":
        assert first.mode.startswith("I;16") and first.size == (24, 24)
    if task == "referring":
        arr = np.asarray(first)
        assert first.size == (24, 24) and set(np.unique(arr)) <= {0, 255}
    if task == "generalist":
        boxes = json.loads((tmp_path / files[0]).read_text())
        assert boxes["label"] == "square" and isinstance(boxes["boxes"], list)


def test_user_errors_are_one_line(runs, image_png, tmp_path, capsys):
    img16 = tmp_path / "depth16.png"
    Image.fromarray(np.zeros((20, 20), np.uint16)).save(img16)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tiny)
    (tmp_path / "not-an-image.png").write_text("hello")
    cases = [
        ["eval", str(tmp_path / "missing-run")],
        ["predict", str(tmp_path / "missing-run"), "--image", str(image_png)],
        ["predict", str(runs["referring"]), "--image", str(tmp_path / "nope.png"), "--prompt", "x"],
        ["predict", str(runs["referring"]), "--image", str(image_png)],  # empty prompt
        ["predict", str(runs["referring"]), "--image", str(image_png), "--prompt", "  "],
        ["predict", str(runs["referring"]), "--image", str(img16), "--prompt", "the disc"],
        ["predict", str(runs["referring"]), "--image", str(tiny), "--prompt", "the disc"],
        ["predict", str(runs["referring"]), "--image", str(tmp_path / "not-an-image.png"), "--prompt", "x"],
        ["predict", str(runs["generalist"]), "--image", str(image_png), "--prompt", "hello"],
        ["eval", str(runs["depth"]), "--ensemble", "0", "--limit", "1"],
        ["eval", str(runs["depth"]), "--spacing", "foo", "--limit", "1"],
        ["predict", str(runs["depth"]), "--image", str(image_png), "--spacing", "foo"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv + ["--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)


# ---- evaluation at the ground truth's resolution (Marigold's protocol) ----------------------------


class _DepthColumns:
    """One 4×4 record whose depth columns are 1, 2, 3, 4 m (all valid)."""

    categories: list = []

    def __len__(self):
        return 1

    def __getitem__(self, index):
        from genperc.data.record import SceneRecord

        depth = np.tile(np.array([1.0, 2.0, 3.0, 4.0], np.float32), (4, 1))
        return SceneRecord(image=np.zeros((4, 4, 3), np.uint8), depth=depth, depth_valid=np.ones((4, 4), bool))


class _FixedX0(torch.nn.Module):
    """An x0-predicting "model" that always predicts the 2×2 target [[−1, 1], [−1, 1]]: one DDIM step
    (ᾱ_prev = 1 after the last step) returns exactly that target."""

    def forward(self, x, t, cond):
        return torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]).expand(x.shape[0], 3, 2, 2)


@pytest.mark.parametrize("resolution", ["model", "ground-truth"])
def test_depth_evaluated_at_the_ground_truths_resolution(resolution):
    """Prediction [0, 1] per row at 2×2. At the model's 2×2 the resized ground truth has two
    columns, which an affine map of two values fits exactly: AbsRel 0. At the ground truth's 4×4,
    the bilinear upsampling (half-pixel centres) gives the columns p = 0, 1/4, 3/4, 1 against
    d = 1, 2, 3, 4: least squares s = 1.75/0.625 = 2.8, b = 2.5 − 2.8·0.5 = 1.1, aligned
    1.1, 1.8, 3.2, 3.9, AbsRel = (0.1/1 + 0.2/2 + 0.2/3 + 0.1/4)/4."""
    from genperc.config import SampleConfig
    from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
    from genperc.evaluation.evaluate import evaluate
    from genperc.models.latent import PixelSpace
    from genperc.tasks import create_task

    task = create_task("depth")
    task.evaluation_resolution = resolution
    dataset = task.dataset(_DepthColumns(), 2)
    res = evaluate(_FixedX0(), task, dataset, schedule=NoiseSchedule(DiffusionConfig(prediction_type="x0")),
                   space=PixelSpace(), text_encoder=None, sample_cfg=SampleConfig(steps=1, sampler="ddim"))
    expected = 0.0 if resolution == "model" else (0.1 / 1 + 0.2 / 2 + 0.2 / 3 + 0.1 / 4) / 4
    assert res.summary["AbsRel"] == pytest.approx(expected, abs=1e-6)
    assert res.settings["resolution"].startswith("ground truth" if resolution == "ground-truth" else "model")


def test_ground_truth_resolution_needs_the_full_resolution_truth():
    from genperc.config import SampleConfig
    from genperc.diffusion.schedule import DiffusionConfig, NoiseSchedule
    from genperc.errors import UserError
    from genperc.evaluation.evaluate import evaluate
    from genperc.models.latent import PixelSpace
    from genperc.tasks import create_task

    task = create_task("depth")
    dataset = task.dataset(_DepthColumns(), 2)  # built for the model's resolution
    with pytest.raises(UserError, match="gt_depth"):
        evaluate(_FixedX0(), task, dataset, schedule=NoiseSchedule(DiffusionConfig(prediction_type="x0")),
                 space=PixelSpace(), text_encoder=None, sample_cfg=SampleConfig(steps=1), resolution="ground-truth")
    with pytest.raises(UserError, match="evaluation resolution"):
        evaluate(_FixedX0(), task, dataset, schedule=NoiseSchedule(DiffusionConfig(prediction_type="x0")),
                 space=PixelSpace(), text_encoder=None, sample_cfg=SampleConfig(steps=1), resolution="native")


# ---- genperc experiment sampling (few-step perception) --------------------------------------------


def test_sampling_experiment_writes_a_row_per_spacing_and_steps(runs, tmp_path, capsys):
    """Two step counts × two spacings on a tiny depth run: 4 CSV rows with the settings used, one
    table (rows steps, per spacing AbsRel, δ1 and s/image), each cell's metrics.json beside it."""
    out = tmp_path / "sampling"
    rc = main(["experiment", "sampling", str(runs["depth"]), "--steps", "1,2", "--spacings", "trailing,leading",
               "--limit", "4", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader((out / "sampling.csv").open()))
    assert [(r["spacing"], r["steps"]) for r in rows] == [("trailing", "1"), ("trailing", "2"), ("leading", "1"),
                                                          ("leading", "2")]
    for r in rows:
        assert r["run"] == str(runs["depth"]) and r["task"] == "depth" and r["items"] == "4"
        assert (r["sampler"], r["eta"], r["ensemble"], r["train_steps"]) == ("ddim", "0.0", "1", "2")
        assert float(r["s_per_image"]) > 0 and r["main_metric"] == "AbsRel" and "delta1" in r
        cell = json.loads((out / "depth" / f"{r['spacing']}-{r['steps']}" / "metrics.json").read_text())
        assert cell["settings"]["spacing"] == r["spacing"] and float(r["AbsRel"]) == pytest.approx(
            cell["summary"]["AbsRel"])
    tables = (out / "tables.md").read_text()
    assert tables.count("\n| steps |") == 1 and "| trailing AbsRel ↓ | trailing δ1 ↑ | trailing objects/AbsRel ↓ | trailing objects/δ1 ↑ | trailing s/image | leading AbsRel ↓" in tables and "leading s/image" in tables
    assert "\n| 1 |" in tables and "\n| 2 |" in tables and str(runs["depth"]) in tables
    assert "2 training steps" in tables and "Machine: " in tables
    assert "| steps |" in capsys.readouterr().out


def test_sampling_table_by_hand():
    from genperc.experiments.sampling import render_table

    base = {"run": "runs/r", "label": "r", "task": "referring", "train_steps": 7, "checkpoint": "c", "weights": "ema",
            "split": "val", "items": 2, "sampler": "ddim", "eta": 0.0, "ensemble": 1, "text_scale": 1.5,
            "image_scale": 1.0, "batch_size": 8, "seed": 0, "prediction_type": "x0", "main_metric": "oIoU"}
    rows = [base | {"spacing": "trailing", "steps": 1, "oIoU": 0.5, "mIoU": 0.25, "s_per_image": 0.125},
            base | {"spacing": "leading", "steps": 1, "oIoU": 0.0, "mIoU": float("nan"), "s_per_image": 0.5}]
    table = render_table(rows, "a machine")
    assert "| steps | trailing oIoU ↑ | trailing mIoU ↑ | trailing s/image | leading oIoU ↑ | leading mIoU ↑ | " \
           "leading s/image |" in table
    assert "| 1 | 0.5000 | 0.2500 | 0.125 | 0.0000 | – | 0.5 |" in table
    assert "7 training steps" in table and "s_T 1.5" in table and "Machine: a machine." in table
