"""Run every benchmark in this folder (``make bench``) and write bench-results/results.json.

Each ``bench_*.py`` module has ``run() -> dict``. Speed is reported as ratios against a baseline
measured in the same process (these machines are noisy), plus absolute figures for the record;
the machine is recorded with the results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main(names: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M")}
    for path in sorted(HERE.glob("bench_*.py")):
        if names and path.stem.removeprefix("bench_") not in names:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(f"== {path.stem}", flush=True)
        t0 = time.perf_counter()
        res = mod.run()
        res["seconds"] = round(time.perf_counter() - t0, 1)
        for k, v in res.items():
            print(f"  {k}: {v}")
        results[path.stem] = res
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"machine: {results['machine']}\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
