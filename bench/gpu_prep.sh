#!/usr/bin/env bash
# What the device check carries to a GPU machine that reaches no package registry (`make gpu-prep`, here):
#   .whl/  wheels of what its image may lack (open_clip, webdataset, braceexpand, DeepSpeed, submitit and their
#          pure-Python and compiled dependencies), at the versions this venv runs, for Python 3.11 and 3.12
#   .gl/   shards of 1,024 web-size photos at max side 320 (about 25 MB)
# Both are ignored by git; carry them with the working tree, then run `bash bench/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
read -r -a PKGS < <("$PY" - <<'LIST'
import importlib.metadata as m
names = ["open_clip_torch", "webdataset", "braceexpand", "ftfy", "wcwidth", "regex", "hjson", "py-cpuinfo",
         "msgpack", "einops", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
         "submitit", "cloudpickle", "ninja", "psutil"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
LIST
)
DEEPSPEED=$("$PY" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
rm -rf .whl && mkdir -p .whl
for version in 3.11 3.12; do
  "$PY" -m pip download -q --only-binary=:all: --no-deps --python-version "$version" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl "${PKGS[@]}"
done
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DEEPSPEED"  # pure Python, built here
rm -rf .gl && "$PY" bench/gpu_check.py --prepare-data .gl
du -sh .whl .gl
