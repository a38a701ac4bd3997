"""What the commands read: built-in data sets and .npz files, models named by the user, saved runs."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np

from ..exceptions import DataNotFoundError, ModelImportError, ParameterError, UnsupportedModelError
from .common import command

__all__ = ["check_layers", "load_run", "import_factory", "build_model", "load_data"]


def check_layers(layers: list, model, spec: str) -> None:
    from ..adapters import adapt

    adapt(model).resolve(layers, what="--layers", how_to_list=f"List the valid names with: {command('layers', spec)}")


def load_run(args):
    from ..explainer import load
    from ..io.persistence import read_manifest

    meta = read_manifest(args.run).get("metadata", {})
    spec = args.model or meta.get("model")
    if not spec:
        raise ParameterError(f"The run at {args.run} does not say how to build its model; add --model with the "
                         "callable that builds it, as package.module:callable.")
    weights = args.weights or meta.get("weights")
    if weights and not Path(weights).is_absolute() and not args.weights:
        weights = str(Path(args.run) / weights)
    return load(args.run, build_model(spec, weights), progress=not args.quiet)


def import_factory(spec: str):
    """The callable named by ``package.module:callable``, importable from the current folder as with ``python -m``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ParameterError(f"The model must be given as 'package.module:callable' (e.g. mymodule:build); got {spec!r}.")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        file = Path(module_name)
        raise ParameterError(f"The model must be given as 'package.module:callable', a module name, not a file path; "
                         f"got {spec!r}. Run actclust in {file.parent} and give {file.stem}:{attr}.")
    cwd = os.getcwd()
    # A console script's sys.path starts with its bin folder, not the current one; add the
    # current folder first, as `python -m` does, so mymodule.py here is found.
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ModelImportError(
                f"Cannot import the model module {module_name!r}: no module {e.name!r} in the current folder "
                f"({cwd}) nor among the installed packages. Give the model as 'package.module:callable', "
                "importable from the folder you run actclust in (e.g. mymodule:build for mymodule.py there)."
            ) from None
        raise ModelImportError(f"Importing the model module {module_name!r} failed: {e}; install what it needs.") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ModelImportError(f"Module {module_name!r} has no attribute {attr!r}.") from None
    if not callable(factory):
        raise ParameterError(f"{spec} is a {type(factory).__name__}, not a callable that returns the model.")
    return factory


#: Model files the commands take directly, instead of a ``package.module:callable``.
MODEL_FILES = (".onnx", ".keras")


def is_model_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in MODEL_FILES


def build_model(spec: str, weights):
    """The model named on the command line: an ``.onnx`` or ``.keras`` file (loaded by its adapter), or
    what ``package.module:callable`` returns (a PyTorch module gets ``--weights``, a state dict)."""
    from ..adapters import adapt

    if is_model_file(spec):
        if weights:
            raise ParameterError(f"--weights is for a model built by package.module:callable; {spec} holds its own "
                                 "weights.")
        if not Path(spec).is_file():
            raise DataNotFoundError(f"Model file {spec} not found.")
        return adapt(spec)  # read once; the estimator takes the adapter
    factory = import_factory(spec)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(factory, torch.nn.Module):  # callable, but calling it would run forward()
        raise ParameterError(f"{spec} is a model instance; give a function or class that builds the model instead.")
    model = factory()
    try:
        adapter = adapt(model)
    except UnsupportedModelError:
        raise ParameterError(f"{spec} returned a {type(model).__name__}, not a model actclust can run (a torch.nn.Module, "
                             "a Keras model or an ONNX model).") from None
    if adapter.framework != "torch":
        if weights:
            raise ParameterError(f"--weights loads a PyTorch state dict; {spec} builds a {adapter.framework} model, which "
                                 "holds its own weights.")
        return adapter
    if weights:
        _load_state_dict(model, Path(weights), spec)
    return model.eval()


def _load_state_dict(model, path: Path, spec: str) -> None:
    torch = sys.modules["torch"]  # the model is a torch.nn.Module: torch is imported

    if not path.is_file():
        raise DataNotFoundError(f"Weights file {path} not found.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # only the file is read here: whatever fails, the file is not usable weights
        raise ParameterError(f"Cannot read {path} as a state dict ({type(e).__name__}: {e}). Save the weights with "
                             "torch.save(model.state_dict(), 'model.pt') or safetensors.") from None
    if not isinstance(state, dict):
        raise ParameterError(f"{path} holds a {type(state).__name__}, not a state dict; save "
                             "model.state_dict() rather than the model.")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ParameterError(f"The weights in {path} do not fit the model {spec} builds: {e}") from None


def load_data(spec: str, split: str):
    import zipfile

    from ..datasets import DATASETS, load_dataset

    if spec in DATASETS:
        x_tr, y_tr, x_te, y_te = load_dataset(spec)
        return (x_tr, y_tr) if split == "train" else (x_te, y_te)
    path = Path(spec)
    if path.suffix != ".npz":
        raise ParameterError(f"--data must be one of {list(DATASETS)} or an .npz file; got {spec!r}.")
    if not path.is_file():
        raise DataNotFoundError(f"Data file {path} not found.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name in ("x", "y")}
            files = sorted(data.files)
    except (OSError, ValueError, TypeError, zipfile.BadZipFile):  # TypeError: a lone .npy, not an archive
        # numpy's own message names its Python arguments (allow_pickle=); pickled data is refused
        raise ParameterError(f"Cannot read {path} as an .npz file of numeric arrays (pickled or object arrays are "
                         "not loaded, so a data file cannot run code); write it with numpy.savez(path, x=x, y=y).") from None
    if "x" not in arrays:
        raise ParameterError(f"{path} has no array named 'x' (it has {files}).")
    x, y = arrays["x"], arrays.get("y")
    if x.ndim == 0 or len(x) == 0:
        raise ParameterError(f"The array x in {path} holds no samples.")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise ParameterError(f"The array y in {path} must hold one label per sample of x ({len(x)}); "
                         f"it has shape {y.shape}.")
    return x, y
