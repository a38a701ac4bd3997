"""``actclust view RUN --data test.npz``: serve the explorer of a saved run (registered by :func:`add_parser`)."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np

from ...cli.common import is_loopback, listen, port_number, run_model_options, serve, url_host
from ...capture.data import batch_len
from ...cli.inputs import check_inputs
from ...exceptions import ParameterError

__all__ = ["add_parser", "check_inputs"]

EXIT_OK = 0
DEFAULT_PORT = 8766


def add_parser(sub, formatter_class) -> None:
    """Add the ``view`` command to the main parser's subparsers ``sub``."""
    v = sub.add_parser("view", help="explore a saved run in the browser: layers, clusters, inputs, trust",
                       description="Serve a local, read-only web app over a saved run and test data: the run's "
                                   "fidelity and disagreements, each layer's clusters and map, each cluster's "
                                   "members, each test input's path, votes, similar samples and trust signals.",
                       formatter_class=formatter_class)
    v.add_argument("run", help="directory of a saved run")
    v.add_argument("--data", required=True, help="'digits', 'fashion-mnist' (test split), or an .npz with x (and y) "
                                                 "of test inputs to explore")
    v.add_argument("--train", help="an .npz whose x is the training data the run was fitted on, to show training "
                                   "samples (default for digits/fashion-mnist: their training split; otherwise "
                                   "training samples are shown by index)")
    v.add_argument("--class-names", help="comma-separated class names (default: fashion-mnist's names, else numbers)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes the run")
    v.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="port to listen on")
    v.add_argument("--token", default=None, help="token the pages ask for (default: $ACTCLUST_VIEW_TOKEN, else a new "
                                                  "random one, printed in the address)")
    v.add_argument("--no-trust", action="store_true", help="skip the trust signals (their calibration is the "
                                                           "longest wait at start on large runs)")
    run_model_options(v)
    v.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    v.set_defaults(func=_view)


def _view(args) -> int:
    from ...cli.common import say
    from ...cli.inputs import load_data, load_run
    from ...datasets import DATASETS, FASHION_MNIST_CLASSES

    sock = listen(args.host, args.port)  # before the long start: a port in use is said at once
    try:
        ac = load_run(args)
        x, y = load_data(args.data, "test", ac._adapter())
        check_inputs(x, ac, f"--data {args.data}")
        names = None
        if args.class_names:
            names = [n.strip() for n in args.class_names.split(",")]
            if len(names) != ac.n_classes_:
                raise ParameterError(f"--class-names must name the run's {ac.n_classes_} classes; got {len(names)} "
                                     f"({args.class_names!r}).")
        elif args.data == "fashion-mnist" and ac.n_classes_ == len(FASHION_MNIST_CLASSES):
            names = list(FASHION_MNIST_CLASSES)
        train = None
        if args.train:
            train = load_data(args.train, "train", ac._adapter())[0]
            source = f"--train {args.train}"
        elif args.data in DATASETS:
            train, source = load_data(args.data, "train", ac._adapter())[0], f"the {args.data} training split"
        else:
            say(args, "no --train given: training samples are shown by their index; to show them, add --train with "
                      "the .npz the run was fitted on")
        if train is not None:
            if batch_len(train) != ac.n_samples_fit_:
                raise ParameterError(f"{source} has {batch_len(train)} samples but the run was fitted on {ac.n_samples_fit_}; "
                                     "add --train with the .npz the run was fitted on (same samples, same order).")
            check_inputs(train, ac, source)
        from . import Explorer, make_app

        say(args, f"preparing the explorer of {args.run} on {batch_len(x):,} test inputs: one pass of the model, the "
                  f"clusters of {ac.n_samples_fit_:,} training samples"
                  + ("" if args.no_trust else ", the trust calibration") + " ...")
        start = time.perf_counter()
        explorer = Explorer(ac, x, y, train=train, class_names=names, trust=not args.no_trust,
                            title=f"actclust view: {Path(args.run).resolve().name}", progress=not args.quiet)
        say(args, f"ready in {time.perf_counter() - start:.1f} s")
    except BaseException:
        sock.close()
        raise
    token = args.token or os.environ.get("ACTCLUST_VIEW_TOKEN") or secrets.token_urlsafe(24)
    if not is_loopback(args.host):
        print(f"actclust view: warning: listening on {args.host}, not on loopback (127.0.0.1): anyone who can reach "
              "this machine and has the token can read the run and its data. Keep --host 127.0.0.1, or serve it "
              "behind HTTPS.", file=sys.stderr)
    shown = url_host(args.host)
    print(f"explorer: http://{shown}:{sock.getsockname()[1]}/?token={token}", flush=True)
    serve(make_app(explorer, token), sock)
    return EXIT_OK
