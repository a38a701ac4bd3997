#!/usr/bin/env bash
# The GPU figures of issue 19 in one call of a lent device machine (an NVIDIA H200 with PyTorch, no network):
# the CUDA tests, then benchmarks/gpu.py's two cases, each under its own time limit so that one call of at most
# 600 s keeps what it measured (gpu.py rewrites its JSON after each step). Results land in $OUT.
#
# Prepare here, once per checkout (the device has every dependency but faiss, and no Fashion-MNIST):
#   mkdir -p .whl .gpu-data && cp /usr/share/datasets/fashion-mnist/*.gz .gpu-data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl faiss-cpu==1.15.1
# (.whl/ and .gpu-data/ are git-ignored; 19 + 30 MB, within the 64 MiB that travels.) Then:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpu-data"], timeout_s=600)
# and merge $OUT/gpu-*.json into benchmarks/results/gpu.json (with the hardware it records).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || { echo "python3 is $(python3 -V 2>&1), the faiss wheel is for 3.12: download it for this version (top of this script)"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "faiss wheel missing: see the top of this script"; exit 1; }
# The ResNet-50 case's loader workers hand 154 MB batches through /dev/shm; a container's default 64 MB would kill
# them (bus error): with less than 4 GB there, the images are made in the main process.
WORKERS=12
[ "$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')" -ge 4000000 ] 2>/dev/null \
    || { WORKERS=0; echo "/dev/shm has under 4 GB free: --workers 0"; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 ACTCLUST_FASHION_MNIST=$PWD/.gpu-data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-hardware.txt"
python3 -c "import torch, faiss, actclust; print(torch.__version__, faiss.__version__, actclust.__file__)"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_compute.py tests/test_explainer.py \
    -k "cuda or device" 2>&1 | tail -15 | tee "$OUT/gpu-tests.txt"
timeout 200 python3 benchmarks/gpu.py --cases resnet18 --no-compile --out "$OUT/gpu-resnet18.json" 2>&1 | tail -30
timeout 240 python3 benchmarks/gpu.py --cases resnet50 --workers $WORKERS --out "$OUT/gpu-resnet50.json" 2>&1 | tail -30
ls -la "$OUT"
