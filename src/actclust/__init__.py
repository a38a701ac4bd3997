"""actclust: explain a PyTorch classifier by clustering the activations of its layers.

Method: Liu & Arik, "Explaining Deep Neural Networks using Unsupervised Clustering" (2020).
"""

__version__ = "0.1.0"

from ._capture import list_layers
from .clustering import Clustering, KMeans
from .concepts import Concept
from .exceptions import (ActClustError, CaptureError, DataError, InvalidSaveError, ModelMismatchWarning,
                         NotFittedError)
from .explainer import ActivationClustering
from .explanation import Explanation
from .persistence import load, model_fingerprint
from .reduction import Reducer, make_reducer
from .report import report  # the function; the module stays importable as actclust.report
from .retrieval import Neighbours

__all__ = [
    "ActivationClustering", "list_layers", "load", "model_fingerprint", "report",
    "Explanation", "Concept", "Neighbours",
    "Clustering", "KMeans", "Reducer", "make_reducer",
    "ActClustError", "CaptureError", "DataError", "InvalidSaveError", "ModelMismatchWarning", "NotFittedError",
    "__version__",
]
