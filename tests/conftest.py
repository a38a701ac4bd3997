import os
from pathlib import Path

# Keras reads its backend once, when first imported: JAX, whichever test imports keras first.
os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np
import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv -> in-place ReLU -> pool -> fc1 -> ReLU -> fc2 logits; weights fixed by the seed."""

    def __init__(self, n_classes=3, seed=0, bias=True):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, n_classes)
        self.unused = nn.Linear(3, 3)
        if not bias:
            with torch.no_grad():
                for m in (self.conv, self.fc1, self.fc2):
                    m.bias.zero_()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.flat(self.pool(self.relu(self.conv(x)))))))


LAYERS = ["conv", "fc1", "fc2"]


@pytest.fixture
def no_tf32():
    """Products and convolutions in full float32 on the GPU (TF32 would round them to 10 bits): the CUDA tests compare
    a GPU fit with a CPU one."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def model():
    return TinyCNN().eval()


@pytest.fixture
def mixed_model():
    """A TinyCNN whose predictions on ``data`` are a mix of classes (58, 45 and 17 of 120 samples).

    ``model`` predicts class 1 for every sample of ``data``: there, every cluster's class mix is the
    same and tests of posteriors, weights or fidelity cannot tell right from wrong.
    """
    return TinyCNN(seed=3, bias=False).eval()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    return x, y


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def fitted(model, data):
    """A k-means explainer fitted on ``data`` with labels; 4 clusters per layer."""
    from actclust import ActivationClustering

    x, y = data
    return ActivationClustering(model, LAYERS, n_clusters=4, progress=False).fit(x, y)


@pytest.fixture
def mixed_fitted(mixed_model, data):
    """Like ``fitted``, on ``mixed_model``."""
    from actclust import ActivationClustering

    x, y = data
    return ActivationClustering(mixed_model, LAYERS, n_clusters=4, progress=False).fit(x, y)


def layer_vectors(model: TinyCNN, x, spatial_grid=None) -> dict:
    """The vectors ActivationClustering's defaults (reducer="mean", normalize="l2") give for LAYERS,
    computed here from the modules directly (float64), as an oracle independent of the capture code.
    With ``spatial_grid=g``, the conv layer gives instead its retrieval summary: the map averaged
    over a g x g grid of cells, cell i spanning rows floor(i H / g) to ceil((i + 1) H / g) (the
    definition of adaptive average pooling), flattened, not normalised (4 channels x 16 cells:
    no wider than 64 values, so not projected)."""
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        conv = model.conv(t)
        fc1 = model.fc1(model.flat(model.pool(torch.relu(conv))))
        fc2 = model.fc2(model.act(fc1))
    out = {}
    if spatial_grid is None:
        conv_vector = conv.mean((2, 3))
    else:
        m, g = conv.double().numpy(), spatial_grid
        cells = [(i * m.shape[2] // g, -(-(i + 1) * m.shape[2] // g)) for i in range(g)]
        cols = [(j * m.shape[3] // g, -(-(j + 1) * m.shape[3] // g)) for j in range(g)]
        conv_vector = torch.from_numpy(np.stack([m[:, :, a:b, c:d].mean((2, 3)) for a, b in cells for c, d in cols],
                                                2).reshape(len(m), -1))
    for name, v in (("conv", conv_vector), ("fc1", fc1), ("fc2", fc2)):
        v = v.double().numpy()
        out[name] = v if name == "conv" and spatial_grid is not None else v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def sq_distances(a, b) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), brute force in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(2)


def in_ci() -> bool:
    """Whether the tests run under CI, which sets CI (``CI=true``); unset, empty, 0 or false: not CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def require_fashion_mnist(directory=None) -> Path:
    """The Fashion-MNIST folder, for a test that needs the real data; call it first in the test.

    Where a file is missing the test is skipped, except under CI (:func:`in_ci`), which installs
    the data (``.ci/run``): there it fails, so that a broken install cannot pass as a skip.
    """
    from actclust.datasets import FASHION_MNIST_DIR

    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    missing = [f for f in FASHION_MNIST_FILES if not (directory / f).exists() and not (directory / f"{f}.gz").exists()]
    if missing:
        why = (f"Fashion-MNIST files {missing} are not in {directory} "
               "(apt-get install -y dataset-fashion-mnist, or set ACTCLUST_FASHION_MNIST)")
        if in_ci():
            pytest.fail(f"CI must install Fashion-MNIST: {why}", pytrace=False)
        pytest.skip(why)
    return directory


# ---------------------------------------------------------------------------- user study helpers
XSS_CLASS = "<script>alert(1)</script>"  # a class name that must show as text, never run


@pytest.fixture(scope="session")
def study_source():
    """``(explainer, x, y)`` for building small studies: a TinyCNN fitted on 120 random 6x6 inputs.

    With random labels it is right on about a third of them, so both strata have enough items.
    """
    from actclust import ActivationClustering

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    return ActivationClustering(TinyCNN(seed=3, bias=False).eval(), LAYERS, n_clusters=4, progress=False).fit(x, y), x, y


def make_study(folder, source, **options) -> Path:
    """A study folder from ``study_source``: 12 items, half wrong, class 0 named :data:`XSS_CLASS`."""
    from actclust.study import create_study

    ac, x, y = source
    options = {"items": 12, "train": x, "class_names": [XSS_CLASS, "cat", "dog"], "k": 3, **options}
    return create_study(ac, x, y, folder, **options)


class LiveServer:
    """An ASGI ``app`` under uvicorn in a thread, on a loopback port the OS picked (``options``: uvicorn's)."""

    def __init__(self, app, name: str = "the server", **options):
        import socket
        import threading

        import uvicorn

        self.name = name
        # proto IPPROTO_TCP, as uvicorn's own sockets: asyncio sets TCP_NODELAY only on those, and
        # without it each response waits out the client's delayed ACK (~40 ms)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, **{"log_level": "warning", "access_log": False, **options})
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


class LiveStudyServer(LiveServer):
    """``actclust.study.app`` served live; ``app={...}`` are ``make_app``'s options, the others uvicorn's."""

    def __init__(self, folder, admin_token: str = "admin-secret-token", **options):
        from actclust.study.app import make_app

        self.admin_token = admin_token
        super().__init__(make_app(folder, admin_token, **options.pop("app", {})), "the study server", **options)


def _study_model():
    """The model of ``study_source``, as the CLI builds it (``--model conftest:_study_model``)."""
    return TinyCNN(seed=3, bias=False).eval()


def chromium_playwright():
    """``(chromium path, sync_playwright)`` for a browser test; call it first in the test.

    Skipped where Chromium or Playwright is missing, except under CI (:func:`in_ci`), which
    installs both: there it fails.
    """
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("CI must install chromium") if in_ci() else pytest.skip("no chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("CI must install playwright") if in_ci() else pytest.skip("no playwright")
    return chromium, sync_playwright


def require_ray():
    """The ``ray`` module, for a test of the Ray engine; call it first in the test (or fixture).

    Skipped where Ray Data is missing, except under CI (:func:`in_ci`), whose test extra installs
    it (``actclust[ray]``): there it fails.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        pytest.fail("CI must install ray[data] (the test extra's actclust[ray])") if in_ci() else pytest.skip("no ray")
    return ray


@pytest.fixture(scope="session")
def trained_digits_cnn():
    """A small CNN trained briefly on scikit-learn's digits (8x8): layers whose clusters mean something, so
    fits of the same weights in two frameworks can be compared (on an untrained network a last-bit difference
    can tip k-means++ into another local optimum). Returns (model, x_train, y_train, x_test, y_test)."""
    from actclust.datasets import load_digits
    from actclust.models import SmallCNN, train_classifier

    x_tr, y_tr, x_te, y_te = load_digits()
    torch.manual_seed(0)  # the initial weights too (training seeds itself): one network in every run, not a new draw
    model = train_classifier(SmallCNN(1, 10, 8, width=8, hidden=32), x_tr, y_tr, epochs=5, batch_size=64,
                             progress=False).eval()
    return model, x_tr, y_tr, x_te, y_te
