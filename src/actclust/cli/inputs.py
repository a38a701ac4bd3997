"""What the commands read: built-in data sets and .npz files, models named by the user, saved runs.

A saved run records how to rebuild its model (``metadata.model``, ``metadata.weights``), but a run
folder may come from anyone, so the commands treat that record as data, not as instructions (see
``docs/security.md``): they build a recorded model only when it is one of actclust's own builders
(:data:`TRUSTED_MODELS`, imported from the installed package, the current folder and the run
folder never searched), when the user names it (``--model``), or when the user opts in
(``--trust-run-model``, which says what it will import first and never imports from the run
folder). Recorded weights are read only from inside the run folder, only as safetensors, checked
against their SHA-256 in the manifest. A run fitted on an ONNX file keeps a copy of it
(``model-<hash>.onnx``): an ONNX graph is data (onnxruntime runs its operators, no Python), so it is
loaded by default, from inside the run, checked by its SHA-256. A recorded ``.keras`` file is not:
Keras deserialisation has had ways around its safe mode, so it needs ``--model`` or ``--trust-run-model``.
"""

from __future__ import annotations

import importlib
import os
import stat
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..exceptions import DataNotFoundError, InvalidSaveError, ModelImportError, ParameterError, UnsupportedModelError
from .common import command

__all__ = ["check_layers", "load_run", "import_factory", "build_model", "load_data", "TRUSTED_MODELS",
           "recorded_weights", "recorded_file", "locate_module", "MODEL_FILES", "is_model_file", "check_inputs"]

#: Model files the commands take directly, instead of a ``package.module:callable``.
MODEL_FILES = (".onnx", ".keras")

#: Model builders shipped with actclust: a run that records one of them is rebuilt without opt-in;
#: they are our code, imported from the installed package, not anything the run folder holds.
TRUSTED_MODELS = ("actclust.models:digits_cnn", "actclust.models:fashion_cnn", "actclust.models:resnet18")


def check_layers(layers: list, model, spec: str) -> None:
    from ..adapters import adapt

    adapt(model).resolve(layers, what="--layers", how_to_list=f"List the valid names with: {command('layers', spec)}")


def load_run(args):
    """The saved run at ``args.run`` bound to its model, built as the module's docstring says: its manifest, the
    model's files it records and the run itself read under the folder's lock, shared, as ``load`` reads a run (read
    before it, a save in between gave one save's weights with another's run: an outside check)."""
    from ..io import atomic

    with atomic.reading(Path(args.run)):
        return _load_run(args)


def _load_run(args):
    from ..explainer import load
    from ..io.persistence import read_manifest

    run = Path(args.run)
    manifest = read_manifest(run)
    meta = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
    weights = args.weights or recorded_weights(run, manifest)
    if args.model:  # named by the user: imported as `actclust fit` does, never from inside the run folder
        if is_model_file(args.model) and not args.weights:
            weights = None  # an .onnx or .keras file holds its own: the run's PyTorch weights are not for it
        if not is_model_file(args.model):
            _refuse_code_inside(args.model, run, "--model")
        model = build_model(args.model, weights, run)
        if weights is None and not is_model_file(args.model):
            _check_untrained(model, manifest, run, args.model)
        return load(run, model, progress=not args.quiet)
    spec = meta.get("model")
    if not isinstance(spec, str) or not spec:
        raise ParameterError(f"The run at {run} does not say how to build its model (a run saved from Python keeps "
                             "neither the model nor its weights); add --model with the callable that builds it, as "
                             "package.module:callable, and --weights with its trained weights (a .safetensors file) "
                             "unless the callable loads them itself.")
    if spec.endswith(".onnx"):  # a graph kept in the run: data, read from inside the run only
        from ..adapters import adapt

        return load(run, adapt(_whole_onnx(recorded_file(run, manifest, "model", (".onnx",)), run)),
                    progress=not args.quiet)
    if spec.endswith(".keras") and getattr(args, "trust_run_model", False):
        return load(run, build_model(str(recorded_file(run, manifest, "model", (".keras",))), None),
                    progress=not args.quiet)
    if spec.endswith(".keras"):
        raise ModelImportError(
            f"The run at {run} records its model as the Keras file {spec!r}; loading a .keras file can run code its "
            "author chose, so actclust does not load one a run folder holds unless you ask: add --model with your own "
            "copy of the model, or add --trust-run-model.")
    if spec in TRUSTED_MODELS:
        factory = _trusted_factory(spec)
    elif getattr(args, "trust_run_model", False):
        factory = _opted_in_factory(spec, run, args)
    else:
        raise ModelImportError(
            f"The run at {run} records its model as {spec!r}, which is not one of actclust's own model builders. "
            "actclust does not import code a run folder names (a folder someone sends you could name its own code). "
            "Name the model yourself with --model package.module:callable, code you have read (imported as "
            "'actclust fit' does, from the current folder or the installed packages; never from inside the run "
            "folder), or add --trust-run-model if you trust the run."
        )
    return load(run, _build(factory, spec, weights, run), progress=not args.quiet)


def _check_untrained(model, manifest: dict, run: Path, spec: str) -> None:
    """Refuse the model ``spec`` built without weights where its parameters are not the fitted model's: the run records
    no weights (saved from Python, also over a run the command line had saved) and none were given, so the model is
    as the callable makes it, untrained unless it loads its own. It was scored with a warning alone (fidelity 0.0: an
    outside check)."""
    from ..adapters import adapt

    if adapt(model).fingerprint() != manifest.get("model_fingerprint"):
        raise ParameterError(
            f"The run at {run} records no model weights, none were given, and the model {spec} builds has other "
            "parameters than the one the run was fitted with (untrained?): add --weights with its trained weights (a "
            ".safetensors or .pt state dict), or make the callable load them.")


def _trusted_factory(spec: str):
    """One of :data:`TRUSTED_MODELS`, from the installed actclust: ``actclust`` is already imported,
    so its submodules are found through its own ``__path__``, never through ``sys.path``."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _opted_in_factory(spec: str, run: Path, args):
    """``--trust-run-model``: say what will run, refuse code inside the run folder, then import."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ParameterError(f"The run at {run} records its model as {spec!r}, not as 'package.module:callable'.")
    origins = locate_module(module_name, [os.getcwd(), *[p for p in sys.path if p]])
    if not origins:
        raise ModelImportError(f"--trust-run-model: the module {module_name!r} that the run at {run} records is "
                               f"neither in the current folder ({os.getcwd()}) nor among the installed packages.")
    _refuse_code_inside(spec, run, "--trust-run-model", origins)
    print(f"actclust {args.command}: --trust-run-model: importing {module_name!r} (running "
          f"{', '.join(str(o) for o in origins)}) and calling {attr}(), as recorded in the run at {run}",
          file=sys.stderr)
    return import_factory(spec, run)


def _refuse_code_inside(spec: str, run: Path, flag: str, origins: Optional[list] = None) -> None:
    """Refuse a model module (or one of its packages' ``__init__`` files) that lies inside the run folder: a run someone
    sends you can hold its own code, and ``--model`` taken from inside it (from the folder, or as ``run.module``) ran
    it, while the docs promised it refused (an outside check)."""
    module_name = spec.partition(":")[0]
    if origins is None:
        origins = locate_module(module_name, [os.getcwd(), *[p for p in sys.path if p]]) if module_name else []
    inside = [o for o in origins if _is_within(o, run)]
    if inside:
        raise ModelImportError(f"The model {spec!r} ({flag}) is code that lies inside the run folder {run} "
                               f"({inside[0]}); actclust never imports code from a run folder, even with {flag}. "
                               "Copy the module elsewhere after reading it, and give --model from there.")


def locate_module(module_name: str, search: list) -> list:
    """The files that importing ``module_name`` would run (its packages' ``__init__`` files and the
    module), found without running anything; ``[]`` when it is not found. Modules already imported
    give their own file."""
    from importlib.machinery import PathFinder

    parts, origins, path = module_name.split("."), [], list(search)
    for i in range(len(parts)):
        name = ".".join(parts[:i + 1])
        if name in sys.modules:
            module = sys.modules[name]
            origin, path = getattr(module, "__file__", None), list(getattr(module, "__path__", []) or [])
        else:
            spec = PathFinder.find_spec(name, path)
            if spec is None:
                return []
            origin, path = spec.origin, list(spec.submodule_search_locations or [])
        if origin and origin not in ("built-in", "frozen", "namespace"):
            origins.append(Path(origin))
        else:
            origins.extend(Path(p) for p in path)  # a namespace package: its folders
    return origins


def _is_within(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def recorded_weights(run: Path, manifest: dict):
    """The weights file the run records, or None (see :func:`recorded_file`)."""
    return recorded_file(run, manifest, "weights", (".safetensors",))


def _whole_onnx(path: Path, run: Path):
    """The ONNX graph a run keeps, read whole from its one file, which the manifest pins by its SHA-256: one that
    keeps tensors in other files (ONNX's external data, which ``actclust fit`` never writes) is refused, as no hash
    of the run pins those files."""
    from ..adapters.onnx import external_tensors, load_onnx
    from ..deps import require

    onnx = require("onnx", "explaining an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # the protobuf decoder's errors vary by version
        raise InvalidSaveError(f"{path} is not an ONNX model ({type(e).__name__}: {str(e)[:200]}).") from None
    if external_tensors(proto):
        raise InvalidSaveError(f"The model {path.name} that the run at {run} keeps stores tensors in other files "
                               "(ONNX external data), which no SHA-256 of the run pins; actclust reads a run's model "
                               "from its one file only. Add --model with a model file of your own.")
    return load_onnx(proto)


def _as_model_takes(x: np.ndarray, adapter, spec: str) -> np.ndarray:
    """A built-in data set's channels-first images ``x``, or the same moved channels-last where only those are what
    the model takes (its adapter's input check; a PyTorch model's checks nothing, so stays channels-first)."""
    from ..exceptions import ActClustError, DataError

    refused = []

    def takes(a) -> bool:
        try:
            adapter.check_inputs(a[:2], f"--data {spec}")
            return True
        except ActClustError as e:
            refused.append(str(e))
            return False

    if x.ndim != 4 or takes(x):
        return x
    moved = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    if takes(moved):
        return moved
    # neither (another image size): what the model takes, said of the layout it does not ask to move to
    said = refused[1] if "np.moveaxis" in refused[0] else refused[0]
    raise DataError(f"{said} Neither layout of the built-in {spec} images ({x.shape[1]} x {x.shape[2]} x "
                    f"{x.shape[3]}) fits the model: give --data an .npz of the inputs it takes.")


def recorded_file(run: Path, manifest: dict, key: str, suffixes: tuple):
    """The file the run records under ``metadata[key]``, or None: a relative path inside the run folder
    (no ``..``, no link on the way, a regular file ending in one of ``suffixes``), checked against its
    SHA-256 when the manifest records one."""
    from ..io import atomic

    meta = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
    recorded = meta.get(key)
    if recorded is None:
        return None
    what = "weights" if key == "weights" else "model"
    own = f"; add --{what} with a {what} file of your own to use one."
    rel = Path(recorded) if isinstance(recorded, str) and recorded else None
    if rel is None or rel.is_absolute() or ".." in rel.parts or rel.drive:
        raise InvalidSaveError(f"The run at {run} records its {what} as {recorded!r}, which is not a path inside the run "
                               "folder; actclust reads the files a run records only from inside it" + own)
    here = run
    for part in rel.parts:
        here = here / part
        if here.is_symlink():
            raise InvalidSaveError(f"The {what} {recorded!r} that the run at {run} records pass through the link "
                                   f"{here}, which could point out of the run folder; actclust does not follow it" + own)
    path = run / rel
    if not path.exists():
        raise DataNotFoundError(f"The {what} file {path} that the run at {run} records is missing" + own)
    if not stat.S_ISREG(path.lstat().st_mode) or not _is_within(path, run):
        raise InvalidSaveError(f"The {what} {path} that the run at {run} records are not a regular file in the run" + own)
    if path.suffix not in suffixes:
        raise InvalidSaveError(f"The run at {run} records the {what} {recorded!r}, which are not a {' or '.join(suffixes)} "
                               "file; a run's files are read as JSON, safetensors and ONNX only (a .pt file is a pickle)"
                               + own)
    expected = (manifest.get("files") or {}).get(recorded) if isinstance(manifest.get("files"), dict) else None
    if expected is not None and atomic.sha256_file(path) != expected:
        raise InvalidSaveError(f"{path} does not match its SHA-256 in the run's manifest: the {what} file was changed "
                               "after saving. Restore it, or fit and save again" + own)
    return path


def import_factory(spec: str, run: Optional[Path] = None):
    """The callable named by ``package.module:callable``, importable from the current folder as with ``python -m``
    (not where the current folder lies inside ``run``, the run folder being read)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ParameterError(f"The model must be given as 'package.module:callable' (e.g. mymodule:build); got {spec!r}.")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        file = Path(module_name)
        raise ParameterError(f"The model must be given as 'package.module:callable', a module name, not a file path; "
                         f"got {spec!r}. Run actclust in {file.parent} and give {file.stem}:{attr}.")
    cwd = os.getcwd()
    # A console script's sys.path starts with its bin folder, not the current one; add the current folder first, as
    # `python -m` does, so mymodule.py here is found, but only while the model's module is imported: left first, a
    # torch.py or jinja2.py here would be what every later import found. Never inside the run folder being read,
    # whose files a run someone sends you chooses (an outside check: its jinja2.py ran under --model).
    add = cwd not in sys.path and "" not in sys.path and not (run is not None and _is_within(Path(cwd), run))
    if add:
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
    finally:
        if add:  # last, not first: the module's own later imports of its neighbours still find them, after the packages
            if cwd in sys.path:
                sys.path.remove(cwd)
            sys.path.append(cwd)
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ModelImportError(f"Module {module_name!r} has no attribute {attr!r}.") from None
    if not callable(factory):
        raise ParameterError(f"{spec} is a {type(factory).__name__}, not a callable that returns the model.")
    return factory


def check_inputs(x, ac, option: str) -> None:
    """Refuse arrays whose per-sample shape is not what the run's model takes, in option terms."""
    spec = ac.state_.input_spec
    if spec.kind != "tensor" or not isinstance(x, np.ndarray):
        return
    want, got = tuple(spec.shape), tuple(x.shape[1:])
    sequence = len(want) == 1 and x.dtype.kind in "iu"
    if got != want and not (sequence and len(got) == 1):
        hint = (f" (same number of values: reshape with x.reshape(-1, {', '.join(map(str, want))}))"
                if int(np.prod(got)) == int(np.prod(want)) else "")
        raise ParameterError(f"{option} holds inputs of shape {got} per sample, but the run's model takes {want}; "
                             f"give data of that shape{hint}.")


def is_model_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in MODEL_FILES


def build_model(spec: str, weights, run: Optional[Path] = None):
    """The model named on the command line: an ``.onnx`` or ``.keras`` file (read by its adapter), or what
    ``package.module:callable`` returns, with ``weights`` (a path to a PyTorch state dict) loaded into it;
    ``run``: the run folder being read, whose files are never imported."""
    from ..adapters import adapt

    if is_model_file(spec):
        if weights:
            raise ParameterError(f"--weights is for a model built by package.module:callable; {spec} holds its own "
                                 "weights.")
        if not Path(spec).is_file():
            raise DataNotFoundError(f"Model file {spec} not found.")
        return adapt(spec)  # read once; the estimator takes the adapter
    return _build(import_factory(spec, run), spec, weights, run)


def _build(factory, spec: str, weights, run: Optional[Path] = None):
    from ..adapters import adapt

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(factory, torch.nn.Module):  # callable, but calling it would run forward()
        raise ParameterError(f"{spec} is a model instance; give a function or class that builds the model instead.")
    model = factory()  # the user's code: what it raises is theirs to read, traceback and all (exit code 1)
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
        _load_state_dict(model, Path(weights), spec, run)
    return model.eval()


def _load_state_dict(model, path: Path, spec: str, run: Optional[Path] = None) -> None:
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
        if run is not None and _is_within(path, run):  # the run's own file: damaged, not saved the wrong way by the user
            raise InvalidSaveError(f"The run at {run} keeps its model's weights in {path.name}, which cannot be read "
                                   f"({type(e).__name__}: {str(e)[:200]}): the run is damaged. Give the weights with "
                                   "--weights, or ask its author for the run again.") from None
        raise ParameterError(f"Cannot read {path} as a state dict ({type(e).__name__}: {e}). Save the weights with "
                             "torch.save(model.state_dict(), 'model.pt') or safetensors.") from None
    if not isinstance(state, dict):
        raise ParameterError(f"{path} holds a {type(state).__name__}, not a state dict; save "
                             "model.state_dict() rather than the model.")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ParameterError(f"The weights in {path} do not fit the model {spec} builds: {e}") from None


def load_data(spec: str, split: str, adapter=None):
    """``(x, y)`` of ``--data``/``--train``: a built-in data set's split, or an ``.npz``. A built-in set's images are
    channels-first; where ``adapter``'s model takes them channels-last (a Keras model, an NHWC ONNX graph: its input
    check refuses them as they are and takes them moved), they are given so, as a user could not move them."""
    import zipfile

    from ..datasets import DATASETS, load_dataset

    if spec in DATASETS:
        x_tr, y_tr, x_te, y_te = load_dataset(spec)
        x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
        return (x if adapter is None else _as_model_takes(x, adapter, spec)), y
    path = Path(spec)
    if path.suffix != ".npz":
        raise ParameterError(f"--data must be one of {list(DATASETS)} or an .npz file; got {spec!r}.")
    if not path.is_file():
        raise DataNotFoundError(f"Data file {path} not found.")
    names = adapter.input_names() if adapter is not None else None  # a model of several named inputs
    try:
        with np.load(path, allow_pickle=False) as data:
            wanted = ("x", "y", *(names if names and "x" not in data.files else ()))
            arrays = {name: data[name] for name in data.files if name in wanted}
            files = sorted(data.files)
            if names and "x" not in arrays and adapter.framework == "torch":  # forward's parameters: some optional
                names = [n for n in names if n in arrays] or names
    except (OSError, ValueError, TypeError, zipfile.BadZipFile):  # TypeError: a lone .npy, not an archive
        # numpy's own message names its Python arguments (allow_pickle=); pickled data is refused
        raise ParameterError(f"Cannot read {path} as an .npz file of numeric arrays (pickled or object arrays are "
                         "not loaded, so a data file cannot run code); write it with numpy.savez(path, x=x, y=y).") from None
    if "x" not in arrays and names and all(n in arrays for n in names):  # one array per input, by name
        x, y = {n: arrays[n] for n in names}, arrays.get("y")
        lengths = {n: len(v) if v.ndim else 0 for n, v in x.items()}
        if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
            raise ParameterError(f"The arrays {names} in {path} must hold the same number of samples, at least one; "
                                 f"they hold {lengths}.")
        if y is not None and (y.ndim != 1 or len(y) != next(iter(lengths.values()))):
            raise ParameterError(f"The array y in {path} must hold one label per sample ({next(iter(lengths.values()))}); "
                                 f"it has shape {y.shape}.")
        return x, y
    if "x" not in arrays:
        several = (f"; the model takes the inputs {names}: give one array per input name (numpy.savez(path, "
                   + ", ".join(f"{n}=..." for n in names) + ", y=y))") if names and len(names) <= 8 else ""
        raise ParameterError(f"{path} has no array named 'x' (it has {files}){several}.")
    x, y = arrays["x"], arrays.get("y")
    if x.ndim == 0 or len(x) == 0:
        raise ParameterError(f"The array x in {path} holds no samples.")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise ParameterError(f"The array y in {path} must hold one label per sample of x ({len(x)}); "
                         f"it has shape {y.shape}.")
    return x, y
