"""The analysis of a study (actclust.study.analyze) on hand-made responses, and its CLI."""

import json
from pathlib import Path

import numpy as np
import pytest

from actclust.cli.commands import main
from actclust.exceptions import DataNotFoundError, ParameterError
from actclust.study.analyze import METRICS, analyze_rows, analyze_study, analyze_trials
from actclust.study.cli import format_analysis
from actclust.study.db import Store
from actclust.study.folder import Study, load_study

from conftest import make_study


def _study(conditions=("none", "similar"), two_stage=False, design="between"):
    return Study(Path("."), {"conditions": list(conditions), "design": design, "two_stage": two_stage, "seed": 0,
                             "class_names": ["a", "b", "c"], "items": [], "samples": {}})


def _row(trial, participant, condition, ai_right, decision, stage="decision", label=None, true=0, ai=None):
    ai = (true if ai_right else (true + 1) % 3) if ai is None else ai
    return {"trial_id": trial, "stage": stage, "participant": participant, "condition": condition,
            "decision": decision, "confidence": 3 if ai_right else 1, "label": label, "true_label": true,
            "ai_prediction": ai, "ai_right": ai_right}


ONE_STAGE = [  # participant, condition, ai right?, decision
    (0, "none", True, "accept"), (0, "none", True, "reject"), (0, "none", False, "accept"), (0, "none", False, "reject"),
    (1, "none", True, "accept"), (1, "none", False, "accept"),
    (2, "similar", True, "accept"), (2, "similar", False, "reject"),
    (3, "similar", True, "accept"), (3, "similar", True, "accept"), (3, "similar", False, "reject"),
    (3, "similar", False, "reject"),
]


# the estimates are the ratios counted by hand; every metric is {"estimate", "ci"} or null
def test_one_stage_by_hand():
    rows = [_row(t, p, c, r, d) for t, (p, c, r, d) in enumerate(ONE_STAGE)]
    out = analyze_rows(_study(), rows, n_boot=500)
    none, similar = out["conditions"]["none"], out["conditions"]["similar"]
    assert (none["n_participants"], none["n_responses"]) == (2, 6)
    expected = {"accuracy": 3 / 6, "accept_given_ai_right": 2 / 3, "reject_given_ai_wrong": 1 / 3,
                "over_reliance": 2 / 3, "under_reliance": 1 / 3, "confidence_ai_right": 3.0, "confidence_ai_wrong": 1.0}
    for m, v in expected.items():
        assert none[m]["estimate"] == pytest.approx(v), m
        assert none[m]["ci"][0] <= v <= none[m]["ci"][1]
    assert similar["accuracy"] == {"estimate": 1.0, "ci": [1.0, 1.0], "note": TWO_PEOPLE}
    assert out["differences"]["similar"]["accuracy"]["estimate"] == pytest.approx(0.5)
    for m in ("rair", "rsr", "initial_accuracy", "final_accuracy"):
        assert none[m] is None and out["differences"]["similar"][m] is None
        assert none["null_reasons"][m].startswith("not a two-stage study")  # rair/rsr said "no trial" (outside check)
    assert out["overall"]["n_participants"] == 4 and out["overall"]["n_responses"] == 12
    assert set(none) == {"n_participants", "n_responses", "median_response_ms", "null_reasons", *METRICS}
    assert none["median_response_ms"] is None and none["null_reasons"]["median_response_ms"] == "no response times recorded"
    json.dumps(out)  # plain JSON


TWO_PEOPLE = "from 2 participants, fewer than the 10 a participant bootstrap needs: the interval is too narrow"


# issue 17 item 8: one participant gives no "95% interval" (resampling one participant always gives the same
# value: the old analysis printed a zero-width interval); the estimate stays, with the reason
def test_one_participant_has_no_interval():
    rows = [_row(t, p, c, r, d) for t, (p, c, r, d) in enumerate(ONE_STAGE) if p != 1]
    out = analyze_rows(_study(), rows, n_boot=500)
    assert out["conditions"]["none"]["accuracy"] == {
        "estimate": 0.5, "ci": None,
        "note": "from 1 participant: no interval (resampling one participant gives the same value every time)"}
    assert analyze_rows(_study(), rows, n_boot=500) == out  # seeded
    assert "fewer than 10 participants" in out["notes"][0]
    assert "* from fewer than 10 participants" in format_analysis(out)


# issue 17 item 8: intervals from fewer than the 10 participants a bootstrap needs carry a note; from 10, none
def test_few_participants_marked():
    rng = np.random.default_rng(0)
    rows = [_row(10 * p + i, p, "none", i % 2 == 0, "accept" if rng.random() < 0.6 else "reject")
            for p in range(12) for i in range(6)]
    ten = analyze_rows(_study(["none"]), [r for r in rows if r["participant"] < 10], n_boot=300)["conditions"]["none"]
    nine = analyze_rows(_study(["none"]), [r for r in rows if r["participant"] < 9], n_boot=300)["conditions"]["none"]
    assert "note" not in ten["accuracy"] and ten["accuracy"]["ci"][0] < ten["accuracy"]["ci"][1]
    assert nine["accuracy"]["note"].startswith("from 9 participants, fewer than the 10")


# two-stage: RAIR and RSR as in Schemmer et al., by hand; a trial missing its final answer is left out
def test_two_stage_by_hand():
    cases = [  # true, ai, own, decision, final label
        (0, 0, 1, "accept", None), (0, 0, 2, "reject", None),  # own wrong, AI right: RAIR 1/2
        (1, 2, 1, "reject", None), (1, 2, 1, "accept", None), (1, 2, 1, "reject", 0),  # own right, AI wrong: RSR 1/3
    ]
    rows = []
    for t, (true, ai, own, decision, final) in enumerate(cases):
        rows.append(_row(t, t % 2, "none", ai == true, None, "initial", own, true, ai))
        rows.append(_row(t, t % 2, "none", ai == true, decision, "final", final, true, ai))
    rows.append(_row(99, 0, "none", True, None, "initial", 0, 0, 0))  # no final answer yet
    out = analyze_rows(_study(["none"], two_stage=True), rows, n_boot=500)["conditions"]["none"]
    assert out["n_responses"] == 5
    assert out["rair"]["estimate"] == pytest.approx(1 / 2) and out["rsr"]["estimate"] == pytest.approx(1 / 3)
    assert out["initial_accuracy"]["estimate"] == pytest.approx(3 / 5)
    assert out["final_accuracy"]["estimate"] == pytest.approx(2 / 5)


# the regression needs two conditions; without them it says so instead of failing
def test_regression_needs_two_conditions():
    rows = [_row(t, p, c, r, d) for t, (p, c, r, d) in enumerate(ONE_STAGE) if c == "none"]
    reg = analyze_rows(_study(), rows, n_boot=500)["regression"]
    assert reg["terms"] is None and reg["note"] == "needs responses under at least two conditions from two participants"


# too few bootstrap replicates are refused
def test_n_boot_checked():
    with pytest.raises(ParameterError, match="n_boot must be an int >= 100 for 95% intervals. Got 10 instead."):
        analyze_rows(_study(), [], n_boot=10)


# no responses at all: every metric null, nothing fails
def test_empty():
    out = analyze_rows(_study(), [], n_boot=100)
    assert out["conditions"]["none"]["accuracy"] is None and out["overall"]["n_participants"] == 0


# the CLI prints JSON, a table, and writes an HTML page with plots; a folder never served is an error
def test_cli(tmp_path, study_source, capsys):
    folder = make_study(tmp_path / "s", study_source, conditions=["none", "full"])
    with pytest.raises(DataNotFoundError, match="holds no responses yet"):
        analyze_study(folder)
    store = Store(load_study(folder))
    for n in range(4):
        session = store.authorise(**_creds(store.create_session()))
        while (pending := store.next_trial(session)) is not None:
            trial = pending[0]
            store.record(session, trial["id"], "accept" if (trial["id"] + n) % 3 else "reject", 2, None)
    assert main(["study", "analyze", str(folder), "--json", "--n-boot", "200", "--html", str(tmp_path / "a.html")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["conditions"]) == {"none", "full"} and out["overall"]["n_responses"] == 48
    html = (tmp_path / "a.html").read_text()
    assert html.count("<svg") == 3 and "<script" not in html.lower()  # accuracy and the two reliance rates
    assert main(["study", "analyze", str(folder), "--n-boot", "200"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("condition") and "overall" in table
    assert main(["study", "analyze", str(tmp_path / "nope")]) == 2
    assert "is not a study folder: it has no study.json" in capsys.readouterr().err


def _creds(session):
    return {"session_id": session["session_id"], "token": session["token"]}


# attention checks: never in the metrics; who fails one is left out (or kept, when asked)
def test_attention_checks(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source, items=6, conditions=["none"], attention_checks=2)
    study = load_study(folder)
    checks = [it for it in study.items if it.get("attention")]
    assert len(study.items) == 8 and len(checks) == 2 and checks[0]["input"]["text"].startswith("Attention check")
    from fastapi.testclient import TestClient

    from actclust.study.app import make_app

    page = TestClient(make_app(folder, "t0k")).get("/admin", headers={"Authorization": "Bearer t0k"}).text
    assert "6 items + 2 attention checks;" in page  # the checks are not counted as items
    store = Store(study)
    for n in range(3):  # participant 1 fails a check (rejects with confidence 3)
        session = store.authorise(**_creds(store.create_session()))
        while (pending := store.next_trial(session)) is not None:
            trial = pending[0]
            attention = study.item(trial["item_id"]).get("attention", False)
            store.record(session, trial["id"], "reject" if attention else "accept", 3 if attention and n == 1 else 4, None)
    rows = store.export()
    assert sum(r["attention_check"] for r in rows) == 6
    out = analyze_rows(study, rows, n_boot=200)
    assert out["attention"] == {"participants_checked": 3, "failed": [1], "excluded": [1]}
    assert out["overall"]["n_participants"] == 2 and out["overall"]["n_responses"] == 12
    assert out["overall"]["accept_given_ai_right"]["estimate"] == 1.0  # the checks' rejections are not counted
    kept = analyze_rows(study, rows, n_boot=200, exclude_inattentive=False)
    assert kept["overall"]["n_responses"] == 18 and kept["attention"]["excluded"] == []
    # everyone failed a check: the reasons say their trials were left out, not that there were none
    failing = [{**r, "confidence": 3} if r["attention_check"] else r for r in rows]
    none_kept = analyze_rows(study, failing, n_boot=200)["overall"]
    assert none_kept["n_responses"] == 0 and none_kept["null_reasons"]["accuracy"] == (
        "no complete trials of participants kept (3 left out for failing an attention check; --keep-inattentive keeps "
        "them)")


def _varied(conditions, per, seed=0, fixed=None):
    """Rows of ``per`` participants per condition, 10 trials each, half AI-wrong, accepting at random
    (60%); conditions in ``fixed`` get every decision appropriate."""
    rng, rows, t = np.random.default_rng(seed), [], 0
    for k, c in enumerate(conditions):
        for p in range(per.get(c, 4) if isinstance(per, dict) else per):
            for i in range(10):
                right = i % 2 == 0
                accept = right if c in (fixed or ()) else rng.random() < 0.6
                rows.append(_row(t, f"{c}-{p}", c, right, "accept" if accept else "reject"))
                t += 1
    return rows


# issue 17 item 8: a condition where every decision is appropriate has no finite log-odds (separation);
# the old analysis printed log-odds 26 with p = 0. Now it is left out of the model, with the reason
def test_gee_separation_not_estimated():
    out = analyze_rows(_study(["none", "similar", "full"]), _varied(["none", "similar", "full"], 4, fixed=["similar"]),
                       n_boot=200)["regression"]
    assert out["not_estimated"] == {"similar": "every decision appropriate in all 40 trials: the log-odds is infinite "
                                               "(separation) and has no estimate"}
    assert set(out["terms"]) == {"intercept", "full"} and all(t["p_value"] > 0 for t in out["terms"].values())


# issue 17 item 8: one participant in a condition: the robust errors cannot be estimated for it (the old
# analysis gave it a term whose interval ignored its own variance)
def test_gee_one_participant_left_out():
    out = analyze_rows(_study(), _varied(["none", "similar"], {"none": 4, "similar": 1}), n_boot=200)["regression"]
    assert out["terms"] is None and out["not_estimated"]["similar"].startswith("1 participant: the robust errors need")
    assert out["note"].startswith("needs responses under at least two conditions from two participants each")


# issue 17 item 8: participants who all answer alike leave the robust errors at 0; the old analysis printed
# zero-width intervals and p = 0. Now: no terms, and why
def test_gee_no_variation_between_participants():
    rows, t = [], 0
    for p in range(8):
        c = "none" if p < 4 else "similar"
        for i in range(10):
            rows.append(_row(t, p, c, i % 2 == 0, "accept" if i % (4 if c == "none" else 5) else "reject"))
            t += 1
    out = analyze_rows(_study(), rows, n_boot=200)
    assert out["regression"]["terms"] is None
    assert out["regression"]["note"].startswith("the model has no finite estimate with a positive standard error")
    assert "regression: the model has no finite estimate" in format_analysis(out)


# the reference is 'none' by default, any condition on request (differences and regression), and must exist
def test_reference():
    rows = _varied(["a", "b", "c"], 12)
    out = analyze_rows(_study(["a", "b", "c"]), rows, n_boot=200)
    assert out["reference"] is None and "differences" not in out and out["regression"]["reference"] == "a"
    out = analyze_rows(_study(["a", "b", "c"]), rows, n_boot=200, reference="b")
    assert set(out["differences"]) == {"a", "c"} and out["regression"]["reference"] == "b"
    assert set(out["regression"]["terms"]) == {"intercept", "a", "c"}
    with pytest.raises(ParameterError, match=r"The reference condition must be one of the conditions \['a', 'b', 'c'\]. "
                                             "Got 'd' instead."):
        analyze_rows(_study(["a", "b", "c"]), rows, n_boot=200, reference="d")


# conditions with no wrong-AI items: the metrics that need them are null, each with the reason
def test_no_wrong_items_null_with_reason():
    rows = [r for r in _varied(["none", "similar"], 5) if r["ai_right"] or r["condition"] == "none"]
    got = analyze_rows(_study(), rows, n_boot=200)
    similar = got["conditions"]["similar"]
    for m in ("reject_given_ai_wrong", "over_reliance", "confidence_ai_wrong"):
        assert similar[m] is None and got["differences"]["similar"][m] is None
    assert similar["null_reasons"]["over_reliance"] == "no trial where the AI was wrong"
    assert similar["null_reasons"]["confidence_ai_wrong"] == "no confidence recorded on a trial where the AI was wrong"
    assert similar["accept_given_ai_right"]["estimate"] > 0 and got["conditions"]["none"]["over_reliance"] is not None


def _two_stage_trials(n_people, own_p, team_p, seed):
    """Two-stage trials: the AI right on half; own answer right with own_p; final right with team_p."""
    rng, out = np.random.default_rng(seed), []
    for p in range(n_people):
        for i in range(20):
            ai_right = i % 2 == 0
            own_right, final_right = rng.random() < own_p, rng.random() < team_p
            out.append({"participant": p, "condition": "similar", "ai_right": ai_right, "own_right": own_right,
                        "final_right": final_right, "accept": final_right == ai_right, "confidence": 3,
                        "response_ms": float(rng.integers(800, 5000))})
    return out


# complementarity: team accuracy against the AI alone (0.5 here) and the human alone, on the same trials
def test_complementarity():
    beats = analyze_trials(_two_stage_trials(30, 0.6, 0.8, 0), ["similar"], two_stage=True, n_boot=300)
    c = beats["complementarity"]["similar"]
    assert c["ai"]["estimate"] == 0.5 and c["team"]["estimate"] == pytest.approx(
        np.mean([t["final_right"] for t in _two_stage_trials(30, 0.6, 0.8, 0)]))
    assert c["team_minus_ai"]["ci"][0] > 0 and c["team_minus_human"]["ci"][0] > 0
    assert c["team_beats_both"] is True and c["verdict"] == "the team beats both the AI alone and the human alone"
    worse = analyze_trials(_two_stage_trials(30, 0.8, 0.6, 1), ["similar"], two_stage=True, n_boot=300)
    w = worse["complementarity"]["similar"]
    assert w["team_beats_both"] is False and w["verdict"] == "the team does not beat the human alone"
    assert "complementarity similar: team" in format_analysis(worse)
    one_stage = analyze_trials([{**t, "own_right": None, "final_right": None}
                                for t in _two_stage_trials(5, .5, .5, 2)], ["similar"], n_boot=200)
    assert "complementarity" not in one_stage


# response times: the median per condition with a participant-bootstrap interval (a weighted median in
# each replicate; with unit weights it is NumPy's median)
def test_median_response_time():
    trials = _two_stage_trials(20, 0.6, 0.7, 3)
    out = analyze_trials(trials, ["similar"], two_stage=True, n_boot=400)["conditions"]["similar"]
    times = [t["response_ms"] for t in trials]
    assert out["median_response_ms"]["estimate"] == np.median(times)
    low, high = out["median_response_ms"]["ci"]
    assert low < np.median(times) < high and high - low < 1000
    from actclust.study.analyze import _weighted_median

    values = np.sort(np.random.default_rng(0).random(7))
    assert _weighted_median(values, np.ones((1, 7)))[0] == np.median(values)
    assert _weighted_median(values[:6], np.ones((1, 6)))[0] == np.median(values[:6])
    assert _weighted_median(values, np.array([[0, 0, 0, 0, 0, 0, 3.0]]))[0] == values[6]


def _answered_study(tmp_path, study_source, n=3):
    folder = make_study(tmp_path / "s", study_source, conditions=["none", "full"])
    store = Store(load_study(folder))
    for k in range(n):
        session = store.authorise(**_creds(store.create_session()))
        while (pending := store.next_trial(session)) is not None:
            store.record(session, pending[0]["id"], "accept" if (pending[0]["id"] + k) % 3 else "reject", 2, None)
    return folder


# issue 17 item 5: --html never replaces the study's own files, by any path and even with --overwrite (the
# old analyze wrote its page over responses.sqlite: every answer lost); nor a file it did not write unless
# --overwrite; its own earlier page it replaces
def test_html_never_overwrites_study_files(tmp_path, study_source, capsys):
    import os

    folder = _answered_study(tmp_path, study_source)
    db, spec = folder / "responses.sqlite", folder / "study.json"
    before = Store(load_study(folder)).export(), spec.read_bytes()
    os.symlink(db, tmp_path / "link.html")
    os.link(spec, tmp_path / "hard.html")
    base = ["study", "analyze", str(folder), "--n-boot", "100"]
    for target in (db, spec, tmp_path / "link.html", tmp_path / "hard.html", folder / ".." / "s" / "responses.sqlite",
                   folder / "responses.sqlite-wal"):
        for extra in ([], ["--overwrite"]):
            assert main(base + ["--html", str(target)] + extra) == 2
            assert "Refusing to write the page to" in capsys.readouterr().err
    assert (Store(load_study(folder)).export(), spec.read_bytes()) == before and len(before[0]) == 36
    assert not any(b"actclust study analyze" in f.read_bytes() for f in folder.iterdir())
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main(base + ["--html", str(notes)]) == 2
    assert "already exists and is not a page written by actclust study; pass --overwrite" in capsys.readouterr().err
    assert notes.read_text() == "my notes"
    assert main(base + ["--html", str(notes), "--overwrite"]) == 0 and "<svg" in notes.read_text()
    page = tmp_path / "a.html"
    assert main(base + ["--html", str(page)]) == 0 and main(base + ["--html", str(page)]) == 0  # its own page
    assert main(base + ["--html", str(tmp_path)]) == 2
    assert "is a folder; --html takes a file name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []  # no temporary left
