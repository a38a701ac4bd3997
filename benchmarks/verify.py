"""What ``load``'s verify pass costs per GB of stored vectors.

    python benchmarks/verify.py [--gb 1.0] [--repeat 3]

Fits an MLP whose first layer gives 2,048 values per sample with ``store=`` until the store holds
about ``--gb`` GB, saves the run, and times ``actclust.load`` with ``verify=True`` and
``verify=False``, with the files in the page cache (warm) and after asking the kernel to drop
them (cold: ``posix_fadvise(DONTNEED)`` on every file of the run; a disk's own cache may remain).
The difference is the verify pass: one streaming SHA-256 over every file. Writes
``benchmarks/results/verify.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import actclust

RESULTS = Path(__file__).resolve().parent / "results"


def drop_cache(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_load(run: Path, model, verify: bool, cold: bool) -> float:
    if cold:
        drop_cache(run)
    t = time.perf_counter()
    actclust.load(run, model, progress=False, verify=verify)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10)).eval()
    n = int(args.gb * 1e9 / ((2048 + 10) * 4))
    x = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="actclust-verify-", dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        ac = actclust.ActivationClustering(model, ["0", "2"], n_clusters=8, batch_size=4096, progress=False,
                                           store=tmp / "vectors").fit(x)
        fit_s = time.perf_counter() - t
        ac.save(tmp / "run")
        del ac, x
        run = tmp / "run"
        size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
        raw = {}
        for cold in (False, True):
            for verify in (True, False):
                raw[f"{'cold' if cold else 'warm'}_{'verify' if verify else 'no_verify'}_s"] = sorted(
                    timed_load(run, model, verify, cold) for _ in range(args.repeat))
        sample = next(run.glob("store-*/layer-0.bin"))
        buf = sample.read_bytes()[:256 << 20]
        t = time.perf_counter()
        hashlib.sha256(buf).hexdigest()
        sha_gbs = len(buf) / 1e9 / (time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in raw.items()}
    gb = size / 1e9
    result = {
        "command": f"python benchmarks/verify.py --gb {args.gb} --repeat {args.repeat}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": [round(v, 2) for v in os.getloadavg()]},
        "run_bytes": size, "n_samples": n, "fit_s": round(fit_s, 1), "load_s": raw,
        "verify_s_per_gb": {"warm": round((med["warm_verify_s"] - med["warm_no_verify_s"]) / gb, 3),
                            "cold": round((med["cold_verify_s"] - med["cold_no_verify_s"]) / gb, 3)},
        "sha256_gb_per_s_in_memory": round(sha_gbs, 2),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"run of {gb:.2f} GB ({n} samples; fit {fit_s:.0f} s)")
    for k, v in med.items():
        print(f"  load {k:<22} {v:7.2f} s")
    print(f"verify pass: {result['verify_s_per_gb']['warm']:.2f} s/GB warm, {result['verify_s_per_gb']['cold']:.2f} s/GB "
          f"cold; SHA-256 alone {sha_gbs:.2f} GB/s")


if __name__ == "__main__":
    main()
