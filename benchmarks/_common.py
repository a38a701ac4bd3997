"""Shared pieces of the benchmarks: the cached Fashion-MNIST CNN, timing and memory probes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from actclust.datasets import load_fashion_mnist
from actclust import models
from actclust.models import accuracy, train_classifier

CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = Path(__file__).resolve().parent / "results"


def fashion_cnn(epochs: int = 6, progress: bool = True):
    """The benchmark CNN, trained once (about 90 s on 2 cores) and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    model = models.fashion_cnn()
    path = CACHE / f"fashion_cnn_e{epochs}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(as_uint8=True)
    train_classifier(model, x_tr, y_tr, epochs=epochs, batch_size=128, progress=progress)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))
    return model.eval()


def forward_seconds(model, x: torch.Tensor, batch_size: int) -> float:
    """Time of one plain ``model(x)`` pass over ``x`` in batches, no hooks: the baseline."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in x.split(batch_size):
            model(batch)
    return time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident memory every few ms while the block runs; ``.peak - .start``."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


def test_accuracy(model) -> float:
    _, _, x_te, y_te = load_fashion_mnist()
    return accuracy(model, x_te, y_te)
