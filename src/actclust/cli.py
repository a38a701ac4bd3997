"""The ``actclust`` command: ``demo``, ``fit``, ``score``, ``report`` and ``layers``.

Exit codes: 0 success; 2 bad usage or bad input (the message says what to change); 1 an
unexpected error (with its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_USAGE = 0, 2  # an unexpected error leaves Python's own exit status, 1
DEMO_LAYERS = ["conv1", "conv2", "fc1", "fc2"]
DEMO_OUT = "actclust-demo"


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .exceptions import ActClustError

    try:
        return args.func(args)
    except (ActClustError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"actclust {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actclust", description="Explain a PyTorch classifier by clustering its activations.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"actclust {__version__}")
    sub = p.add_subparsers(dest="command")

    d = sub.add_parser("demo", help="train a small CNN on scikit-learn's digits, fit and score the surrogate")
    d.add_argument("--out", default=DEMO_OUT,
                   help="directory of the saved run (default: %(default)s, replaced on each demo run)")
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument("--n-clusters", type=int, default=15)
    _common(d)
    d.set_defaults(func=_demo)

    f = sub.add_parser("fit", help="fit the surrogate of your model and save the run")
    f.add_argument("model", help="import path of a callable returning the nn.Module, e.g. pkg.mod:build")
    f.add_argument("--weights", help="state dict to load into the model (.safetensors, or .pt loaded with weights_only)")
    f.add_argument("--data", required=True, help="'digits', 'fashion-mnist', or an .npz with x (and optional y)")
    f.add_argument("--layers", required=True, help="comma-separated module names; see 'actclust layers'")
    f.add_argument("--n-clusters", type=int, default=15)
    f.add_argument("--reducer", default="mean")
    f.add_argument("--posterior", default="prediction", choices=["prediction", "label"])
    f.add_argument("--layer-weights", default=None, help="'fit', or comma-separated numbers (default: equal)")
    f.add_argument("--clustering", default="kmeans", choices=["kmeans", "distill", "idec"],
                   help="kmeans (default), distill (refined toward the DNN: most faithful) or idec (the paper's)")
    f.add_argument("--batch-size", type=int, default=256)
    f.add_argument("--out", required=True, help="directory of the saved run")
    _common(f)
    f.set_defaults(func=_fit)

    s = sub.add_parser("score", help="fidelity and accuracy of a saved run on data")
    s.add_argument("run", help="directory of a saved run")
    s.add_argument("--data", required=True, help="'digits', 'fashion-mnist' (test split), or an .npz with x (and y)")
    s.add_argument("--model", help="import path of the model callable (default: the one the run was fitted with)")
    s.add_argument("--weights", help="state dict for the model (default: the one the run was fitted with)")
    s.add_argument("--json", action="store_true", help="print the scores as JSON")
    _common(s, overwrite=False)
    s.set_defaults(func=_score)

    r = sub.add_parser("report", help="write a self-contained HTML report of a saved run on data")
    r.add_argument("run", help="directory of a saved run")
    r.add_argument("--data", required=True,
                   help="'digits' or 'fashion-mnist' (explains the test split, shows the training split), "
                        "or an .npz with x (and y) to explain")
    r.add_argument("--train", help="an .npz whose x is the training data the run was fitted on (for .npz --data)")
    r.add_argument("--out", default="report.html", help="HTML file to write (default: %(default)s)")
    r.add_argument("--n-correct", type=int, default=4, help="inputs the DNN got right to explain")
    r.add_argument("--n-wrong", type=int, default=4, help="inputs the DNN got wrong to explain")
    r.add_argument("--model", help="import path of the model callable (default: the one the run was fitted with)")
    r.add_argument("--weights", help="state dict for the model (default: the one the run was fitted with)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _common(r, overwrite=False)
    r.set_defaults(func=_report)

    lay = sub.add_parser("layers", help="list the layer names of a model")
    lay.add_argument("model")
    lay.set_defaults(func=_layers)
    return p


def _common(p, overwrite=True):
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace a saved run at --out")


# ---------------------------------------------------------------------------- commands
def _demo(args) -> int:
    import torch

    from . import ActivationClustering
    from .datasets import load_digits
    from .models import accuracy, digits_cnn, train_classifier
    from .persistence import check_writable

    out = Path(args.out)
    # The default folder belongs to the demo: each demo run replaces it, and says so.
    overwrite = args.overwrite or args.out == DEMO_OUT
    check_writable(out, overwrite)  # before training, not after
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits()
    t0 = time.perf_counter()
    model = train_classifier(digits_cnn(), x_tr, y_tr, epochs=args.epochs, batch_size=32, progress=not args.quiet)
    _say(args, f"trained a small CNN on {len(x_tr)} digits in {time.perf_counter() - t0:.1f} s; "
               f"test accuracy {accuracy(model, x_te, y_te):.3f}")
    ac = ActivationClustering(model, DEMO_LAYERS, n_clusters=args.n_clusters, progress=not args.quiet)
    t0 = time.perf_counter()
    ac.fit(x_tr, y_tr)
    _say(args, f"fitted the surrogate over {', '.join(DEMO_LAYERS)} in {time.perf_counter() - t0:.1f} s")
    print(format_scores(ac.score(x_te, y_te), ac))
    if overwrite and (out / "manifest.json").exists():
        _say(args, f"replacing the previous run in {out}/")
    _save(ac, out, overwrite, {"model": "actclust.models:digits_cnn", "weights": "model.safetensors"}, model)
    from .report import report

    path = report(ac, x_te, y_te, out=out / "report.html", train=x_tr, title="actclust demo: a small CNN on digits",
                  overwrite=True)  # the run folder was just (re)written by this demo
    print(f"wrote the HTML report {path}: open it in a browser")
    return EXIT_OK


def _fit(args) -> int:
    from . import ActivationClustering
    from .persistence import check_writable

    weights = args.layer_weights
    if weights is not None and weights != "fit":
        try:
            weights = [float(v) for v in weights.split(",")]
        except ValueError:
            raise ValueError(f"--layer-weights must be 'fit' or comma-separated numbers; got {weights!r}.") from None
    check_writable(args.out, args.overwrite)  # fail before the long fit, not after it
    model = _build_model(args.model, args.weights)
    x, y = _load_data(args.data, "train")
    ac = ActivationClustering(
        model, [l.strip() for l in args.layers.split(",") if l.strip()], n_clusters=args.n_clusters,
        reducer=args.reducer, posterior=args.posterior, layer_weights=weights, clustering=args.clustering,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    ac.fit(x, y)
    print(format_scores(ac.train_score_, ac, title="on the training data (in-sample)"))
    weights_path = str(Path(args.weights).resolve()) if args.weights else None
    _save(ac, Path(args.out), args.overwrite, {"model": args.model, "weights": weights_path}, None)
    return EXIT_OK


def _score(args) -> int:
    import json

    ac = _load_run(args)
    x, y = _load_data(args.data, "test")
    scores = ac.score(x, y)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores, ac, title=f"on {args.data}"))
    return EXIT_OK


def _report(args) -> int:
    from .datasets import DATASETS, FASHION_MNIST_CLASSES
    from .report import report

    ac = _load_run(args)
    x, y = _load_data(args.data, "test")
    if args.train:
        train = _load_data(args.train, "train")[0]
    elif args.data in DATASETS:
        train = _load_data(args.data, "train")[0]
    else:
        train = None
        _say(args, "no --train given: training samples are shown by their index")
    names = list(FASHION_MNIST_CLASSES) if args.data == "fashion-mnist" else None
    path = report(ac, x, y, train=train, out=args.out, n_correct=args.n_correct, n_wrong=args.n_wrong,
                  overwrite=args.overwrite,
                  class_names=names, title=f"actclust report: {Path(args.run).name} on {Path(args.data).name}")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser")
    return EXIT_OK


def _layers(args) -> int:
    from ._capture import list_layers

    for name in list_layers(_build_model(args.model, None)):
        print(name)
    return EXIT_OK


# ---------------------------------------------------------------------------- helpers
def _say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _load_run(args):
    from .persistence import load, read_manifest

    meta = read_manifest(args.run).get("metadata", {})
    spec = args.model or meta.get("model")
    if not spec:
        raise ValueError(f"The run at {args.run} does not say how to build its model; pass --model pkg.mod:build.")
    weights = args.weights or meta.get("weights")
    if weights and not Path(weights).is_absolute() and not args.weights:
        weights = str(Path(args.run) / weights)
    return load(args.run, _build_model(spec, weights), progress=not args.quiet)


def _save(ac, out: Path, overwrite: bool, metadata: dict, model) -> None:
    ac.save(out, overwrite=overwrite, metadata=metadata)
    if model is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    print(f"saved the run to {out}/ (score it again with: actclust score {out} --data ...)")


def _build_model(spec: str, weights):
    import torch

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"The model must be given as 'package.module:callable'; got {spec!r}.")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except AttributeError:
        raise ImportError(f"Module {module_name!r} has no attribute {attr!r}.") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module.")
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Weights file {path} not found.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()


def _load_data(spec: str, split: str):
    from .datasets import DATASETS, load_dataset

    if spec in DATASETS:
        x_tr, y_tr, x_te, y_te = load_dataset(spec)
        return (x_tr, y_tr) if split == "train" else (x_te, y_te)
    path = Path(spec)
    if path.suffix != ".npz":
        raise ValueError(f"--data must be one of {list(DATASETS)} or an .npz file; got {spec!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} not found.")
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data:
            raise ValueError(f"{path} has no array named 'x' (it has {sorted(data.files)}).")
        return data["x"], (data["y"] if "y" in data else None)


def format_scores(scores: dict, ac, title: str = "on the test data") -> str:
    """A plain-text table of per-layer and combined fidelity and accuracy."""
    has_acc = scores["accuracy"] is not None
    lines = [f"surrogate {title} (n={scores['n']}):",
             f"  {'layer':<16} {'weight':>6} {'fidelity':>9}" + (f" {'accuracy':>9}" if has_acc else "")]
    for (layer, s), w in zip(scores["per_layer"].items(), ac.weights_):
        lines.append(f"  {layer:<16} {w:>6.2f} {s['fidelity']:>9.4f}" + (f" {s['accuracy']:>9.4f}" if has_acc else ""))
    lines.append(f"  {'combined':<16} {'':>6} {scores['fidelity']:>9.4f}" + (f" {scores['accuracy']:>9.4f}" if has_acc else ""))
    if has_acc:
        lines.append(f"  {'DNN itself':<16} {'':>6} {1.0:>9.4f} {scores['dnn_accuracy']:>9.4f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
