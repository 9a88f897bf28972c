"""The GPU benchmark script (benchmarks/gpu, issue 16; docs/gpu.md) works before GPU time is spent.

The whole ``--smoke`` run (every stage at toy sizes on the CPU, one torch thread, through run.sh)
takes about 65 s on a shared 2-core machine; the fast tests cover its parts: the bare diffusers
step, a stage's guarded parts, a failing stage, and the reading of results.json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU))

import common  # noqa: E402
import gpu_bench  # noqa: E402


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---- fast: the parts -----------------------------------------------------------------------------


def test_ip2p_step_trains_the_unet_and_its_flops_are_counted():
    from genperc.models.registry import create_denoiser

    unet = create_denoiser("unet-tiny", seed=0, sample_size=8, in_channels=3, cond_channels=3, text_dim=16).backbone
    x0, cond = common.random_batch(2, 8, "cpu", text_len=4, text_dim=16)
    step = common.IP2PStep(unet, x0, cond, device="cpu", bf16=False, ema=True, dropout=0.5, channels_last=True)
    before = [p.detach().clone() for p in step.params]
    flops = common.bench_train().step_flops(step)
    step()
    assert flops > 0 and math.isfinite(step.loss_sum) and step.loss_sum > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, step.params, strict=True))
    assert step.ema.optimization_step == 2


def test_a_part_records_its_error_or_why_it_was_skipped(tmp_path):
    ctx = common.Ctx(device=torch.device("cpu"), smoke=True, work=tmp_path, deadline=1e18,
                     result_path=tmp_path / "r.json")
    assert ctx.part("fine", lambda: {"x": 1}) == {"x": 1}
    assert ctx.part("broken", lambda: 1 / 0) is None
    ctx.deadline = 0
    assert ctx.part("late", lambda: {"x": 2}, need_s=5) is None
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["fine"] == {"x": 1}
    assert saved["broken"]["error"].startswith("ZeroDivisionError")
    assert "stage budget" in saved["late"]["skipped"]


def test_a_failing_stage_is_recorded(tmp_path, monkeypatch):
    def boom(ctx):
        ctx.result["measured"] = 1.0
        ctx.save()
        raise RuntimeError("no GPU today")

    monkeypatch.setitem(sys.modules, "fake_stage", types.SimpleNamespace(run=boom))
    monkeypatch.setitem(gpu_bench.STAGES, "boom", ("fake_stage", "run", 1, 1))
    assert gpu_bench.run_stage("boom", tmp_path / "boom.json", tmp_path, 10, smoke=True) == 1
    saved = json.loads((tmp_path / "boom.json").read_text())
    assert saved == {"measured": 1.0, "error": "RuntimeError: no GPU today"}


def test_targets_and_summary_read_partial_results():
    stages = {
        "train": {"status": "ok", "seconds": 9.0, "result": {"precision": "bf16", "matmul_peak_tflop_s": 780.0, "cases": {
            "unet-base_128px": {"batch": 64, "mfu_best": 0.43, "variants": {
                "eager": {"images_per_s": 900.0, "mfu": 0.31}, "compile": {"skipped": "why"}}}}}},
        "bare": {"status": "ok", "result": {"cases": {"gpu-small": {"arch": "unet-small", "pixels": 64, "batch": 64,
                                                                    "trainer_images_per_s": 1.0, "bare_images_per_s": 1.1,
                                                                    "trainer_over_bare": 1.1}}}},
        "sample": {"status": "timeout", "error": "killed", "result": {}},
    }
    t = gpu_bench.targets(stages)
    assert t["mfu_unet_base_128px_bf16"] == {"target": ">= 0.40", "value": 0.43, "met": True}
    assert t["trainer_over_bare"]["met"] is False
    assert t["sampler_over_pipeline_speed"]["met"] is None
    text = gpu_bench.summary({"machine": {"gpu": "NVIDIA H200", "mode": "gpu", "torch": "2.11"}, "stages": stages,
                              "targets": t})
    assert "NVIDIA H200" in text and "timeout" in text and "MFU 0.310" in text


def test_run_sh_refuses_to_run_without_an_output_folder():
    proc = subprocess.run(["bash", str(GPU / "run.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_run_sh_and_the_driver_parse():
    assert subprocess.run(["bash", "-n", str(GPU / "run.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(GPU / "fetch_wheels.sh")]).returncode == 0
    with pytest.raises(SystemExit):
        gpu_bench.main(["--help"])


# ---- the whole smoke run -------------------------------------------------------------------------


def test_smoke_run_measures_every_stage(tmp_path):
    """``run.sh OUT --smoke``: every stage ends ok with positive throughputs, an MFU in (0, 1] and a
    finite trainer/bare ratio; the compile and cuda parts say why they were skipped."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHON=sys.executable, GPU_WHEELS=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", str(GPU / "run.sh"), str(out), "--smoke", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert (out / "log.txt").is_file()
    res = json.loads((out / "results.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    st = res["stages"]
    assert set(st) == set(gpu_bench.STAGES) and all(s["status"] == "ok" for s in st.values())
    assert res["machine"]["mode"].startswith("smoke")

    case = st["train"]["result"]["cases"]["unet-tiny_16px"]
    for v in ("eager", "channels_last"):
        assert _positive(case["variants"][v]["images_per_s"])
        assert 0 < case["variants"][v]["mfu"] <= 1
    assert "GPU only" in case["variants"]["compile"]["skipped"]

    bare = st["bare"]["result"]["cases"]["gpu-small"]
    assert _positive(bare["trainer_over_bare"]) and _positive(bare["bare_images_per_s"])
    assert 0 < bare["trainer_mfu"] <= 1

    sample = st["sample"]["result"]["cases"]["unet-tiny_8px_fp32"]
    assert _positive(sample["genperc_images_per_s"]) and _positive(sample["diffusers_images_per_s"])
    assert sample["max_abs_diff"] < 1e-3  # the same deterministic DDIM run, in fp32

    render = st["render"]["result"]["32px"]
    assert _positive(render["scalar_rgb"]["scenes_per_s"]) and "skipped" in render["cuda_ad_rgb"]
    assert render["noise_floor_scalar_vs_scalar_other_seed"]["instance_map_agreement"] == 1.0

    presets = st["presets"]["result"]
    assert "CLIP" in presets["text_encoder"]  # the GPU machine's path: no MiniLM there
    for name in ("gpu-small", "gpu-depth", "gpu-generalist"):
        assert presets[name]["steps"] == 2 and _positive(presets[name]["train_images_per_s"]), name
        assert presets[name]["metrics"], name
    assert "top1" in presets["genrep-gpu"]["metrics"]

    acc = st["accelerate"]["result"]
    assert acc["returncode"] == 0 and acc["steps"] == 2 and acc["checkpoint"] == "step-00000002"
    assert set(res["targets"]) == {"mfu_unet_base_128px_bf16", "trainer_over_bare", "sampler_over_pipeline_speed"}
