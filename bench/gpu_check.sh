#!/usr/bin/env bash
# The device check (`make gpu-check`), on a machine with a GPU, with .whl/ and .gl/ from bench/gpu_prep.sh carried
# along: the carried wheels of whatever this Python cannot import go into a folder of their own put first on
# PYTHONPATH (the machine's own torch, timm and tensorboard stay as they are); then bench/gpu_check.py runs its parts
# within 8 minutes. Results in bench/results/gpu_check.json, and in $OUT/gpu_check.json when $OUT is set.
# GPU_CHECK_ARGS=--cpu rehearses it on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/uniemox-gpu-check-site}
MISSING=$("$PY" - <<'WHICH'
import glob, importlib.util, os
imports = {"open_clip_torch": "open_clip", "py_cpuinfo": "cpuinfo"}  # wheel name -> module, where they differ
names = sorted({os.path.basename(w).split("-")[0] for w in glob.glob(".whl/*.whl")})
print(" ".join(n for n in names if importlib.util.find_spec(imports.get(n, n).replace("-", "_")) is None))
WHICH
)
if [ -n "$MISSING" ]; then
  echo "gpu_check: installing from .whl into $SITE: $MISSING"
  "$PY" -m pip install -q --no-index --find-links .whl --no-deps --target "$SITE" $MISSING \
    || for name in $MISSING; do "$PY" -m pip install -q --no-index --find-links .whl --no-deps --target "$SITE" \
         "$name" || echo "gpu_check: $name could not be installed from .whl"; done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT_FILE=bench/results/gpu_check.json
timeout 480 "$PY" bench/gpu_check.py --data .gl --out "$OUT_FILE" ${GPU_CHECK_ARGS:-}
status=$?
[ -n "${OUT:-}" ] && [ -f "$OUT_FILE" ] && cp "$OUT_FILE" "$OUT/gpu_check.json"
exit $status
