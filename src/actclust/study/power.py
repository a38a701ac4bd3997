"""How many participants a study needs: power by simulating the analysis it will get.

Model. Participant ``i`` makes an appropriate decision (or, for ``metric="over_reliance"``,
accepts a wrong prediction) in condition ``c`` with probability ``expit(a_c + u_i)``, ``u_i ~
N(0, s^2)`` a participant random intercept whose intra-class correlation on the latent scale is
``icc = s^2 / (s^2 + pi^2 / 3)``. The intercepts ``a_c`` are set so that the *average* rate over
participants is ``baseline`` in the reference condition and ``baseline + effect`` in each other
one. Between subjects a participant sees one condition and ``items`` trials (over-reliance:
the ``wrong_share`` of them the AI gets wrong); within subjects every condition, on
``items / n_conditions`` trials each, with the same ``u_i``.

Test. The analysis's logistic GEE of the outcome on condition (exchangeable correlation within
participant, robust errors; :mod:`.analyze`): a comparison is detected when its 95% Wald
interval excludes 0. In these balanced designs the model is saturated, its estimates are the
pooled rates and its robust variance has a closed form (the cluster sandwich), so each
simulated study is analysed in a few vectorised NumPy operations; the tests check the z values
against statsmodels' GEE. A condition whose rate is 0 or 1 counts as not detected (the
analysis cannot estimate it). Power is the share of ``simulations`` studies in which every
comparison with the reference is detected at ``alpha`` (no correction for several comparisons).

The answer is the smallest number of participants per condition, from :data:`MIN_PARTICIPANTS`,
whose simulated power reaches ``power`` (doubling, then bisection, on common random numbers: a
study of ``n + 1`` participants adds one to the study of ``n``). With ``icc=0`` trials are independent and the two-proportion
sample size (Fleiss, no continuity correction) gives the same answer up to simulation error:
``closed_form`` reports it.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

from ..exceptions import ParameterError

__all__ = ["power_analysis", "closed_form", "gee_z", "render_power_html", "METRICS", "MIN_PARTICIPANTS"]

METRICS = ("accuracy", "over_reliance")
#: The smallest answer: below it the analysis marks its bootstrap intervals as too narrow, and the
#: robust errors of a GEE with so few participants are too small (simulated power even falls as
#: participants are added: 2 per condition "detect" a 5-point effect a third of the time).
MIN_PARTICIPANTS = 10
_BLOCK = 64  # participants drawn at a time (common random numbers across study sizes)
_QUADRATURE = 80  # Gauss-Hermite nodes for the average rate under the random intercept


def _z(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def _intercept(rate: float, sd: float) -> float:
    """``a`` such that the mean of expit(a + sd Z), Z standard normal, is ``rate``."""
    from scipy.optimize import brentq
    from scipy.special import expit, logit

    if sd == 0:
        return float(logit(rate))
    nodes, weights = np.polynomial.hermite_e.hermegauss(_QUADRATURE)
    weights = weights / weights.sum()
    return float(brentq(lambda a: float(weights @ expit(a + sd * nodes)) - rate, -40, 40, xtol=1e-12))


def closed_form(p1: float, p2: float, per_participant: int, alpha: float = 0.05, power: float = 0.8) -> dict:
    """Two-proportion sample size (Fleiss, no continuity correction) for independent trials, in trials
    and in participants of ``per_participant`` trials per condition; and the power that gives."""
    za, zb = _z(1 - alpha / 2), _z(power)
    bar = (p1 + p2) / 2
    spread, delta = math.sqrt(2 * bar * (1 - bar)), abs(p2 - p1)
    alone = math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    trials = (za * spread + zb * alone) ** 2 / delta ** 2
    n = math.ceil(trials / per_participant)
    from scipy.stats import norm

    reached = float(norm.cdf((delta * math.sqrt(n * per_participant) - za * spread) / alone))
    return {"formula": "n = (z_{1-alpha/2} sqrt(2 pbar qbar) + z_{power} sqrt(p1 q1 + p2 q2))^2 / (p2 - p1)^2 trials "
                       "per condition (Fleiss, no continuity correction)",
            "trials_per_condition": trials, "participants_per_condition": n, "power_at_n": reached}


def gee_z(y_ref: np.ndarray, y_other: np.ndarray, per_participant: int, within: bool) -> np.ndarray:
    """The GEE's Wald z of ``other`` against ``ref`` for studies ``(S, n)`` of counts out of ``per_participant``.

    Log odds ratio of the pooled rates over its cluster-robust standard error; NaN where a rate
    is 0 or 1 or the variance is not positive (the model has no estimate). ``within``: the same
    participants in both columns, so their covariance enters.
    """
    m = per_participant
    out = []
    for y in (y_ref, y_other):
        total = y.shape[1] * m
        p = y.sum(1) / total
        resid = y - m * p[:, None]
        out.append((p, resid, total))
    (p0, r0, t0), (p1, r1, t1) = out
    with np.errstate(divide="ignore", invalid="ignore"):
        d0, d1 = p0 * (1 - p0), p1 * (1 - p1)
        var = (r0 ** 2).sum(1) / t0 ** 2 / d0 ** 2 + (r1 ** 2).sum(1) / t1 ** 2 / d1 ** 2
        if within:
            var = var - 2 * (r0 * r1).sum(1) / (t0 * t1) / (d0 * d1)
        z = (np.log(p1 / (1 - p1)) - np.log(p0 / (1 - p0))) / np.sqrt(var)
    bad = (d0 <= 0) | (d1 <= 0) | ~(var > 0)
    return np.where(bad, np.nan, z)


class _Draws:
    """Simulated counts per condition, grown a block of participants at a time and kept, so that the
    study of ``n`` participants is the first ``n`` of every larger one (common random numbers)."""

    def __init__(self, intercepts: list, sd: float, m: int, within: bool, simulations: int, seed: int):
        self.intercepts, self.sd, self.m, self.within, self.s, self.seed = intercepts, sd, m, within, simulations, seed
        self.counts = [np.zeros((simulations, 0), np.int32) for _ in intercepts]

    def first(self, n: int) -> list:
        from scipy.special import expit

        while self.counts[0].shape[1] < n:
            block = self.counts[0].shape[1] // _BLOCK
            rng = np.random.default_rng([self.seed, block])
            u = rng.normal(0.0, self.sd, (self.s, _BLOCK)) if self.within else None
            for c, a in enumerate(self.intercepts):
                own = u if self.within else rng.normal(0.0, self.sd, (self.s, _BLOCK))
                y = rng.binomial(self.m, expit(a + own)).astype(np.int32)
                self.counts[c] = np.concatenate([self.counts[c], y], axis=1)
        return [c[:, :n] for c in self.counts]


def _check(name, value, low, high, *, integer=False, open_low=False, open_high=False):
    bad = isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real)
    if not bad:
        # NaN compares false with everything: not (low <= value <= high) refuses it (it met the solvers: a traceback)
        bad = not low <= value <= high or (open_low and value == low) or (open_high and value == high)
    if bad:
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        kind = "an int" if integer else "a number"
        # a sum as the user thinks of it: 0.7 + 0.35 is 1.05, not 1.0499999999999998
        got = repr(float(f"{value:.12g}")) if isinstance(value, float) else repr(value)
        raise ParameterError(f"{name} must be {kind} in {lo}{low}, {high}{hi}. Got {got} instead.")


def power_analysis(conditions, effect: float, baseline: float, items: int, *, design: str = "between",
                   icc: float = 0.0, power: float = 0.8, alpha: float = 0.05, metric: str = "accuracy",
                   wrong_share: float = 0.5, simulations: int = 1000, seed: int = 0,
                   max_participants: int = 5000, extra_n=()) -> dict:
    """Participants per condition needed to detect ``effect`` (see the module docstring).

    Parameters
    ----------
    conditions : list of str
        At least two; the reference is ``"none"`` where present, else the first.
    effect : float
        Difference in the metric's rate between each other condition and the reference.
    baseline : float
        The metric's rate in the reference condition, in (0, 1).
    items : int
        Trials per participant (split over the conditions within subjects).
    metric : {"accuracy", "over_reliance"}
        Appropriate-decision rate over all trials, or acceptance of wrong predictions over the
        ``wrong_share`` of trials where the AI is wrong.
    extra_n : sequence of int
        Study sizes to simulate as well (they appear in ``curve``).

    Returns
    -------
    dict
        ``participants_per_condition`` (None if not reached by ``max_participants``),
        ``participants_total``, ``power_at_n`` ``{"estimate", "ci"}``, the simulated ``curve``
        ``[{"n", "power", "ci"}]``, ``closed_form`` (``icc == 0``), and every input.
    """
    conditions = [conditions] if isinstance(conditions, str) else list(conditions)
    if len(conditions) < 2 or len(set(conditions)) != len(conditions):
        raise ParameterError(f"conditions must name at least two distinct conditions. Got {conditions!r} instead.")
    if design not in ("between", "within"):
        raise ParameterError(f"design must be one of ['between', 'within']. Got {design!r} instead.")
    if metric not in METRICS:
        raise ParameterError(f"metric must be one of {list(METRICS)}. Got {metric!r} instead.")
    _check("baseline", baseline, 0, 1, open_low=True, open_high=True)
    _check("effect", effect, -1, 1)
    if effect == 0:
        raise ParameterError("effect must not be 0: there is no difference to detect.")
    _check("baseline + effect", baseline + effect, 0, 1, open_low=True, open_high=True)
    _check("items", items, 1, 10 ** 6, integer=True)
    _check("icc", icc, 0, 1, open_high=True)
    _check("power", power, 0, 1, open_low=True, open_high=True)
    _check("alpha", alpha, 0, 1, open_low=True, open_high=True)
    _check("wrong_share", wrong_share, 0, 1, open_low=True)
    _check("simulations", simulations, 100, 10 ** 6, integer=True)
    _check("seed", seed, 0, 2 ** 63 - 1, integer=True)
    _check("max_participants", max_participants, MIN_PARTICIPANTS, 10 ** 6, integer=True)
    counted = items if metric == "accuracy" else int(round(items * wrong_share))
    m = counted // len(conditions) if design == "within" else counted
    if m < 1:
        split = " (within subjects they are split)" if design == "within" else ""
        raise ParameterError(f"{items} items give {counted} {'wrong-AI ' if metric != 'accuracy' else ''}trials per "
                             f"participant, {m} per condition{split}; raise items.")
    reference = "none" if "none" in conditions else conditions[0]
    others = [c for c in conditions if c != reference]
    rates = {c: float(baseline if c == reference else baseline + effect) for c in conditions}
    sd = math.sqrt(icc / (1 - icc) * math.pi ** 2 / 3)
    order = [reference] + others
    draws = _Draws([_intercept(rates[c], sd) for c in order], sd, m, design == "within", simulations, seed)
    critical = _z(1 - alpha / 2)
    found: dict = {}

    def evaluate(n: int) -> float:
        if n not in found:
            y = draws.first(n)
            hit = np.ones(simulations, bool)
            for k in range(1, len(order)):
                z = gee_z(y[0], y[k], m, design == "within")
                hit &= np.abs(np.nan_to_num(z, nan=0.0)) > critical
            found[n] = float(hit.mean())
        return found[n]

    n_needed: Optional[int] = None
    low, high = MIN_PARTICIPANTS - 1, MIN_PARTICIPANTS
    while evaluate(high) < power:
        if high >= max_participants:
            high = None
            break
        low, high = high, min(2 * high, max_participants)
    if high is not None:
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if evaluate(mid) < power else (low, mid)
        n_needed = high
    top = max(found) if n_needed is None else max(MIN_PARTICIPANTS + 4, math.ceil(1.5 * n_needed))
    for n in list(np.unique(np.linspace(MIN_PARTICIPANTS, top, 12).round().astype(int))) + list(extra_n):
        _check("extra_n", n, 2, 10 ** 6, integer=True)
        evaluate(int(n))
    curve = [{"n": n, "power": p, "ci": _mc_interval(p, simulations)} for n, p in sorted(found.items())]
    outcome = "appropriate decision" if metric == "accuracy" else "acceptance of wrong predictions"
    result = {
        "design": design, "metric": metric, "conditions": conditions, "reference": reference, "rates": rates,
        "baseline": baseline, "effect": effect, "items": items,
        "wrong_share": wrong_share if metric != "accuracy" else None,
        "trials_per_participant_per_condition": m, "icc": icc, "random_effect_sd": sd, "alpha": alpha,
        "target_power": power, "simulations": simulations, "seed": seed, "max_participants": max_participants,
        "min_participants": MIN_PARTICIPANTS, "participants_per_condition": n_needed,
        "participants_total": None if n_needed is None else (n_needed * len(conditions) if design == "between"
                                                             else n_needed),
        "power_at_n": None if n_needed is None else {"estimate": found[n_needed],
                                                     "ci": _mc_interval(found[n_needed], simulations)},
        "curve": curve,
        "closed_form": closed_form(baseline, baseline + effect, m, alpha, power) if icc == 0 else None,
        "model": "participant random intercept on the logit scale (latent-scale ICC), binomial trials",
        "test": f"logistic GEE of the {outcome} on condition, exchangeable within participant, robust errors; two-sided Wald test at {alpha} "
                f"against {reference!r} (every comparison must be detected)",
    }
    if n_needed is None:
        result["note"] = (f"power {power} is not reached with {max_participants} participants per condition; raise "
                          "--max-participants, or plan a larger effect or more items")
    if icc != 0:
        result["closed_form_note"] = "the two-proportion closed form assumes independent trials (ICC 0)"
    return result


def _mc_interval(p: float, simulations: int) -> list:
    """95% Wilson interval of a power estimated from ``simulations`` simulated studies."""
    z = 1.959963984540054
    centre = (p + z * z / (2 * simulations)) / (1 + z * z / simulations)
    half = z * math.sqrt(p * (1 - p) / simulations + z * z / (4 * simulations ** 2)) / (1 + z * z / simulations)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def render_power_html(result: dict) -> str:
    """A self-contained page: the inputs, the answer, and the simulated power curve as inline SVG."""
    from jinja2 import Environment, PackageLoader

    env = Environment(loader=PackageLoader("actclust.study", "templates"), autoescape=True)
    curve = result["curve"]
    width, height, left, bottom, top_pad, right_pad = 620, 340, 60, 40, 15, 20
    n_max = max(p["n"] for p in curve)

    def x(n):
        return left + (width - left - right_pad) * n / n_max

    def y(v):
        return top_pad + (height - top_pad - bottom) * (1 - v)
    ticks = sorted({int(round(n_max * f)) for f in (0, 0.25, 0.5, 0.75, 1)})
    points = [{"x": x(p["n"]), "y": y(p["power"]), "lo": y(p["ci"][0]), "hi": y(p["ci"][1]), "n": p["n"],
               "power": p["power"]} for p in curve]
    plot = {"width": width, "height": height, "left": left, "right": width - right_pad, "top": top_pad,
            "bottom": height - bottom, "points": points, "path": " ".join(f"{p['x']:.1f},{p['y']:.1f}" for p in points),
            "target": y(result["target_power"]), "xticks": [(x(t), t) for t in ticks],
            "yticks": [(y(v), v) for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0)],
            "chosen": None if result["participants_per_condition"] is None else x(result["participants_per_condition"])}
    from .analyze import HTML_GENERATOR

    return env.get_template("power.html.j2").render(r=result, plot=plot,
                                                    generator=HTML_GENERATOR.replace("analyze", "power"))
