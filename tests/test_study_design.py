"""Assignment of conditions and trial orders (actclust.study.design), and their use by the store."""

import collections

import pytest

from actclust.study.db import Store
from actclust.study.design import assign_condition, participant_rng, plan_trials
from actclust.study.folder import load_study

from conftest import make_study

ITEMS = [{"id": i, "ai_right": i % 2 == 0} for i in range(12)]
CONDS = ["none", "similar", "concepts"]


# between subjects: always the least-filled condition; ties broken at random (both sides seen)
def test_least_filled():
    assert assign_condition(CONDS, {"none": 2, "similar": 1, "concepts": 2}, participant_rng(0, 0)) == "similar"
    picks = {assign_condition(CONDS, {"none": 1, "similar": 0, "concepts": 0}, participant_rng(0, n)) for n in range(40)}
    assert picks == {"similar", "concepts"}


# within subjects: each participant sees every condition on a third of the items, with as many
# wrong predictions each; over 3 consecutive participants every item is shown under every condition
def test_latin_square():
    plans = [plan_trials(ITEMS, CONDS, "within", n, None, participant_rng(0, n)) for n in range(3)]
    for plan in plans:
        assert sorted(i for i, _ in plan) == list(range(12))
        per = collections.Counter(c for _, c in plan)
        assert per == {c: 4 for c in CONDS}
        wrong = collections.Counter(c for i, c in plan if not ITEMS[i]["ai_right"])
        assert wrong == {c: 2 for c in CONDS}
    for item in range(12):
        assert sorted(dict(p)[item] for p in plans) == sorted(CONDS)


# the order is shuffled per participant, and the same seed and number give the same order
def test_seeded_order():
    a = plan_trials(ITEMS, CONDS, "between", 0, "none", participant_rng(0, 0))
    again = plan_trials(ITEMS, CONDS, "between", 0, "none", participant_rng(0, 0))
    other = plan_trials(ITEMS, CONDS, "between", 1, "none", participant_rng(0, 1))
    assert a == again and a != other and sorted(a) == sorted(other)
    assert all(c == "none" for _, c in a)


# the store fills conditions evenly as participants arrive
@pytest.mark.parametrize("design", ["between", "within"])
def test_store_balances(tmp_path, study_source, design):
    study = load_study(make_study(tmp_path / "s", study_source, conditions=CONDS, design=design))
    store = Store(study)
    for _ in range(7):
        store.create_session()
    progress = {p["condition"]: p["started"] for p in store.progress()}
    if design == "between":  # 7 = 2 + 2 + 3: the third one's condition is a tie broken at random
        assert sorted(progress.values()) == [2, 2, 3]
    else:
        assert progress == {c: 7 for c in CONDS}


# attention checks stay out of the Latin square: every condition keeps its share of real items
def test_attention_checks_outside_square():
    items = ITEMS + [{"id": 12, "ai_right": None, "attention": True}, {"id": 13, "ai_right": None, "attention": True}]
    plan = plan_trials(items, CONDS, "within", 0, None, participant_rng(0, 0))
    real = collections.Counter(c for i, c in plan if i < 12)
    assert real == {c: 4 for c in CONDS} and sorted(i for i, _ in plan) == list(range(14))
