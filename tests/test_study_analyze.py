"""The analysis of a study (actclust.study.analyze) on hand-made responses, and its CLI."""

import json
from pathlib import Path

import pytest

from actclust.cli.commands import main
from actclust.exceptions import DataNotFoundError, ParameterError
from actclust.study.analyze import METRICS, analyze_rows, analyze_study
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
    assert similar["accuracy"] == {"estimate": 1.0, "ci": [1.0, 1.0]}
    assert out["differences"]["similar"]["accuracy"]["estimate"] == pytest.approx(0.5)
    for m in ("rair", "rsr", "initial_accuracy", "final_accuracy"):
        assert none[m] is None and out["differences"]["similar"][m] is None
    assert out["overall"]["n_participants"] == 4 and out["overall"]["n_responses"] == 12
    assert set(none) == {"n_participants", "n_responses", *METRICS}
    json.dumps(out)  # plain JSON


# the bootstrap resamples participants: a condition with one participant has a zero-width interval
def test_resamples_participants():
    rows = [_row(t, p, c, r, d) for t, (p, c, r, d) in enumerate(ONE_STAGE) if p != 1]
    out = analyze_rows(_study(), rows, n_boot=500)
    assert out["conditions"]["none"]["accuracy"] == {"estimate": 0.5, "ci": [0.5, 0.5]}
    assert analyze_rows(_study(), rows, n_boot=500) == out  # seeded


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
