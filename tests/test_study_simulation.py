"""Simulated participants with known behaviour drive a running study server over HTTP; the
analysis recovers their rates within its intervals. The correctness test of the analysis."""

import json
import random

import httpx

from actclust.study.analyze import analyze_study

from conftest import LiveStudyServer, make_study

# P(accept | AI right), P(accept | AI wrong) per condition
ONE_STAGE = {"none": (0.8, 0.6), "similar": (0.9, 0.3)}


def _participant(http, truth, rng, behave):
    """One bot: starts a session, answers every trial as ``behave(item, stage, rng)`` says; returns its answers."""
    s = http.post("/api/sessions", json={}).json()
    auth = {"Authorization": f"Bearer {s['token']}"}
    answers = 0
    while True:
        t = http.get(f"/api/sessions/{s['session_id']}/next", headers=auth).json()
        if t.get("done"):
            return answers
        condition = "none" if t["explanation"] is None and t["stage"] != "initial" else "similar"
        body = {"trial_id": t["trial_id"], "confidence": rng.randint(1, 4),
                **behave(truth[t["item"]["id"]], t["stage"], condition, rng)}
        r = http.post(f"/api/sessions/{s['session_id']}/responses", headers=auth, json=body)
        assert r.status_code == 200 and r.json()["duplicate"] is False, r.text
        answers += 1


def _one_stage(item, stage, condition, rng):
    p_right, p_wrong = ONE_STAGE[condition]
    return {"decision": "accept" if rng.random() < (p_right if item["ai_right"] else p_wrong) else "reject"}


def _inside(metric, value):
    low, high = metric["ci"]
    return low <= value <= high


# 2 conditions x 24 participants x 20 items (half wrong), between subjects: the analysis's intervals hold the
# true rates, the difference from 'none' and the regression see the effect, every answer is stored
def test_recovers_one_stage_rates(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source, items=20, conditions=list(ONE_STAGE))
    truth = {it["id"]: it for it in json.loads((folder / "study.json").read_text())["items"]}
    rng = random.Random(0)
    with LiveStudyServer(folder, app={"sessions_per_address": 0}) as server, \
            httpx.Client(base_url=server.url, timeout=10) as http:
        sent = sum(_participant(http, truth, rng, _one_stage) for _ in range(48))
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        export = http.get("/admin/export.json", headers=admin).json()["responses"]
    assert sent == len(export) == 48 * 20
    assert len({(r["trial_id"], r["stage"]) for r in export}) == len(export)
    out = analyze_study(folder, n_boot=2000)
    for condition, (p_right, p_wrong) in ONE_STAGE.items():
        got = out["conditions"][condition]
        assert got["n_participants"] == 24 and got["n_responses"] == 480
        assert _inside(got["accept_given_ai_right"], p_right), (condition, got["accept_given_ai_right"])
        assert _inside(got["reject_given_ai_wrong"], 1 - p_wrong), (condition, got["reject_given_ai_wrong"])
        assert _inside(got["over_reliance"], p_wrong) and _inside(got["under_reliance"], 1 - p_right)
        assert _inside(got["accuracy"], (p_right + 1 - p_wrong) / 2)  # half the items are wrong
    diff = out["differences"]["similar"]["reject_given_ai_wrong"]
    assert _inside(diff, 0.3) and diff["ci"][0] > 0
    term = out["regression"]["terms"]["similar"]
    assert term["log_odds"] > 0 and term["ci"][0] > 0


# P(own answer right); P(accept | own wrong, AI right); P(accept | own right, AI wrong)
OWN, SWITCH, GIVE_UP = 0.6, 0.7, 0.25


def _two_stage(item, stage, condition, rng):
    if stage == "initial":
        n = 3
        wrong = [c for c in range(n) if c != item["label"]]
        item["_own"] = item["label"] if rng.random() < OWN else rng.choice(wrong)
        return {"label": item["_own"]}
    own_right = item["_own"] == item["label"]
    if own_right == item["ai_right"]:
        p = 0.9  # agreeing (or both wrong): mostly accept
    else:
        p = SWITCH if item["ai_right"] else GIVE_UP
    return {"decision": "accept" if rng.random() < p else "reject"}


# a two-stage within-subjects study: RAIR and RSR are recovered
def test_recovers_rair_rsr(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source, items=16, conditions=["none", "similar"], design="within",
                        two_stage=True)
    rng = random.Random(1)
    with LiveStudyServer(folder, app={"sessions_per_address": 0}) as server, \
            httpx.Client(base_url=server.url, timeout=10) as http:
        for _ in range(24):  # each bot gets its own copy of the items, to remember its own answers
            truth = {it["id"]: dict(it) for it in json.loads((folder / "study.json").read_text())["items"]}
            assert _participant(http, truth, rng, _two_stage) == 32
    out = analyze_study(folder, n_boot=2000)
    overall = out["overall"]
    assert overall["n_participants"] == 24 and overall["n_responses"] == 384
    assert _inside(overall["rair"], SWITCH), overall["rair"]
    assert _inside(overall["rsr"], 1 - GIVE_UP), overall["rsr"]
    assert _inside(overall["initial_accuracy"], OWN), overall["initial_accuracy"]
    assert out["conditions"]["none"]["n_participants"] == 24  # within: everyone under every condition
