"""The ``actclust`` command: ``demo``, ``fit``, ``score``, ``report``, ``layers``, ``study``
(``study create | serve | analyze``, in :mod:`actclust.study.cli`) and ``view`` (the explorer, in
:mod:`actclust.views.explorer.cli`).

Exit codes: 0 success; 2 bad usage or bad input (the message says what to change); 1 an
unexpected error (with its traceback); 130 interrupted with Ctrl-C. ``main`` returns the code
(argparse's own usage errors included) rather than exiting, so it can be called from Python;
:func:`run` is the installed command and ``python -m actclust``.

Messages speak in options (``--n-clusters``, ``--overwrite``), never in the library's Python
parameter names: options the library would reject are checked here first, in CLI terms.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import warnings
import time
from pathlib import Path

import numpy as np

from ..exceptions import ParameterError, RunExistsError
from .common import OVERWRITE_FLAG, HelpFormatter, command, int_at_least, run_model_options, say, warn
from ..capture.data import batch_len
from .inputs import build_model, check_inputs, check_layers, is_model_file, load_data, load_run, locate_module

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130  # an unexpected error leaves Python's own status, 1
DEMO_LAYERS = ["conv1", "conv2", "fc1", "fc2"]
DEMO_OUT = "actclust-demo"


def main(argv=None) -> int:
    try:
        parser = _parser()  # imports the study's and explorer's commands: a Ctrl-C here gave a traceback
        args = parser.parse_args(_joined_numbers(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as e:  # argparse exits on --help (0) and on a usage error (2, after its message)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from ..exceptions import ActClustError, ActClustWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        """actclust's own warnings as one line naming the command, not a source location."""
        if issubclass(category, ActClustWarning):
            warn(args, str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():  # restores showwarning after the command
            warnings.showwarning = show
            return args.func(args)
    except ActClustError as e:  # every error actclust raises on purpose; anything else is a bug: traceback
        print(f"actclust {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `actclust layers ... | head`: the reader left; nothing more to say (a traceback, once)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        except (OSError, ValueError):  # a stdout with no file behind it
            pass
        return EXIT_OK


def _joined_numbers(argv: list) -> list:
    """``--layer-weights -1,2`` as ``--layer-weights=-1,2``: argparse takes a value that starts with '-' and is no
    plain number for an option, and said "expected one argument" instead of the option's own message (an outside
    check)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--layer-weights" and i + 1 < len(argv) and re.match(r"^-[\d.]", argv[i + 1]):
            out.append(f"--layer-weights={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def run(argv=None) -> int:
    """The ``actclust`` command: :func:`main`, then Ctrl-C ignored while Python exits.

    Once the command is done (its files written, its last line printed) Python still unloads PyTorch,
    scikit-learn and the rest for about a second, with Ctrl-C back at its default: pressed then, it killed
    the process silently with status -2 (SIGINT), a finished command read as a failed one. Ignored, the
    command exits with its own status. Not done by :func:`main`, which leaves a calling process's Ctrl-C alone.
    """
    try:
        code = main(argv)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # in the instant between the two (an outside check saw it once in 40 tries)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


_MODEL_HELP = ("your model: an .onnx or .keras file, or the callable that builds it, as package.module:callable "
               "(e.g. mymodule:build for a function build() in mymodule.py in the current folder)")


def _parser() -> argparse.ArgumentParser:
    from ..datasets import PREPARATION

    p = argparse.ArgumentParser(prog="actclust", description="Explain a trained classifier (PyTorch, Keras, ONNX) by "
                                "clustering the activations of its layers.", epilog=f"Data: {PREPARATION}.")
    from .._version import __version__

    p.add_argument("--version", action="version", version=f"actclust {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help="run 'actclust COMMAND --help' for its options")
    clusters = int_at_least(2, " (one cluster per layer explains nothing)")

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    d = command("demo", "train a small CNN on scikit-learn's digits, fit and score the surrogate")
    d.add_argument("--out", default=DEMO_OUT,
                   help="directory of the saved run (default: %(default)s, replaced on each demo run)")
    d.add_argument("--epochs", type=int_at_least(1), default=15, help="training epochs of the small CNN")
    d.add_argument("--n-clusters", type=clusters, default=15, help="clusters per layer")
    _common(d)
    d.set_defaults(func=_demo)

    f = command("fit", "fit the surrogate of your model and save the run")
    f.add_argument("model", help=_MODEL_HELP)
    f.add_argument("--weights", help="state dict of your trained model (.safetensors, or .pt loaded with "
                                     "weights_only); without it the model keeps the weights its callable gives it")
    f.add_argument("--data", required=True, help="'digits', 'fashion-mnist' (training split; pixels in [0, 1], see "
                                                 "'actclust --help'), or an .npz with x "
                                                 "(and optional y) to fit on")
    f.add_argument("--layers", required=True,
                   help="comma-separated module names; list them with: actclust layers MODEL")
    f.add_argument("--n-clusters", type=clusters, default=15, help="clusters per layer")
    f.add_argument("--reducer", default="mean",
                   help="how each layer's activation map becomes a vector: mean, max, auto (as Python's default: "
                        "dense outputs kept whole), grid, grid:G, pca:D or random:D (G, D positive integers)")
    f.add_argument("--posterior", default="prediction", choices=["prediction", "label"],
                   help="what a cluster predicts: the DNN's predictions in it, or the true labels (needs y)")
    f.add_argument("--layer-weights", default=None,
                   help="'fit' (learned on held-out data), or one comma-separated number per layer "
                        "(default: equal weights)")
    f.add_argument("--clustering", default="kmeans", choices=["kmeans", "distill", "idec"],
                   help="kmeans, distill (refined toward the DNN: most faithful) or idec (the paper's)")
    f.add_argument("--batch-size", type=int_at_least(1), default=256, help="inputs per forward pass")
    f.add_argument("--store", help="directory the training vectors are written to while capturing and read back "
                                   "memory-mapped, for training sets whose vectors do not fit in memory (outside "
                                   "--out; the saved run links to its files); without it they stay in memory")
    f.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                   help="precision of the stored training vectors (float16 halves memory and disk)")
    f.add_argument("--no-prepare", dest="prepare", action="store_false",
                   help="save the run as soon as it is fitted, without its similar-sample index and trust calibration "
                        "(every later command then builds them again: minutes for a million samples)")
    f.add_argument("--out", required=True, help="directory of the saved run")
    _common(f)
    f.set_defaults(func=_fit)

    s = command("score", "fidelity and accuracy of a saved run on data")
    s.add_argument("run", help="directory of a saved run")
    s.add_argument("--data", required=True, help="'digits', 'fashion-mnist' (test split; pixels in [0, 1]), or an .npz "
                                                 "with x (and y) prepared as the training inputs were")
    run_model_options(s)
    s.add_argument("--json", action="store_true", help="print the scores as JSON")
    _common(s, overwrite=False)
    s.set_defaults(func=_score)

    r = command("report", "write a self-contained HTML report of a saved run on data")
    r.add_argument("run", help="directory of a saved run")
    r.add_argument("--data", required=True,
                   help="'digits' or 'fashion-mnist' (explains the test split, shows the training split), "
                        "or an .npz with x (and y) to explain")
    r.add_argument("--train", help="an .npz whose x is the training data the run was fitted on, to show similar "
                                   "training samples (default for an .npz --data: samples shown by index)")
    r.add_argument("--out", default="report.html", help="HTML file to write")
    r.add_argument("--n-correct", type=int_at_least(0), default=4, help="inputs the DNN got right to explain")
    r.add_argument("--n-wrong", type=int_at_least(0), default=4, help="inputs the DNN got wrong to explain")
    run_model_options(r)
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _common(r, overwrite=False)
    r.set_defaults(func=_report)

    lay = command("layers", "list the layer names of a model (the names --layers takes)")
    lay.add_argument("model", help=_MODEL_HELP)
    lay.set_defaults(func=_layers)
    from ..study.cli import add_parser as add_study
    from ..views.explorer.cli import add_parser as add_view

    add_study(sub, HelpFormatter)
    add_view(sub, HelpFormatter)
    return p


def _common(p, overwrite=True):
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace a saved run at --out")


# ---------------------------------------------------------------------------- commands
def _demo(args) -> int:
    from ..deps import require

    torch = require("torch", "actclust demo (it trains a small PyTorch CNN)")
    from .. import ActivationClustering
    from ..datasets import load_digits
    from ..models import accuracy, digits_cnn, train_classifier
    from ..io.persistence import check_writable

    out = Path(args.out)
    # The default folder belongs to the demo: each demo run replaces the run it wrote there (and
    # only that: a folder holding anything else is refused, as for --overwrite).
    overwrite = args.overwrite or args.out == DEMO_OUT
    check_writable(out, overwrite, flag=OVERWRITE_FLAG)  # before training, not after
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits()
    t0 = time.perf_counter()
    model = train_classifier(digits_cnn(), x_tr, y_tr, epochs=args.epochs, batch_size=32, progress=not args.quiet)
    say(args, f"trained a small CNN on {len(x_tr)} digits in {time.perf_counter() - t0:.1f} s; "
               f"test accuracy {accuracy(model, x_te, y_te):.3f}")
    ac = ActivationClustering(model, DEMO_LAYERS, n_clusters=args.n_clusters, progress=not args.quiet)
    t0 = time.perf_counter()
    ac.fit(x_tr, y_tr)
    say(args, f"fitted the surrogate over {', '.join(DEMO_LAYERS)} in {time.perf_counter() - t0:.1f} s")
    print(format_scores(ac.score(x_te, y_te), ac))
    if overwrite and (out / "manifest.json").exists():
        say(args, f"replacing the previous run in {out}/")
    # report.html is recorded as the run's own file, so the next demo may replace it, and only it
    _save(ac, out, overwrite, "actclust.models:digits_cnn", model, "digits", also=("report.html",))
    from ..views.report import report

    path = report(ac, x_te, y_te, out=out / "report.html", train=x_tr, title="actclust demo: a small CNN on digits",
                  overwrite=True)  # the run folder was just (re)written by this demo, and it owns report.html
    print(f"wrote the HTML report {path}: open it in a browser")
    return EXIT_OK


def _fit(args) -> int:
    from .. import ActivationClustering
    from ..adapters import adapt
    from ..io.persistence import check_writable

    # Every option is checked here, in option terms, before the model is built and the long fit
    # starts; the library would otherwise answer in its Python parameter names.
    layers = [l.strip() for l in args.layers.split(",") if l.strip()]
    if not layers:
        raise ParameterError(f"--layers must name at least one module; list them with: {command('layers', args.model)}")
    _check_reducer(args.reducer)
    weights = _layer_weights(args.layer_weights, layers)
    check_writable(args.out, args.overwrite, flag=OVERWRITE_FLAG)
    if args.store and Path(args.out).resolve() in [Path(args.store).resolve(), *Path(args.store).resolve().parents]:
        raise ParameterError(f"--store {args.store} is inside --out {args.out}; give a directory outside the run "
                             "(the saved run links to the store's files).")
    if args.store and Path(args.store).resolve() in Path(args.out).resolve().parents:
        raise ParameterError(f"--out {args.out} is inside --store {args.store}; give a directory outside the store "
                             "(a store folder holds only its own files: later fits into it would refuse it).")
    model = build_model(args.model, args.weights)
    check_layers(layers, model, args.model)
    x, y = load_data(args.data, "train", adapt(model))
    n = batch_len(x)  # a dict of one array per input of a model of several
    if n < 2:  # "use at most 1" cluster: fewer than --n-clusters' least, 2 (an outside check)
        raise ParameterError(f"--data {args.data} holds {n} sample; clustering needs at least 2 (and as many as "
                             "--n-clusters).")
    if args.n_clusters > n:
        raise ParameterError(f"--n-clusters {args.n_clusters} is more than the {n} samples of --data {args.data}; "
                         f"use at most {n}.")
    if args.posterior == "label" and y is None:
        raise ParameterError(f"--posterior label needs the true labels, but --data {args.data} has no array 'y'; "
                         "add y to the .npz, or use --posterior prediction.")
    # said once the inputs are known good, just before the long fit; only of a PyTorch model built by a callable
    # (a model file, or a Keras model a callable builds, holds its weights: --weights is refused for them)
    if not args.weights and not is_model_file(args.model) and adapt(model).framework == "torch":
        warn(args, f"no --weights given: {args.model} is used with the weights it gives the model (untrained, "
                    "unless it loads trained ones itself). To explain your trained model, save its state dict, e.g. "
                    "torch.save(model.state_dict(), 'model.pt'), and add --weights model.pt.")
    ac = ActivationClustering(
        model, layers, n_clusters=args.n_clusters,
        reducer=args.reducer, posterior=args.posterior, layer_weights=weights, clustering=args.clustering,
        batch_size=args.batch_size, store=args.store, store_dtype=args.store_dtype,
        progress=not args.quiet,
    )
    ac.fit(x, y)
    print(format_scores(ac.train_score_, ac, title="on the training data (in-sample)"))
    if args.prepare:  # saved with the run: report, view and study then load them instead of building them each time
        say(args, "preparing the similar-sample index and trust's calibration, saved with the run (--no-prepare skips)")
        ac.prepare()
    _save(ac, Path(args.out), args.overwrite, args.model, model, args.data)
    return EXIT_OK


def _score(args) -> int:
    import json

    ac = load_run(args)
    x, y = load_data(args.data, "test", ac._adapter())
    scores = ac.score(x, y)
    if args.json:  # each layer's weight, as the table shows it (an outside check)
        scores = {**scores, "per_layer": {l: {**v, "weight": float(w)} for (l, v), w in
                                          zip(scores["per_layer"].items(), ac.weights_)}}
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores, ac, title=f"on {args.data}"))
    return EXIT_OK


def _refuse_run_file(out: Path, run, ac) -> None:
    """Refuse ``--out`` where it is (or lies in) a file or folder of the run it reads, or of its vector store: even
    ``--overwrite`` replaces only what the user made, never the run (a report written over its manifest broke it)."""
    from ..io.persistence import read_manifest, run_files

    target = out.resolve()
    owned = [Path(run) / name for name in run_files(read_manifest(run))]
    directory = getattr(ac.state_.train_vectors, "directory", None)
    owned += [Path(directory)] if directory is not None else []
    for p in owned:
        p = p.resolve()
        if target == p or p in target.parents:
            raise RunExistsError(f"--out {out} is part of the run {run} the report reads ({p.name}); it is never "
                                 "written over, even with --overwrite. Choose another path.")


def _report(args) -> int:
    from ..datasets import DATASETS, FASHION_MNIST_CLASSES
    from ..views.report import report

    out = Path(args.out)
    if out.is_dir():  # a run's folder: the report goes beside it (a file in it would stop a later --overwrite)
        beside = out.with_name(out.name + "-report.html") if (out / "manifest.json").exists() else out / "report.html"
        raise RunExistsError(f"--out {out} is a directory; give the HTML file to write, e.g. --out {beside}.")
    if out.exists() and not args.overwrite:  # before the work; the library's message names its Python argument
        raise RunExistsError(f"{out} already exists; {OVERWRITE_FLAG} to replace it.")
    for flag, given in (("--model", args.model), ("--weights", args.weights), ("--data", args.data),
                        ("--train", args.train)):  # a file the report reads: --overwrite replaced it with the HTML
        if given and out.exists() and Path(given).is_file() and Path(given).resolve() == out.resolve():
            raise RunExistsError(f"--out {out} is the {flag} file the report reads; it is never written over, even "
                                 "with --overwrite. Choose another path.")
    if args.model and not is_model_file(args.model) and out.exists():  # its code too (an outside check)
        code = locate_module(args.model.partition(":")[0], [os.getcwd(), *[p for p in sys.path if p]])
        if any(Path(c).resolve() == out.resolve() for c in code):
            raise RunExistsError(f"--out {out} is the code of the --model {args.model} the report runs; it is never "
                                 "written over, even with --overwrite. Choose another path.")
    ac = load_run(args)
    _refuse_run_file(out, args.run, ac)
    x, y = load_data(args.data, "test", ac._adapter())
    if args.train:
        train, source = load_data(args.train, "train", ac._adapter())[0], f"--train {args.train}"
    elif args.data in DATASETS:
        train, source = load_data(args.data, "train", ac._adapter())[0], f"the {args.data} training split"
    else:
        train = None
        say(args, "no --train given: training samples are shown by their index; to show them, add --train "
                   "with the .npz the run was fitted on")
    if train is not None and batch_len(train) != ac.n_samples_fit_:
        raise ParameterError(f"{source} has {batch_len(train)} samples but the run was fitted on {ac.n_samples_fit_}; "
                         "add --train with the .npz the run was fitted on (same samples, same order).")
    if train is not None:  # as view does: another shape per sample met the pictures' code (a traceback)
        check_inputs(train, ac, source)
    names = list(FASHION_MNIST_CLASSES) if args.data == "fashion-mnist" else None
    if names is not None and len(names) != ac.n_classes_:
        names = None  # a run of another model: its classes are shown by index
    path = report(ac, x, y, train=train, out=out, n_correct=args.n_correct, n_wrong=args.n_wrong,
                  overwrite=args.overwrite,
                  class_names=names, title=f"actclust report: {Path(args.run).name} on {Path(args.data).name}")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser")
    return EXIT_OK


def _layers(args) -> int:
    from ..adapters import adapt

    adapter = adapt(build_model(args.model, None))
    describe = getattr(adapter, "describe", None)
    if describe is not None:  # ONNX: tensor names with the operator that makes them and the inferred shape
        for name, op, shape in describe():
            print(f"{name}\t{op}\t{'?' if shape is None else tuple('N' if i == 0 else d for i, d in enumerate(shape))}")
        return EXIT_OK
    for name in adapter.layer_names():
        print(name)
    return EXIT_OK


# ---------------------------------------------------------------------------- helpers
def _check_reducer(spec: str) -> None:
    from ..capture.reduction import make_reducer

    try:
        make_reducer(spec)
    except ValueError:
        raise ParameterError("--reducer must be mean, max, grid, grid:G, pca:D or random:D (G, D positive integers); "
                         f"got {spec!r}.") from None


def _layer_weights(text, layers: list):
    """--layer-weights as the library takes it: None, 'fit', or one non-negative number per layer."""
    if text is None or text == "fit":
        return text
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        raise ParameterError(f"--layer-weights must be 'fit' or comma-separated numbers; got {text!r}.") from None
    if len(weights) != len(layers):
        raise ParameterError(f"--layer-weights must give one number per --layers entry ({len(layers)}: "
                         f"{','.join(layers)}); got {len(weights)}.")
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ParameterError(f"--layer-weights must be non-negative numbers, not all zero; got {text!r}.")
    return weights


def _save(ac, out: Path, overwrite: bool, spec: str, model, data: str, also=()) -> None:
    """Save the run with the model inside it, named by its hash (a PyTorch model's weights as safetensors,
    an ONNX or Keras model's file as it is): the run is whole by itself, and a later command reads no
    model file from outside it. ``also`` names files the command writes into the run afterwards (the
    demo's report), recorded as the run's own."""
    from ..adapters import adapt
    from ..analysis import saved
    from ..io.persistence import hashed_name, params_of, save

    adapter = adapt(ac.model, ac.output)
    if adapter.framework == "torch":
        content = _weights_bytes(adapter.inner)
        name = hashed_name("model.safetensors", content)
        metadata = {"model": spec, "weights": name}
    else:  # the file the user gave: ONNX is data; a recorded .keras needs opt-in to load (see cli/inputs.py)
        content = Path(spec).read_bytes() if is_model_file(spec) else None
        if content is not None and adapter.framework == "onnx":
            from ..adapters.onnx import external_tensors

            if external_tensors(adapter.onnx.load_model_from_string(content)):  # read without its external data
                # the graph with its tensors inside, in the one file the manifest pins (runs read no other model file)
                content = adapter.proto.SerializeToString()
        if content is None:
            raise ParameterError(f"{spec} builds a {adapter.framework} model that actclust cannot keep in the run; save it "
                                 "as a .onnx or .keras file and give that file.")
        name = hashed_name("model" + Path(spec).suffix.lower(), content)
        metadata = {"model": name}
    save(ac.state_, params_of(ac), adapter, out, overwrite=overwrite, metadata=metadata,
         files={name: content, **saved.saved_index_files(ac.state_), **{f: None for f in also}},
         kept=saved.kept(ac.state_), flag=OVERWRITE_FLAG)  # a run another command saved meanwhile: in option terms
    from .inputs import TRUSTED_MODELS

    own = spec in TRUSTED_MODELS or metadata["model"].endswith(".onnx")  # a run's own record is not imported
    model_option = () if own else ("--model", spec)
    from ..datasets import DATASETS

    # a built-in set is scored on its test split; a file of the user's is the training data (an outside check)
    note = "" if data in DATASETS else f" (give held-out data instead of {data} for figures on new inputs)"
    print(f"saved the run to {out}/; score it again{note} with: {command('score', out, '--data', data, *model_option)}")


def _weights_bytes(model) -> bytes:
    """The model's state dict in safetensors format (tensors copied, so tied weights save too)."""
    from safetensors.torch import save as to_bytes

    torch = sys.modules["torch"]  # the model is a torch.nn.Module: torch is imported

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    return to_bytes(state)


def format_scores(scores: dict, ac, title: str = "on the test data") -> str:
    """A plain-text table of per-layer and combined fidelity and accuracy."""
    has_acc = scores["accuracy"] is not None
    wide = max([16, *(len(l) for l in scores["per_layer"])])  # a long layer name widens the column, not the row
    lines = [f"surrogate {title} (n={scores['n']}):",
             f"  {'layer':<{wide}} {'weight':>6} {'fidelity':>9}" + (f" {'accuracy':>9}" if has_acc else "")]
    for (layer, s), w in zip(scores["per_layer"].items(), ac.weights_):
        lines.append(f"  {layer:<{wide}} {w:>6.2f} {s['fidelity']:>9.4f}" + (f" {s['accuracy']:>9.4f}" if has_acc else ""))
    lines.append(f"  {'combined':<{wide}} {'':>6} {scores['fidelity']:>9.4f}"
                 + (f" {scores['accuracy']:>9.4f}" if has_acc else ""))
    if has_acc:
        lines.append(f"  {'DNN itself':<{wide}} {'':>6} {1.0:>9.4f} {scores['dnn_accuracy']:>9.4f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
