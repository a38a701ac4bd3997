"""``actclust study create | serve | analyze | power``: the command-line side of :mod:`actclust.study`.

Registered by :func:`add_parser` from the main parser of :mod:`actclust.cli`; ``serve``,
``analyze`` and ``power`` need no model and no torch of their own.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from ..cli.common import is_loopback, listen, port_number, serve, url_host
from ..exceptions import ParameterError
from .limits import ABANDON_AFTER_S, ADDRESS_WINDOW_S, SESSIONS_PER_ADDRESS
from .folder import CONDITIONS

__all__ = ["add_parser"]

EXIT_OK, EXIT_USAGE = 0, 2


def add_parser(sub, formatter_class) -> None:
    """Add the ``study`` command, with its three subcommands, to the main parser's subparsers ``sub``."""
    from ..cli.common import int_at_least as _at_least  # the main CLI's option type, worded the same
    from ..cli.common import run_model_options

    study = sub.add_parser("study", help="run a user study of the explanations: create, serve, analyze, power",
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
                         description="Serve the study: participant pages, JSON API and admin pages. The study folder "
                                     "is checked first: a damaged or edited one is refused before anyone takes part.",
                         formatter_class=formatter_class)
    s.add_argument("study", help="study folder made by 'actclust study create'")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes the study")
    s.add_argument("--port", type=port_number, default=8765, help="port to listen on")
    s.add_argument("--admin-token", default=None,
                   help="token of the admin pages (default: $ACTCLUST_STUDY_ADMIN_TOKEN, else a new random one)")
    s.add_argument("--max-participants", type=_at_least(1), default=None,
                   help="refuse new sessions (403) once this many hold a place: completed, or active within "
                        "--abandon-after (default: no cap)")
    s.add_argument("--abandon-after", type=_at_least(1), default=ABANDON_AFTER_S // 60,
                   help="minutes without an answer after which a session no longer holds a place nor counts in the "
                        "balance of conditions")
    s.add_argument("--sessions-per-address", type=_at_least(0), default=SESSIONS_PER_ADDRESS,
                   help="new sessions one client address may start per --address-window (0: no limit); behind a "
                        "proxy, the address it forwards")
    s.add_argument("--address-window", type=_at_least(1), default=ADDRESS_WINDOW_S // 60,
                   help="minutes over which --sessions-per-address counts")
    s.add_argument("--forwarded-allow-ips", default="127.0.0.1",
                   help="comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto headers are "
                        "trusted ('*': any; trust only your proxy)")
    s.add_argument("--public-url", default=None,
                   help="the address participants use, e.g. https://study.example.org behind a TLS proxy "
                        "(printed instead of http://HOST:PORT)")
    s.add_argument("--access-log", action="store_true",
                   help="log every request (method, path, status); no address carries a secret")
    s.set_defaults(func=_serve)

    a = steps.add_parser("analyze", help="reliance metrics with participant-bootstrap intervals",
                         description="Per condition and overall: accuracy, reliance, (two-stage) RAIR/RSR and "
                                     "complementarity, response times, with 95% intervals resampling participants, "
                                     "differences from the reference condition, and a participant-clustered logistic "
                                     "regression. Of a study folder's responses, or of any platform's trial table "
                                     "(--trials).",
                         formatter_class=formatter_class)
    a.add_argument("study", nargs="?", help="study folder (or give --trials instead)")
    a.add_argument("--trials", help="a trial table instead of a study folder: .csv, .tsv, .jsonl or .parquet, one row "
                                    "per answer with participant, condition, ai_correct, decision [, confidence, item, "
                                    "response_ms; two-stage: true_label, ai_label, initial_label, final_label]")
    a.add_argument("--columns", help="with --trials: the table's names for these fields, e.g. "
                                     "participant=UID,condition=Method,ai_correct=AIRight")
    a.add_argument("--design", choices=["between", "within"], default=None,
                   help="with --trials: one condition per participant (between; the default) or several (within)")
    a.add_argument("--two-stage", action="store_true",
                   help="with --trials: each trial has the participant's own answer before the advice")
    a.add_argument("--reference", help="the condition the others are compared with (default: 'none' if present)")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON")
    a.add_argument("--html", help="also write an HTML page with plots to this file")
    a.add_argument("--overwrite", action="store_true",
                   help="let --html replace a file that is not a page actclust wrote (never the study's own files "
                        "nor the trial table)")
    a.add_argument("--n-boot", type=_at_least(100, " for 95% intervals"), default=2000, help="bootstrap replicates")
    a.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    a.add_argument("--keep-inattentive", action="store_true",
                   help="keep the participants who failed an attention check (their checks still do not count)")
    a.set_defaults(func=_analyze)

    w = steps.add_parser("power", help="participants needed per condition, by simulating the analysis",
                         description="How many participants per condition detect a difference in appropriate "
                                     "decisions (or over-reliance) between conditions, by simulating studies with a "
                                     "participant random effect and analysing each with the study's regression "
                                     "(logistic GEE, robust errors).",
                         formatter_class=formatter_class)
    w.add_argument("--conditions", required=True, help="comma-separated conditions; the reference is 'none' if "
                                                       "present, else the first")
    w.add_argument("--effect", type=float, required=True,
                   help="difference in the metric's rate between each other condition and the reference (e.g. 0.05)")
    w.add_argument("--baseline", type=float, required=True, help="the metric's rate in the reference condition")
    w.add_argument("--items", type=_at_least(1), required=True, help="trials per participant")
    w.add_argument("--design", choices=["between", "within"], default="between",
                   help="one condition per participant, or all conditions on different items")
    w.add_argument("--metric", choices=["accuracy", "over_reliance"], default="accuracy",
                   help="appropriate decisions over all trials, or accepted wrong predictions over the wrong-AI trials")
    w.add_argument("--wrong-share", type=float, default=0.5,
                   help="with --metric over_reliance: the share of items the AI gets wrong")
    w.add_argument("--icc", type=float, default=0.0,
                   help="intra-class correlation of participants (latent scale): how alike one person's trials are")
    w.add_argument("--power", type=float, default=0.8, help="power to reach")
    w.add_argument("--alpha", type=float, default=0.05, help="significance level (two-sided)")
    w.add_argument("--simulations", type=_at_least(100), default=1000, help="simulated studies per study size (at least 100)")
    w.add_argument("--seed", type=_at_least(0), default=0, help="seed of the simulation")
    w.add_argument("--max-participants", type=_at_least(10), default=5000,
                   help="give up beyond this many participants per condition")
    w.add_argument("--json", action="store_true", help="print the result as JSON")
    w.add_argument("--html", help="also write a page with the power curve to this file")
    w.add_argument("--overwrite", action="store_true", help="let --html replace a file that is not a page actclust wrote")
    w.set_defaults(func=_power)


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
    x, y = _load_data(args.data, "test", ac._adapter())
    if y is None:
        raise ParameterError(f"--data {args.data} has no labels y; a study needs them to know where the model is "
                             "right. Add y to the .npz.")
    train = None
    if args.train:
        train = _load_data(args.train, "train", ac._adapter())[0]
    elif args.data in DATASETS:
        train = _load_data(args.data, "train", ac._adapter())[0]
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
    from .folder import load_study

    print(f"wrote the study to {out}/ ({args.items} items, conditions {', '.join(conditions)}, "
          f"{args.design}-subjects{', two-stage' if args.two_stage else ''}); each condition shows:")
    data = load_study(out).data
    for condition, how in data["construction"].items():
        print(f"  {condition}: {how}")
    if "feature_order" in data:
        print(f"  tables list {data['feature_order']}")
    print(f"serve it with: actclust study serve {out}")
    return EXIT_OK


def _serve(args) -> int:
    from .app import make_app

    token = args.admin_token or os.environ.get("ACTCLUST_STUDY_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    app = make_app(args.study, token, max_participants=args.max_participants, abandon_after=args.abandon_after * 60,
                   sessions_per_address=args.sessions_per_address, address_window=args.address_window * 60)
    sock = listen(args.host, args.port)  # before the addresses are printed: a port in use is said, not announced
    if not is_loopback(args.host):
        print(f"actclust study serve: warning: listening on {args.host}, not on loopback (127.0.0.1): anyone who "
              "can reach this machine can take part and, with the admin token, read the responses. Serve it "
              "behind HTTPS, or keep --host 127.0.0.1.", file=sys.stderr)
    shown = url_host(args.host)
    base = (args.public_url or f"http://{shown}:{sock.getsockname()[1]}").rstrip("/")
    cap = f"; at most {args.max_participants} participants" if args.max_participants else ""
    print(f"participants: {base}/\nadmin:        {base}/admin (log in with the admin token)\n"
          f"admin token:  {token}\n(new sessions per address: {args.sessions_per_address or 'no limit'} per "
          f"{args.address_window} min{cap})", flush=True)
    serve(app, sock, log_level="info" if args.access_log else "warning", access_log=args.access_log,
          proxy_headers=True, forwarded_allow_ips=args.forwarded_allow_ips)
    return EXIT_OK


def _analyze(args) -> int:
    from .analyze import analyze_study, render_html
    from .output import check_page, study_files, write_page

    if (args.study is None) == (args.trials is None):
        raise ParameterError("Give a study folder or --trials TABLE (one of them): actclust study analyze STUDY, or "
                             "actclust study analyze --trials trials.csv.")
    if args.trials is None:
        given = [f for f, v in (("--columns", args.columns), ("--design", args.design), ("--two-stage", args.two_stage))
                 if v]
        if given:
            raise ParameterError(f"{', '.join(given)} describe a trial table (--trials); a study folder says its own "
                                 "design and columns.")
        protected = study_files(args.study)
        if args.html:  # before the analysis: a page that may not be written is refused first
            check_page(args.html, overwrite=args.overwrite, protected=protected)
        result = analyze_study(args.study, n_boot=args.n_boot, seed=args.seed,
                               exclude_inattentive=not args.keep_inattentive, reference=args.reference)
    else:
        from .trials import analyze_table, parse_columns

        if args.html:
            check_page(args.html, overwrite=args.overwrite, protected=[Path(args.trials)])
        result = analyze_table(args.trials, columns=parse_columns(args.columns), design=args.design or "between",
                               two_stage=args.two_stage, reference=args.reference, n_boot=args.n_boot, seed=args.seed)
        protected = [Path(args.trials)]
    if args.html:
        path = write_page(args.html, render_html(result), overwrite=args.overwrite, protected=protected)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_analysis(result))
    return EXIT_OK


def _power(args) -> int:
    from .power import power_analysis, render_power_html
    from .output import write_page

    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    result = power_analysis(conditions, args.effect, args.baseline, args.items, design=args.design, icc=args.icc,
                            power=args.power, alpha=args.alpha, metric=args.metric, wrong_share=args.wrong_share,
                            simulations=args.simulations, seed=args.seed, max_participants=args.max_participants)
    if args.html:
        path = write_page(args.html, render_power_html(result), overwrite=args.overwrite)
        print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_power(result))
    return EXIT_OK


def format_power(r: dict) -> str:
    """The answer in a few lines: participants needed, the power reached, the closed form where it holds."""
    rates = ", ".join(f"{c} {p:.3f}" for c, p in r["rates"].items())
    lines = [f"{r['metric']}: {rates}; {r['design']}-subjects, {r['items']} items per participant "
             f"({r['trials_per_participant_per_condition']} per condition counted), ICC {r['icc']}, alpha {r['alpha']}"]
    if r["participants_per_condition"] is None:
        lines.append(r["note"])
    else:
        p = r["power_at_n"]
        lines.append(f"{r['participants_per_condition']} participants per condition ({r['participants_total']} in all) "
                     f"reach power {p['estimate']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] >= {r['target_power']} "
                     f"({r['simulations']} simulated studies per size)")
    if r["closed_form"]:
        c = r["closed_form"]
        lines.append(f"closed form (two proportions, independent trials): {c['participants_per_condition']} per "
                     f"condition ({c['trials_per_condition']:.1f} trials), power {c['power_at_n']:.3f}")
    return "\n".join(lines)


def _cell(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    text = f"{v['estimate']:.{digits}f}"
    if v["ci"]:
        text += f" [{v['ci'][0]:.{digits}f}, {v['ci'][1]:.{digits}f}]"
    return text + ("*" if v.get("note") else "")


def format_analysis(result: dict) -> str:
    """A plain-text table: the main metrics per condition, estimate [95% interval]; * marks too few participants."""
    from .analyze import MIN_BOOTSTRAP_PARTICIPANTS

    metrics = ["accuracy", "accept_given_ai_right", "reject_given_ai_wrong", "over_reliance", "under_reliance"]
    if result["two_stage"]:
        metrics += ["rair", "rsr"]
    groups = {**result["conditions"], "overall": result["overall"]}
    lines = [f"{'condition':<20} {'people':>6} {'trials':>6}  " + "  ".join(f"{m:<24}" for m in metrics)
             + "  median ms"]
    for name, g in groups.items():
        lines.append(f"{name:<20} {g['n_participants']:>6} {g['n_responses']:>6}  "
                     + "  ".join(f"{_cell(g[m]):<24}" for m in metrics) + "  " + _cell(g["median_response_ms"], 0))
    if any(g[m] and g[m].get("note") for g in groups.values() for m in metrics):
        lines.append(f"* from fewer than {MIN_BOOTSTRAP_PARTICIPANTS} participants: the interval is too narrow, or "
                     "there is none")
    for name, c in (result.get("complementarity") or {}).items():
        if c:
            lines.append(f"complementarity {name}: team {_cell(c['team'])}, AI alone {_cell(c['ai'])}, human alone "
                         f"{_cell(c['human'])}: {c['verdict']}")
    failed = result["attention"]["failed"]
    if failed:
        lines.append(f"{len(failed)} participant(s) failed an attention check"
                     + (" and are left out" if result["attention"]["excluded"] else " (kept)"))
    reg = result["regression"]
    for c, why in (reg.get("not_estimated") or {}).items():
        lines.append(f"regression: {c} left out: {why}")
    terms = reg.get("terms")
    if terms:
        lines.append(f"logistic GEE of appropriate decisions (reference {reg['reference']}): "
                     + ", ".join(f"{k} OR {t['odds_ratio']:.2f} [{_exp(t['ci'][0]):.2f}, {_exp(t['ci'][1]):.2f}]"
                                 for k, t in terms.items() if k != "intercept"))
    else:
        lines.append(f"regression: {reg['note']}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def _exp(v: float) -> float:
    import math

    return math.exp(v)
