"""Long steps show progress bars (on stderr), and progress=False keeps them quiet."""

import numpy as np
import pytest

from actclust import ActivationClustering

from conftest import LAYERS


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_on_long_steps(model, capsys, progress):
    x = np.random.default_rng(0).standard_normal((5000, 1, 6, 6)).astype(np.float32)
    ac = ActivationClustering(model, LAYERS, n_clusters=3, clustering="distill", progress=progress).fit(x[:600])
    ac.similar(x, k=2)  # 5,000 queries: more than one search chunk
    ac.trust(x[:10])
    ac.similar(x[:5], k=2, search="approximate")  # builds the index and calibrates it for these weights
    err = capsys.readouterr().err
    for step in ("capturing activations", "distilling", "searching similar samples", "calibrating trust",
                 "building the approximate index", "calibrating the approximate search"):
        assert (step in err) == progress, step
