"""Reliance metrics of a study, with 95% bootstrap intervals that resample participants.

A *trial* is one item answered by one participant under one condition (in a two-stage study:
both its answers). With ``accept`` the final decision and ``ai_right`` whether the model was
right:

* ``accuracy``: share of appropriate decisions (accept when the AI is right, reject when wrong);
* ``accept_given_ai_right``, ``reject_given_ai_wrong``; ``over_reliance`` = accepted wrong /
  wrong = 1 - reject_given_ai_wrong; ``under_reliance`` = rejected right / right;
  ``ai_accuracy``: share of trials where the AI was right;
* ``rair`` (two-stage): among trials where the participant's own answer was wrong and the AI
  right, the share whose final answer is right; ``rsr``: among trials where the own answer was
  right and the AI wrong, the share whose final answer is right (Schemmer et al. 2023);
  ``initial_accuracy`` and ``final_accuracy`` of the participant's answers;
* ``confidence_ai_right``, ``confidence_ai_wrong``: mean confidence (1-4) of the final decision;
* ``median_response_ms``: median time from the trial's first display to its (final) answer.

Each metric is a ratio of totals over a condition's trials; its interval is the 2.5 and 97.5
percentiles over bootstrap replicates that draw participants with replacement (within their
assigned condition in a between-subjects design), so that a participant's trials stay together.
An interval from fewer than :data:`MIN_BOOTSTRAP_PARTICIPANTS` participants is marked with a
``note`` (it is too narrow), and from one participant there is none. Differences from the
reference condition are taken within each replicate. A metric that cannot be computed is
``null``, and ``null_reasons`` says why. Two-stage analyses add ``complementarity``: the team's
(final) accuracy against the AI alone and the human alone on the same trials. Needs NumPy, and
statsmodels for the regression only. The trials come from a study folder
(:func:`analyze_study`) or from any platform's table (:mod:`.trials`).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

from ..exceptions import DataNotFoundError, ParameterError
from .folder import Study, load_study

__all__ = ["METRICS", "MIN_BOOTSTRAP_PARTICIPANTS", "analyze_study", "analyze_rows", "analyze_trials", "study_trials",
           "render_html", "HTML_GENERATOR"]

#: Fewer participants than this give percentile-bootstrap intervals that are too narrow: with n
#: participants the bootstrap spread is the sample spread times sqrt((n - 1) / n), and the normal
#: quantile stands in for Student's t; at n = 10 a nominal 95% interval covers about 90%.
MIN_BOOTSTRAP_PARTICIPANTS = 10
#: The ``<meta name="generator">`` of every page :func:`render_html` writes: how the CLI knows a
#: file it may replace is one of its own pages.
HTML_GENERATOR = "actclust study analyze"

# (name, numerator, denominator) over the per-participant counts below
_COUNTS = ("n", "appropriate", "n_right", "accept_right", "n_wrong", "reject_wrong", "conf_right", "conf_right_n",
           "conf_wrong", "conf_wrong_n", "rair_num", "rair_den", "rsr_num", "rsr_den", "initial_right", "final_right",
           "two_stage_n", "ai_right_ts")
METRICS = {
    "accuracy": ("appropriate", "n"),
    "accept_given_ai_right": ("accept_right", "n_right"),
    "reject_given_ai_wrong": ("reject_wrong", "n_wrong"),
    "over_reliance": (("n_wrong", "reject_wrong"), "n_wrong"),
    "under_reliance": (("n_right", "accept_right"), "n_right"),
    "ai_accuracy": ("n_right", "n"),
    "rair": ("rair_num", "rair_den"),
    "rsr": ("rsr_num", "rsr_den"),
    "initial_accuracy": ("initial_right", "two_stage_n"),
    "final_accuracy": ("final_right", "two_stage_n"),
    "confidence_ai_right": ("conf_right", "conf_right_n"),
    "confidence_ai_wrong": ("conf_wrong", "conf_wrong_n"),
}
_K = {name: i for i, name in enumerate(_COUNTS)}
_WHY_NULL = {  # a metric is null when its denominator is 0; this says what that means
    "n": "no complete trials",
    "n_right": "no trial where the AI was right",
    "n_wrong": "no trial where the AI was wrong",
    "conf_right_n": "no confidence recorded on a trial where the AI was right",
    "conf_wrong_n": "no confidence recorded on a trial where the AI was wrong",
    "rair_den": "no trial where the participant's own answer was wrong and the AI right",
    "rsr_den": "no trial where the participant's own answer was right and the AI wrong",
    "two_stage_n": "not a two-stage study: it needs each participant's own answer before the advice",
}
_BOOT_CHUNK = 250  # bootstrap replicates of the median time computed at once (memory: chunk x trials)


def analyze_study(path, *, n_boot: int = 2000, seed: int = 0, exclude_inattentive: bool = True,
                  reference: Optional[str] = None) -> dict:
    """Analyse the responses stored in a study folder; see :func:`analyze_rows`."""
    from .db import read_responses

    study = load_study(path)
    if not study.db_path.exists():
        raise DataNotFoundError(f"{study.path} holds no responses yet ({study.db_path.name} is missing); "
                                f"run: actclust study serve {study.path}")
    return analyze_rows(study, read_responses(study), n_boot=n_boot, seed=seed,
                        exclude_inattentive=exclude_inattentive, reference=reference)


def study_trials(study: Study, rows: list) -> list:
    """Complete trials as dicts (see :func:`analyze_trials`) from exported response rows."""
    by_trial: dict = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], {})[r["stage"]] = r
    out = []
    for answers in by_trial.values():
        final = answers.get("final") or answers.get("decision")
        if final is None or (study.two_stage and "initial" not in answers):
            continue
        accept = final["decision"] == "accept"
        first = answers.get("initial", final)  # the trial was first shown for its first answer
        shown = first.get("shown")
        t = {"participant": final["participant"], "condition": final["condition"], "ai_right": final["ai_right"],
             "accept": accept, "confidence": final["confidence"], "final_right": None, "own_right": None,
             "item": final.get("item_id"),
             "response_ms": None if shown is None else max(0.0, (final["created"] - shown) * 1000.0)}
        if "initial" in answers:
            own = answers["initial"]["label"]
            answer = final["ai_prediction"] if accept else (final["label"] if final["label"] is not None else own)
            t["own_right"] = own == final["true_label"]
            t["final_right"] = answer == final["true_label"]
        out.append(t)
    return out


def _count(t: dict) -> np.ndarray:
    c = np.zeros(len(_COUNTS))
    right = bool(t["ai_right"])
    c[_K["n"]] = 1
    c[_K["appropriate"]] = t["accept"] == right
    c[_K["n_right" if right else "n_wrong"]] = 1
    c[_K["accept_right"]] = right and t["accept"]
    c[_K["reject_wrong"]] = (not right) and not t["accept"]
    if t.get("confidence") is not None:
        c[_K["conf_right" if right else "conf_wrong"]] = t["confidence"]
        c[_K["conf_right_n" if right else "conf_wrong_n"]] = 1
    if t.get("final_right") is not None:
        c[_K["two_stage_n"]] = 1
        c[_K["ai_right_ts"]] = right
        c[_K["initial_right"]] = t["own_right"]
        c[_K["final_right"]] = t["final_right"]
        if right and not t["own_right"]:
            c[_K["rair_den"]], c[_K["rair_num"]] = 1, t["final_right"]
        if t["own_right"] and not right:
            c[_K["rsr_den"]], c[_K["rsr_num"]] = 1, t["final_right"]
    return c


def _ratio(totals: np.ndarray, num, den: str) -> np.ndarray:
    top = totals[..., _K[num[0]]] - totals[..., _K[num[1]]] if isinstance(num, tuple) else totals[..., _K[num]]
    bottom = totals[..., _K[den]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)


def _ratios(totals: np.ndarray) -> dict:
    """Metric values from count totals ``(..., n_counts)``; NaN where the denominator is 0."""
    return {name: _ratio(totals, num, den) for name, (num, den) in METRICS.items()}


def _interval(estimate: float, replicates: np.ndarray, n_people: int) -> Optional[dict]:
    """``{"estimate", "ci"}`` (``"note"`` added when too few participants back the interval), or None."""
    if not np.isfinite(estimate):
        return None
    out = {"estimate": float(estimate), "ci": None}
    if n_people < 2:
        out["note"] = (f"from {n_people} participant: no interval (resampling one participant gives the same value "
                       "every time)")
        return out
    ok = replicates[np.isfinite(replicates)]
    out["ci"] = [float(v) for v in np.percentile(ok, [2.5, 97.5])] if len(ok) else None
    if n_people < MIN_BOOTSTRAP_PARTICIPANTS:
        out["note"] = (f"from {n_people} participants, fewer than the {MIN_BOOTSTRAP_PARTICIPANTS} a participant "
                       "bootstrap needs: the interval is too narrow")
    return out


def _attention(rows: list) -> dict:
    """Per participant: (attention checks answered, passed); passed = rejected with confidence 4."""
    out: dict = {}
    for r in rows:
        if r.get("attention_check") and r["stage"] != "initial":
            n, ok = out.get(r["participant"], (0, 0))
            out[r["participant"]] = (n + 1, ok + (r["decision"] == "reject" and r["confidence"] == 4))
    return out


def analyze_rows(study: Study, rows: list, *, n_boot: int = 2000, seed: int = 0,
                 exclude_inattentive: bool = True, reference: Optional[str] = None) -> dict:
    """The analysis of exported response rows (:func:`actclust.study.db.read_responses`).

    Attention checks never count in the metrics; with ``exclude_inattentive`` a participant
    who failed one is left out entirely. ``"attention"`` in the result says who failed. The
    rest is :func:`analyze_trials`.
    """
    _check_n_boot(n_boot)
    checks = _attention(rows)
    failed = sorted(p for p, (n, ok) in checks.items() if ok < n)
    dropped = set(failed) if exclude_inattentive else set()
    trials = study_trials(study, [r for r in rows if not r.get("attention_check") and r["participant"] not in dropped])
    attention = {"participants_checked": len(checks), "failed": failed, "excluded": sorted(dropped)}
    out = analyze_trials(trials, study.conditions, design=study.design, two_stage=study.two_stage,
                         reference=reference, n_boot=n_boot, seed=seed, attention=attention)
    if not any(t["response_ms"] is not None for t in trials) and trials:
        out["notes"].append("no response times: this study's answers were stored before actclust recorded when each "
                            "trial was first shown")
    return out


def _check_n_boot(n_boot) -> None:
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 100:
        raise ParameterError(f"n_boot must be an int >= 100 for 95% intervals. Got {n_boot!r} instead.")


def analyze_trials(trials: list, conditions: list, *, design: str = "between", two_stage: bool = False,
                   reference: Optional[str] = None, n_boot: int = 2000, seed: int = 0,
                   attention: Optional[dict] = None) -> dict:
    """Reliance metrics of complete trials, per condition and overall, with participant-bootstrap intervals.

    Parameters
    ----------
    trials : list of dict
        One per trial: ``participant``, ``condition``, ``ai_right`` (bool), ``accept`` (bool),
        ``confidence`` (1-4 or None), ``response_ms`` (or None), and in two-stage studies
        ``own_right`` and ``final_right`` (bools; None in one-stage ones).
    conditions : list of str
        In the order to report them.
    design : {"between", "within"}
        Between subjects, the bootstrap resamples participants within their condition.
    reference : str, optional
        The condition the others are compared with (differences and regression); default
        ``"none"`` where it is one of ``conditions``, else no differences.

    Returns
    -------
    dict
        ``{"design", "two_stage", "n_boot", "seed", "reference", "conditions": {name: group},
        "overall": group, "differences": {name: {metric: interval}} (with a reference),
        "complementarity": {name: ...} (two-stage), "attention", "regression", "notes"}``, a
        group being ``{"n_participants", "n_responses", metric: interval or None, ...,
        "median_response_ms": interval or None, "null_reasons": {metric: why}}`` and an interval
        ``{"estimate", "ci"[, "note"]}``.
    """
    _check_n_boot(n_boot)
    conditions = list(conditions)
    if reference is None:
        reference = "none" if "none" in conditions else None
    elif reference not in conditions:
        raise ParameterError(f"The reference condition must be one of the conditions {conditions}. "
                             f"Got {reference!r} instead.")
    groups = conditions + ["overall"]
    people = sorted({t["participant"] for t in trials})
    where = {p: i for i, p in enumerate(people)}
    counts = np.zeros((len(people), len(groups), len(_COUNTS)))  # per participant, condition and overall
    assigned = {}
    for t in trials:
        c = _count(t)
        counts[where[t["participant"]], conditions.index(t["condition"])] += c
        counts[where[t["participant"]], -1] += c
        assigned[t["participant"]] = t["condition"]
    strata = ([[where[p] for p in people if assigned[p] == c] for c in conditions] if design == "between"
              else [list(range(len(people)))])
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(people)))
    for members in (s for s in strata if s):
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=n_boot)
    totals = counts.sum(0)
    point = _ratios(totals)  # metric -> (G,)
    boot_totals = np.einsum("bp,pgk->bgk", weights, counts) if people else np.zeros((n_boot, len(groups), len(_COUNTS)))
    boot = _ratios(boot_totals)
    backing = {den: (counts[:, :, _K[den]] > 0).sum(0) for _, den in METRICS.values()}  # participants per denominator
    times = _times(trials, conditions, where, weights)
    per = {}
    for g, name in enumerate(groups):
        per[name] = {"n_participants": int(backing["n"][g]), "n_responses": int(totals[g, _K["n"]])}
        reasons = {}
        for m, (_, den) in METRICS.items():
            per[name][m] = _interval(point[m][g], boot[m][:, g], int(backing[den][g]))
            if per[name][m] is None:
                # rair and rsr need each participant's own answer first, as the accuracies before and after do: a
                # one-stage study said it held no trial of the kind instead (an outside check)
                den = "two_stage_n" if not two_stage and m in ("rair", "rsr") else den
                reasons[m] = _WHY_NULL["n" if totals[g, _K["n"]] == 0 else den]
        per[name]["median_response_ms"] = times[name]
        if times[name] is None:
            reasons["median_response_ms"] = ("no complete trials" if totals[g, _K["n"]] == 0 else
                                             "no response times recorded")
        excluded = len((attention or {}).get("excluded", ()))
        if excluded and totals[g, _K["n"]] == 0:  # not "no complete trials": their trials were left out
            reasons = {m: f"no complete trials of participants kept ({excluded} left out for failing an attention "
                          "check; --keep-inattentive keeps them)" if r in (_WHY_NULL["n"], "no complete trials")
                       else r for m, r in reasons.items()}
        per[name]["null_reasons"] = reasons
    result = {"design": design, "two_stage": bool(two_stage), "n_boot": n_boot, "seed": seed, "reference": reference,
              "conditions": {c: per[c] for c in conditions}, "overall": per["overall"], "notes": []}
    if reference is not None:
        ref = conditions.index(reference)
        result["differences"] = {c: {m: _interval(point[m][g] - point[m][ref], boot[m][:, g] - boot[m][:, ref],
                                                  int(min(backing[den][g], backing[den][ref])))
                                     for m, (_, den) in METRICS.items()}
                                 for g, c in enumerate(conditions) if c != reference}
    if two_stage:
        result["complementarity"] = {name: _complementarity(totals[g], boot_totals[:, g], int(backing["two_stage_n"][g]))
                                     for g, name in enumerate(groups)}
    result["attention"] = attention or {"participants_checked": 0, "failed": [], "excluded": []}
    result["regression"] = _regression(trials, conditions, reference)
    few = sorted(c for c in conditions if 0 < per[c]["n_participants"] < MIN_BOOTSTRAP_PARTICIPANTS)
    if few:
        result["notes"].append(f"conditions {few} have fewer than {MIN_BOOTSTRAP_PARTICIPANTS} participants: their "
                               "intervals are too narrow (marked with a note)")
    return result


def _times(trials: list, conditions: list, where: dict, weights: np.ndarray) -> dict:
    """Per condition and overall: the median response time with its participant-bootstrap interval, or None."""
    out = {}
    timed = [t for t in trials if t.get("response_ms") is not None]
    for name in conditions + ["overall"]:
        own = [t for t in timed if name == "overall" or t["condition"] == name]
        if not own:
            out[name] = None
            continue
        ms = np.array([t["response_ms"] for t in own], dtype=np.float64)
        who = np.array([where[t["participant"]] for t in own])
        order = np.argsort(ms, kind="stable")
        ms, who = ms[order], who[order]
        reps = np.concatenate([_weighted_median(ms, weights[b:b + _BOOT_CHUNK][:, who])
                               for b in range(0, len(weights), _BOOT_CHUNK)])
        out[name] = _interval(float(np.median(ms)), reps, len(set(who.tolist())))
    return out


def _weighted_median(sorted_values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Median of ``sorted_values`` under each row of weights ``w (b, n)``; equal to np.median for unit weights."""
    cum = np.cumsum(w, axis=1)
    half = cum[:, -1:] / 2
    lo = np.minimum((cum < half).sum(1), len(sorted_values) - 1)  # first position where the cumulative weight >= half
    hi = np.minimum((cum <= half).sum(1), len(sorted_values) - 1)  # ... > half: differs only at an exact half
    with np.errstate(invalid="ignore"):
        return np.where(cum[:, -1] > 0, (sorted_values[lo] + sorted_values[hi]) / 2, np.nan)


def _complementarity(totals: np.ndarray, boot_totals: np.ndarray, n_people: int) -> Optional[dict]:
    """Team (final) accuracy against the AI alone and the human alone (initial answers), on the same trials."""
    if totals[_K["two_stage_n"]] == 0:
        return None
    parts = {"team": "final_right", "ai": "ai_right_ts", "human": "initial_right"}
    point = {k: _ratio(totals, v, "two_stage_n") for k, v in parts.items()}
    boot = {k: _ratio(boot_totals, v, "two_stage_n") for k, v in parts.items()}
    out = {k: _interval(point[k], boot[k], n_people) for k in parts}
    for other in ("ai", "human"):
        out[f"team_minus_{other}"] = _interval(point["team"] - point[other], boot["team"] - boot[other], n_people)
    diffs = [out["team_minus_ai"], out["team_minus_human"]]
    if any(d["ci"] is None for d in diffs):
        out["team_beats_both"], out["verdict"] = None, "too few participants for intervals: undecided"
    elif all(d["ci"][0] > 0 for d in diffs):
        out["team_beats_both"], out["verdict"] = True, "the team beats both the AI alone and the human alone"
    elif any(d["ci"][1] <= 0 for d in diffs):
        worse = [k for k, d in zip(("the AI alone", "the human alone"), diffs) if d["ci"][1] <= 0]
        out["team_beats_both"], out["verdict"] = False, f"the team does not beat {' nor '.join(worse)}"
    else:
        out["team_beats_both"], out["verdict"] = None, "an interval includes 0: undecided"
    return out


def _regression(trials: list, conditions: list, reference: Optional[str]) -> dict:
    """Logistic GEE (exchangeable within participant) of appropriate decisions on condition.

    Conditions where the model has no estimate are left out, each with the reason: one
    participant (robust errors need several clusters; with one the interval has zero width) or
    every decision appropriate, or none (separation: the log-odds is infinite).
    """
    present = [c for c in conditions if any(t["condition"] == c for t in trials)]
    about = {"model": "GEE, binomial family, logit link, exchangeable correlation within participant, "
                      "robust standard errors", "outcome": "appropriate decision"}
    unfit: dict = {}
    for c in present:
        own = [t for t in trials if t["condition"] == c]
        n_people = len({t["participant"] for t in own})
        rate = sum(t["accept"] == t["ai_right"] for t in own) / len(own)
        if n_people < 2:
            unfit[c] = (f"{n_people} participant: the robust errors need at least 2 (with one, the interval would "
                        "have zero width)")
        elif rate in (0.0, 1.0):
            unfit[c] = (f"{'every' if rate == 1 else 'no'} decision appropriate in all {len(own)} trials: the "
                        "log-odds is infinite (separation) and has no estimate")
    usable = [c for c in present if c not in unfit]
    ref = reference if reference is not None else (usable[0] if usable else None)
    about.update({"reference": ref, "not_estimated": unfit})
    if ref is not None and ref in unfit:
        return {**about, "terms": None, "note": f"the reference condition {ref!r} cannot be estimated: {unfit[ref]}"}
    if ref is None or len(usable) < 2 or ref not in usable:
        why = "; ".join(f"{c}: {r}" for c, r in unfit.items())
        return {**about, "terms": None, "note": "needs responses under at least two conditions from two participants"
                + (f" each that the model can estimate ({why})" if why else "")}
    others = [c for c in usable if c != ref]
    rows = [t for t in trials if t["condition"] in usable]
    y = np.array([t["accept"] == t["ai_right"] for t in rows], dtype=float)
    X = np.column_stack([np.ones(len(rows))] + [[t["condition"] == c for t in rows] for c in others]).astype(float)
    ids = np.array([str(t["participant"]) for t in rows])
    order = np.argsort(ids, kind="stable")  # GEE wants each cluster's rows together
    try:
        import statsmodels.api as sm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter: a failed fit is reported as a note
            fit = sm.GEE(y[order], X[order], groups=ids[order], family=sm.families.Binomial(),
                         cov_struct=sm.cov_struct.Exchangeable()).fit()
            params, ci, p, se = fit.params, fit.conf_int(0.05), fit.pvalues, fit.bse
    except Exception as e:  # noqa: BLE001 - any failure of the fit is reported, not raised
        return {**about, "terms": None, "note": f"the model could not be fitted: {type(e).__name__}: {e}"}
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(ci)) and np.all(np.isfinite(se)) and np.all(se > 1e-10)):
        return {**about, "terms": None, "note": "the model has no finite estimate with a positive standard error "
                                                "(e.g. no variation between participants)"}
    terms = {}
    for j, name in enumerate(["intercept"] + others):
        terms[name] = {"log_odds": float(params[j]), "ci": [float(ci[j][0]), float(ci[j][1])],
                       "odds_ratio": float(math.exp(params[j])), "p_value": float(p[j])}
    return {**about, "n_observations": len(rows), "n_participants": len(set(ids.tolist())), "terms": terms}


def render_html(result: dict, study: Optional[Study] = None) -> str:
    """A self-contained page of the analysis: tables and inline SVG interval plots."""
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("actclust.study", "templates"), autoescape=True)
    conditions = list(result["conditions"])
    shown = [m for m in ("accuracy", "accept_given_ai_right", "reject_given_ai_wrong", "rair", "rsr")
             if any(result["conditions"][c][m] for c in conditions)]
    return env.get_template("analysis.html.j2").render(r=result, conditions=conditions, plots=shown,
                                                       metrics=list(METRICS), generator=HTML_GENERATOR)
