#!/usr/bin/env bash
# The wheels a bare CUDA machine lacks to run tools/gpu_check.py (it has Python 3.12, a CUDA build of torch,
# numpy, scipy, einops, tensorboard, tqdm), for CPython 3.12 on manylinux x86-64, into .whl/ (git ignores it),
# and this project's own wheel beside them. Run it here, where pip reaches the registry; then, on the GPU machine,
# with no network:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 tools/gpu_check.py --output_dir gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
rm -rf "$out" && mkdir -p "$out"
# pinned: what this project is tested with (setup.cfg's ranges), one version of each
wheels=(
    monai==1.6.1 nibabel==5.4.2 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 attrs==26.1.0
    importlib-resources==7.1.0 packaging==26.2 typing-extensions==4.16.0
)
platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$out" "${wheels[@]}"
python -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" .
du -sh "$out"
ls "$out"
