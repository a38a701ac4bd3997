"""Where the numeric work after the model's pass runs: the host (NumPy, faiss) or the model's device.

A :class:`Backend` does the few heavy operations of fitting and of the analyses: squared distances
to cluster centres, k-means (k-means++ seeding and Lloyd iterations) and exact top-``k`` search by
inner product over rows streamed in chunks, merged across chunks. :data:`HOST` does them with NumPy,
scikit-learn and faiss (the results actclust always gave); a PyTorch model on a CUDA device gets
:class:`actclust.adapters.torch_compute.TorchBackend`, which runs the same steps as tensor operations
on that device and hands back only what is kept (ids, distances, centres). This module imports no
framework: the torch backend is imported only when a device asks for it.

The device is chosen by the estimator's ``device`` parameter (:func:`backend_for`): ``None`` (the
model's device), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``, or a :class:`Backend`
itself (the tests run the torch backend on the CPU this way).
"""

from __future__ import annotations

import re
import sys

from ..exceptions import ParameterError
from .base import Backend
from .host import HostBackend

__all__ = ["Backend", "HostBackend", "HOST", "backend_for", "check_device", "DEVICE_TEXT"]

#: What the ``device`` parameter may be, in messages.
DEVICE_TEXT = "None (the model's device), 'cpu', 'cuda', 'cuda:N', a torch.device or a compute Backend"
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
HOST = HostBackend()


def check_device(device) -> bool:
    """Whether ``device`` is of a form the ``device`` parameter takes (not whether it exists here)."""
    if device is None or isinstance(device, Backend):
        return True
    if isinstance(device, str):
        return bool(_DEVICE_RE.match(device))
    return type(device).__module__.split(".")[0] == "torch" and type(device).__name__ == "device"


def backend_for(device, model_device=None) -> Backend:
    """The backend of ``device`` (``None``: ``model_device``, the adapter's device, else the host).

    A CPU device is the host (NumPy, faiss): CPU results are those actclust always gave. A CUDA
    device needs torch with CUDA: without it, a :class:`ParameterError` says what was asked and what
    there is.
    """
    if isinstance(device, Backend):
        return device
    if not check_device(device):
        raise ParameterError(f"The 'device' parameter of ActivationClustering must be {DEVICE_TEXT}. "
                             f"Got {device!r} instead.")
    chosen = device if device is not None else model_device
    name = "cpu" if chosen is None else str(chosen)
    if name == "cpu" or name.startswith("cpu"):
        return HOST
    if not name.startswith("cuda"):
        return HOST  # another torch device type (mps, xla...): the host does the work, as before
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import importlib

            torch = importlib.import_module("torch")
        except ImportError:
            torch = None
    if torch is None or not torch.cuda.is_available():
        raise ParameterError(
            f"The 'device' parameter of ActivationClustering is {name!r}, but "
            + ("torch is not installed" if torch is None else "no CUDA device is available here")
            + "; pass device='cpu' (or None for the model's device).")
    if name.count(":") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ParameterError(f"The 'device' parameter of ActivationClustering is {name!r}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); pass one of 'cuda:0'.."
                             f"'cuda:{torch.cuda.device_count() - 1}' or 'cpu'.")
    from ..adapters.torch_compute import TorchBackend

    return TorchBackend(torch.device(name))
