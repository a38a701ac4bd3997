"""``actclust study create | serve | analyze``: the command-line side of :mod:`actclust.study`.

Registered by :func:`add_parser` from the main parser of :mod:`actclust.cli`; ``serve`` and
``analyze`` read the study folder only (no model, no torch of their own).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
from pathlib import Path

from ..exceptions import ParameterError
from .folder import CONDITIONS

__all__ = ["add_parser"]

EXIT_OK, EXIT_USAGE = 0, 2


def add_parser(sub, formatter_class) -> None:
    """Add the ``study`` command, with its three subcommands, to the main parser's subparsers ``sub``."""
    from ..cli.common import int_at_least as _at_least  # the main CLI's option type, worded the same
    from ..cli.common import run_model_options

    study = sub.add_parser("study", help="run a user study of the explanations: create, serve, analyze",
                           description="Measure whether the explanations raise warranted trust: create a study "
                                       "from a saved run, serve it to participants, analyze the responses.",
                           formatter_class=formatter_class)
    study.set_defaults(func=lambda args: _help(study))
    steps = study.add_subparsers(dest="study_command", metavar="STEP",
                                 help="run 'actclust study STEP --help' for its options")

    c = steps.add_parser("create", help="pick items and pre-render every condition into a study folder",
                         description="Pick items at random, stratified by whether the model is right, and "
                                     "pre-render what every condition shows into --out.",
                         formatter_class=formatter_class)
    c.add_argument("run", help="directory of a saved run")
    c.add_argument("--data", required=True, help="'digits', 'fashion-mnist' (items from the test split) or an .npz "
                                                 "with x and y (the items need true labels)")
    c.add_argument("--train", help="an .npz whose x is the training data the run was fitted on, to show similar "
                                   "samples (default for digits/fashion-mnist: their training split)")
    c.add_argument("--out", required=True, help="study folder to write")
    c.add_argument("--items", type=_at_least(1), default=40, help="items per participant")
    c.add_argument("--wrong-share", type=float, default=0.5, help="share of items the model gets wrong")
    c.add_argument("--conditions", default=",".join(CONDITIONS),
                   help="comma-separated conditions, from: " + ", ".join(CONDITIONS))
    c.add_argument("--design", default="between", choices=["between", "within"],
                   help="one condition per participant (between), or all conditions on different items (within)")
    c.add_argument("--two-stage", action="store_true", help="ask each participant's own answer before the advice")
    c.add_argument("--class-names", help="comma-separated class names (default: fashion-mnist's names, else indices)")
    c.add_argument("--attention-checks", type=_at_least(0), default=0,
                   help="extra trials that ask to reject with confidence 4; analyze leaves out who fails one")
    c.add_argument("--seed", type=int, default=0, help="seed of the item choice and of the trial orders")
    run_model_options(c)
    c.add_argument("--overwrite", action="store_true", help="replace a study (without responses) at --out")
    c.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    c.set_defaults(func=_create)

    s = steps.add_parser("serve", help="serve a study folder to participants (prints the addresses)",
                         description="Serve the study: participant pages, JSON API and admin pages.",
                         formatter_class=formatter_class)
    s.add_argument("study", help="study folder made by 'actclust study create'")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes the study")
    s.add_argument("--port", type=int, default=8765, help="port to listen on")
    s.add_argument("--admin-token", default=None,
                   help="token of the admin pages (default: $ACTCLUST_STUDY_ADMIN_TOKEN, else a new random one)")
    s.set_defaults(func=_serve)

    a = steps.add_parser("analyze", help="reliance metrics with participant-bootstrap intervals",
                         description="Per condition and overall: accuracy, reliance and (two-stage) RAIR/RSR with "
                                     "95%% intervals resampling participants, differences from 'none', and a "
                                     "participant-clustered logistic regression.",
                         formatter_class=formatter_class)
    a.add_argument("study", help="study folder")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON")
    a.add_argument("--html", help="also write an HTML page with plots to this file")
    a.add_argument("--overwrite", action="store_true",
                   help="replace an existing --html file (never one of the study's own files)")
    a.add_argument("--n-boot", type=_at_least(1), default=2000, help="bootstrap replicates")
    a.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    a.add_argument("--keep-inattentive", action="store_true",
                   help="keep the participants who failed an attention check (their checks still do not count)")
    a.set_defaults(func=_analyze)


def _help(parser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _create(args) -> int:
    from ..cli.inputs import load_data as _load_data, load_run as _load_run
    from ..datasets import DATASETS, FASHION_MNIST_CLASSES
    from .create import create_study

    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise ParameterError(f"--conditions must be comma-separated names from {', '.join(CONDITIONS)}; "
                             f"got {args.conditions!r}.")
    if not 0 <= args.wrong_share <= 1:
        raise ParameterError(f"--wrong-share must be in [0, 1]; got {args.wrong_share}.")
    ac = _load_run(args)
    x, y = _load_data(args.data, "test")
    if y is None:
        raise ParameterError(f"--data {args.data} has no labels y; a study needs them to know where the model is "
                             "right. Add y to the .npz.")
    train = None
    if args.train:
        train = _load_data(args.train, "train")[0]
    elif args.data in DATASETS:
        train = _load_data(args.data, "train")[0]
    names = None
    if args.class_names:
        names = [n.strip() for n in args.class_names.split(",")]
        if len(names) != ac.n_classes_:
            raise ParameterError(f"--class-names must name the run's {ac.n_classes_} classes; got {len(names)}.")
    elif args.data == "fashion-mnist" and ac.n_classes_ == len(FASHION_MNIST_CLASSES):
        names = list(FASHION_MNIST_CLASSES)
    out = create_study(ac, x, y, args.out, train=train, items=args.items, wrong_share=args.wrong_share,
                       conditions=conditions, design=args.design, two_stage=args.two_stage, seed=args.seed,
                       class_names=names, overwrite=args.overwrite, attention_checks=args.attention_checks,
                       source={"run": str(Path(args.run).resolve()), "data": args.data})
    print(f"wrote the study to {out}/ ({args.items} items, conditions {', '.join(conditions)}, "
          f"{args.design}-subjects{', two-stage' if args.two_stage else ''}); serve it with: "
          f"actclust study serve {out}")
    return EXIT_OK


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args) -> int:
    import uvicorn

    from .app import make_app

    token = args.admin_token or os.environ.get("ACTCLUST_STUDY_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    app = make_app(args.study, token)
    if not _is_loopback(args.host):
        print(f"actclust study serve: warning: listening on {args.host}, not on loopback (127.0.0.1): anyone who "
              "can reach this machine can take part and, with the admin token, read the responses. Serve it "
              "behind HTTPS, or keep --host 127.0.0.1.", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{shown}:{args.port}"
    print(f"participants: {base}/\nadmin:        {base}/admin?token={token}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return EXIT_OK


def _analyze(args) -> int:
    from ..io import atomic
    from .analyze import analyze_study, render_html
    from .folder import load_study

    if args.html:  # checked before the work: a file is replaced only with --overwrite, the study's own never
        _check_html(Path(args.html), Path(args.study), args.overwrite)
    result = analyze_study(args.study, n_boot=args.n_boot, seed=args.seed,
                           exclude_inattentive=not args.keep_inattentive)
    if args.html:
        path = Path(args.html)
        atomic.write(path, render_html(result, load_study(args.study)), what="analysis page")
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_analysis(result))
    return EXIT_OK


def _check_html(path: Path, study: Path, overwrite: bool) -> None:
    from ..exceptions import RunExistsError
    from .folder import DB_FILE, STUDY_FILE

    own = {(study / name).resolve() for name in (STUDY_FILE, DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm",
                                                 f"{DB_FILE}-journal")}
    if path.resolve() in own:
        raise RunExistsError(f"--html {path} is a file of the study itself ({path.name}); it is never replaced. "
                             "Give another file, e.g. --html analysis.html.")
    if path.is_dir():
        raise RunExistsError(f"--html {path} is a directory; give the HTML file to write, e.g. {path / 'analysis.html'}.")
    if path.exists() and not overwrite:
        raise RunExistsError(f"{path} already exists; add --overwrite to replace it.")


def format_analysis(result: dict) -> str:
    """A plain-text table: the main metrics per condition, estimate [95% interval]."""
    def cell(v):
        return "-" if v is None else f"{v['estimate']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v["ci"] else \
            f"{v['estimate']:.3f}"

    metrics = ["accuracy", "accept_given_ai_right", "reject_given_ai_wrong", "over_reliance", "under_reliance"]
    if result["two_stage"]:
        metrics += ["rair", "rsr"]
    groups = {**result["conditions"], "overall": result["overall"]}
    lines = [f"{'condition':<20} {'people':>6} {'trials':>6}  " + "  ".join(f"{m:<24}" for m in metrics)]
    for name, g in groups.items():
        lines.append(f"{name:<20} {g['n_participants']:>6} {g['n_responses']:>6}  "
                     + "  ".join(f"{cell(g[m]):<24}" for m in metrics))
    failed = result["attention"]["failed"]
    if failed:
        lines.append(f"{len(failed)} participant(s) failed an attention check"
                     + (" and are left out" if result["attention"]["excluded"] else " (kept)"))
    terms = result["regression"].get("terms")
    if terms:
        lines.append(f"logistic GEE of appropriate decisions (reference {result['regression']['reference']}): "
                     + ", ".join(f"{k} OR {t['odds_ratio']:.2f} [{_exp(t['ci'][0]):.2f}, {_exp(t['ci'][1]):.2f}]"
                                 for k, t in terms.items() if k != "intercept"))
    return "\n".join(lines)


def _exp(v: float) -> float:
    import math

    return math.exp(v)
