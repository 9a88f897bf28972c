#!/usr/bin/env bash
# The GPU benchmark in one command (issue 16; docs/gpu.md):
#
#   benchmarks/gpu/run.sh OUT [--smoke] [--only train,bare,...]
#
# Writes OUT/results.json and OUT/log.txt (everything printed, the summary table last).
# Step 0 installs what the GPU machine lacks from the carried wheel folder (benchmarks/gpu/.wheels,
# filled on a machine with network by benchmarks/gpu/fetch_wheels.sh) and makes genperc importable
# from this checkout; then benchmarks/gpu/gpu_bench.py runs the stages within GPU_BENCH_SECONDS
# (default 465 s from the start of this script, so the whole fits 8 minutes).
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUT [--smoke] [--only STAGES]   (docs/gpu.md)" >&2
  exit 2
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WHEELS=${GPU_WHEELS:-$ROOT/benchmarks/gpu/.wheels}
SITE=${GPU_SITE:-/tmp/genperc-site}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

step0() {
  echo "== step 0: environment ($(date -u +%FT%TZ))"
  uname -srm
  "$PY" --version
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: none (no GPU)"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || echo "WARNING: installing the carried wheels failed; stages that need them will say so"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheels in $WHEELS: using the packages already installed"
  fi
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
  # the editable install gives the `genperc` command and its metadata; only where genperc is not installed
  # already (never touch a shared development venv), and not needed by the stages (PYTHONPATH above)
  if ! "$PY" -c "import importlib.metadata as m; m.version('genperc')" >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" >/dev/null 2>&1 \
      && echo "pip install -e . --no-deps: done" || echo "pip install -e . failed: genperc runs from $ROOT/src"
  fi
  "$PY" -c "import genperc, torch; print('genperc', genperc.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
}

main() {
  step0
  local total=$(( ${GPU_BENCH_SECONDS:-465} - SECONDS ))
  local extra=()
  case " $* " in *" --smoke "*) ;; *) extra=(--total "$total") ;; esac
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  "$PY" "$ROOT/benchmarks/gpu/gpu_bench.py" "$OUT" "$@" "${extra[@]}"
}

main "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
