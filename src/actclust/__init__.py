"""actclust: explain a PyTorch classifier by clustering the activations of its layers.

Method: Liu & Arik, "Explaining Deep Neural Networks using Unsupervised Clustering" (2020).
"""

__version__ = "0.1.0"

from .adapters import ModelAdapter, adapt
from .adapters.torch import TorchAdapter, list_layers
from . import _idec, _distill  # noqa: F401,I001  (they register the "idec" and "distill" clusterings)
from .clustering import Clustering, KMeans
from .concepts import Concept
from .exceptions import (ActClustError, ActClustWarning, CaptureError, ConvergenceWarning, DataError,
                         DataNotFoundError, DataWarning, DistillWarning, IDECTrainingError, IDECWarning,
                         InvalidSaveError, ModelImportError, ModelMismatchWarning, NotFittedError, ParameterError,
                         RenderWarning, RunExistsError, TrustWarning, UnsupportedModelError)
from .explainer import ActivationClustering
from .explanation import Explanation
from .persistence import load, model_fingerprint
from .reduction import Reducer, make_reducer
from .report import report  # the function; the module stays importable as actclust.report
from .retrieval import Neighbours
from .state import FittedState, InputSpec, Query

__all__ = [
    "ActivationClustering", "list_layers", "load", "model_fingerprint", "report",
    "FittedState", "InputSpec", "Query", "ModelAdapter", "TorchAdapter", "adapt",
    "Explanation", "Concept", "Neighbours",
    "Clustering", "KMeans", "Reducer", "make_reducer",
    "ActClustError", "ParameterError", "NotFittedError", "CaptureError", "UnsupportedModelError", "DataError",
    "InvalidSaveError", "RunExistsError", "DataNotFoundError", "ModelImportError", "IDECTrainingError",
    "ActClustWarning", "ModelMismatchWarning", "ConvergenceWarning", "DistillWarning", "IDECWarning",
    "RenderWarning", "DataWarning", "TrustWarning",
    "__version__",
]
