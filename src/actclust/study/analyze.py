"""Reliance metrics of a study, with 95% bootstrap intervals that resample participants.

A *trial* is one item answered by one participant under one condition (in a two-stage study:
both its answers). With ``accept`` the final decision and ``ai_right`` whether the model was
right:

* ``accuracy``: share of appropriate decisions (accept when the AI is right, reject when wrong);
* ``accept_given_ai_right``, ``reject_given_ai_wrong``; ``over_reliance`` = accepted wrong /
  wrong = 1 - reject_given_ai_wrong; ``under_reliance`` = rejected right / right;
* ``rair`` (two-stage): among trials where the participant's own answer was wrong and the AI
  right, the share whose final answer is right; ``rsr``: among trials where the own answer was
  right and the AI wrong, the share whose final answer is right (Schemmer et al. 2023);
  ``initial_accuracy`` and ``final_accuracy`` of the participant's answers;
* ``confidence_ai_right``, ``confidence_ai_wrong``: mean confidence (1-4) of the final decision.

Each metric is a ratio of totals over a condition's trials; its interval is the 2.5 and 97.5
percentiles over bootstrap replicates that draw participants with replacement (within their
assigned condition in a between-subjects design), so that a participant's trials stay together.
Differences from ``none`` are taken within each replicate. Needs NumPy, and statsmodels for the
regression only.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np

from ..exceptions import DataNotFoundError, ParameterError
from .folder import Study, load_study

__all__ = ["METRICS", "analyze_study", "analyze_rows", "render_html"]

# (name, numerator, denominator) over the per-participant counts below
_COUNTS = ("n", "appropriate", "n_right", "accept_right", "n_wrong", "reject_wrong", "conf_right", "conf_wrong",
           "rair_num", "rair_den", "rsr_num", "rsr_den", "initial_right", "final_right", "two_stage_n")
METRICS = {
    "accuracy": ("appropriate", "n"),
    "accept_given_ai_right": ("accept_right", "n_right"),
    "reject_given_ai_wrong": ("reject_wrong", "n_wrong"),
    "over_reliance": (("n_wrong", "reject_wrong"), "n_wrong"),
    "under_reliance": (("n_right", "accept_right"), "n_right"),
    "rair": ("rair_num", "rair_den"),
    "rsr": ("rsr_num", "rsr_den"),
    "initial_accuracy": ("initial_right", "two_stage_n"),
    "final_accuracy": ("final_right", "two_stage_n"),
    "confidence_ai_right": ("conf_right", "n_right"),
    "confidence_ai_wrong": ("conf_wrong", "n_wrong"),
}
_K = {name: i for i, name in enumerate(_COUNTS)}


def analyze_study(path, *, n_boot: int = 2000, seed: int = 0, exclude_inattentive: bool = True) -> dict:
    """Analyse the responses stored in a study folder; see :func:`analyze_rows`."""
    from .db import Store

    study = load_study(path)
    if not study.db_path.exists():
        raise DataNotFoundError(f"{study.path} holds no responses yet ({study.db_path.name} is missing); "
                                f"run: actclust study serve {study.path}")
    return analyze_rows(study, Store(study).export(), n_boot=n_boot, seed=seed,
                        exclude_inattentive=exclude_inattentive)


def _trials(study: Study, rows: list) -> list:
    """Complete trials as dicts: participant, condition, ai_right, accept, confidence, own and final answers."""
    by_trial: dict = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], {})[r["stage"]] = r
    out = []
    for answers in by_trial.values():
        final = answers.get("final") or answers.get("decision")
        if final is None or (study.two_stage and "initial" not in answers):
            continue
        accept = final["decision"] == "accept"
        t = {"participant": final["participant"], "condition": final["condition"], "ai_right": final["ai_right"],
             "accept": accept, "confidence": final["confidence"], "own": None, "final_right": None}
        if "initial" in answers:
            own = answers["initial"]["label"]
            answer = final["ai_prediction"] if accept else (final["label"] if final["label"] is not None else own)
            t["own"], t["own_right"] = own, own == final["true_label"]
            t["final_right"] = answer == final["true_label"]
        out.append(t)
    return out


def _count(t: dict) -> np.ndarray:
    c = np.zeros(len(_COUNTS))
    right = t["ai_right"]
    c[_K["n"]] = 1
    c[_K["appropriate"]] = t["accept"] == right
    c[_K["n_right" if right else "n_wrong"]] = 1
    c[_K["accept_right"]] = right and t["accept"]
    c[_K["reject_wrong"]] = (not right) and not t["accept"]
    c[_K["conf_right" if right else "conf_wrong"]] = t["confidence"]
    if t["final_right"] is not None:
        c[_K["two_stage_n"]] = 1
        c[_K["initial_right"]] = t["own_right"]
        c[_K["final_right"]] = t["final_right"]
        if right and not t["own_right"]:
            c[_K["rair_den"]], c[_K["rair_num"]] = 1, t["final_right"]
        if t["own_right"] and not right:
            c[_K["rsr_den"]], c[_K["rsr_num"]] = 1, t["final_right"]
    return c


def _ratios(totals: np.ndarray) -> dict:
    """Metric values from count totals ``(..., n_counts)``; NaN where the denominator is 0."""
    out = {}
    for name, (num, den) in METRICS.items():
        top = totals[..., _K[num[0]]] - totals[..., _K[num[1]]] if isinstance(num, tuple) else totals[..., _K[num]]
        bottom = totals[..., _K[den]]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)
    return out


def _interval(estimate: float, replicates: np.ndarray) -> Optional[dict]:
    if not np.isfinite(estimate):
        return None
    ok = replicates[np.isfinite(replicates)]
    ci = [float(v) for v in np.percentile(ok, [2.5, 97.5])] if len(ok) else None
    return {"estimate": float(estimate), "ci": ci}


def _attention(rows: list) -> dict:
    """Per participant: (attention checks answered, passed); passed = rejected with confidence 4."""
    out: dict = {}
    for r in rows:
        if r.get("attention_check") and r["stage"] != "initial":
            n, ok = out.get(r["participant"], (0, 0))
            out[r["participant"]] = (n + 1, ok + (r["decision"] == "reject" and r["confidence"] == 4))
    return out


def analyze_rows(study: Study, rows: list, *, n_boot: int = 2000, seed: int = 0,
                 exclude_inattentive: bool = True) -> dict:
    """The analysis of exported response rows (:meth:`actclust.study.db.Store.export`).

    Attention checks never count in the metrics; with ``exclude_inattentive`` a participant
    who failed one is left out entirely. ``"attention"`` in the result says who failed.

    Returns ``{"design", "two_stage", "n_boot", "conditions": {name: {"n_participants",
    "n_responses", metric: {"estimate", "ci"} or None}}, "overall": {...}, "differences":
    {name: {metric: {"estimate", "ci"} or None}}, "regression": {...}}``, differences being
    condition minus ``none`` (absent without a ``none`` condition).
    """
    if not isinstance(n_boot, int) or n_boot < 100:
        raise ParameterError(f"n_boot must be an int >= 100 for 95% intervals. Got {n_boot!r} instead.")
    checks = _attention(rows)
    failed = sorted(p for p, (n, ok) in checks.items() if ok < n)
    dropped = set(failed) if exclude_inattentive else set()
    trials = _trials(study, [r for r in rows if not r.get("attention_check") and r["participant"] not in dropped])
    conditions = study.conditions
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
    strata = ([[where[p] for p in people if assigned[p] == c] for c in conditions] if study.design == "between"
              else [list(range(len(people)))])
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(people)))
    for members in (s for s in strata if s):
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=n_boot)
    point = _ratios(counts.sum(0))  # metric -> (G,)
    boot = _ratios(np.einsum("bp,pgk->bgk", weights, counts)) if people else {m: np.full((n_boot, len(groups)), np.nan)
                                                                              for m in METRICS}
    participants = (counts[:, :, _K["n"]] > 0).sum(0) if people else np.zeros(len(groups), int)
    per = {}
    for g, name in enumerate(groups):
        per[name] = {"n_participants": int(participants[g]), "n_responses": int(counts[:, g, _K["n"]].sum())}
        per[name].update({m: _interval(point[m][g], boot[m][:, g]) for m in METRICS})
    result = {"design": study.design, "two_stage": study.two_stage, "n_boot": n_boot, "seed": seed,
              "conditions": {c: per[c] for c in conditions}, "overall": per["overall"]}
    if "none" in conditions:
        ref = conditions.index("none")
        result["differences"] = {c: {m: _interval(point[m][g] - point[m][ref], boot[m][:, g] - boot[m][:, ref])
                                     for m in METRICS}
                                 for g, c in enumerate(conditions) if c != "none"}
    result["attention"] = {"participants_checked": len(checks), "failed": failed,
                           "excluded": sorted(dropped)}
    result["regression"] = _regression(trials, conditions)
    return result


def _regression(trials: list, conditions: list) -> dict:
    """Logistic GEE (exchangeable within participant) of appropriate decisions on condition."""
    present = [c for c in conditions if any(t["condition"] == c for t in trials)]
    reference = "none" if "none" in present else (present[0] if present else None)
    about = {"model": "GEE, binomial family, logit link, exchangeable correlation within participant, "
                      "robust standard errors", "outcome": "appropriate decision", "reference": reference}
    if len(present) < 2 or len({t["participant"] for t in trials}) < 2:
        return {**about, "terms": None, "note": "needs responses under at least two conditions from two participants"}
    others = [c for c in present if c != reference]
    y = np.array([t["accept"] == t["ai_right"] for t in trials], dtype=float)
    X = np.column_stack([np.ones(len(trials))] + [[t["condition"] == c for t in trials] for c in others]).astype(float)
    ids = np.array([t["participant"] for t in trials])
    order = np.argsort(ids, kind="stable")  # GEE wants each cluster's rows together
    try:
        import statsmodels.api as sm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter: a failed fit is reported as a note
            fit = sm.GEE(y[order], X[order], groups=ids[order], family=sm.families.Binomial(),
                         cov_struct=sm.cov_struct.Exchangeable()).fit()
            params, ci, p = fit.params, fit.conf_int(0.05), fit.pvalues
    except Exception as e:  # a degenerate sample (e.g. every decision appropriate) has no finite fit
        return {**about, "terms": None, "note": f"the model could not be fitted: {type(e).__name__}: {e}"}
    if not np.all(np.isfinite(params)) or not np.all(np.isfinite(ci)):
        return {**about, "terms": None, "note": "the model has no finite estimate (e.g. no variation in an arm)"}
    terms = {}
    for j, name in enumerate(["intercept"] + others):
        terms[name] = {"log_odds": float(params[j]), "ci": [float(ci[j][0]), float(ci[j][1])],
                       "odds_ratio": float(math.exp(params[j])), "p_value": float(p[j])}
    return {**about, "n_observations": len(trials), "n_participants": len(set(ids.tolist())), "terms": terms}


def render_html(result: dict, study: Study) -> str:
    """A self-contained page of the analysis: tables and inline SVG interval plots."""
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("actclust.study", "templates"), autoescape=True)
    shown = [m for m in ("accuracy", "accept_given_ai_right", "reject_given_ai_wrong", "rair", "rsr")
             if any(result["conditions"][c][m] for c in study.conditions)]
    return env.get_template("analysis.html.j2").render(r=result, study=study, plots=shown, metrics=list(METRICS))
