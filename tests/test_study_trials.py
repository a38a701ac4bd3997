"""Trial tables from other platforms (actclust.study.trials and `actclust study analyze --trials`): the same
analysis as a study folder's, every bad input refused with the row or column named."""

import csv
import json

import numpy as np
import pytest

from actclust.cli.commands import main
from actclust.exceptions import DataError, DataNotFoundError, ParameterError
from actclust.study.analyze import analyze_rows
from actclust.study.folder import Study
from actclust.study.trials import analyze_table, parse_columns, read_trials

HEADER = ["participant", "condition", "ai_correct", "decision", "confidence", "item", "response_ms"]


def _table(n_people=8, seed=0, conditions=("none", "similar")):
    """Rows of a between-subjects one-stage study: 10 items each, half where the AI is wrong."""
    rng, rows = np.random.default_rng(seed), []
    for p in range(n_people):
        condition = conditions[p % len(conditions)]
        for i in range(10):
            right = i % 2 == 0
            accept = rng.random() < (0.8 if right else 0.4)
            rows.append({"participant": f"P{p}", "condition": condition, "ai_correct": int(right),
                         "decision": "accept" if accept else "reject", "confidence": int(rng.integers(1, 5)),
                         "item": f"img{i}", "response_ms": int(rng.integers(500, 9000))})
    return rows


def _write(path, rows, header=HEADER, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, delimiter=delimiter, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _study_rows(rows):
    """The same trials as rows exported from a study folder, for analyze_rows."""
    people = sorted({r["participant"] for r in rows})
    out = []
    for t, r in enumerate(rows):
        right = bool(r["ai_correct"])
        out.append({"trial_id": t, "stage": "decision", "participant": people.index(r["participant"]),
                    "condition": r["condition"], "decision": r["decision"], "confidence": r["confidence"],
                    "label": None, "true_label": 0, "ai_prediction": 0 if right else 1, "ai_right": right,
                    "created": r["response_ms"] / 1000, "shown": 0.0})
    return out


# a CSV, TSV, JSON-lines or Parquet table gives the analysis of the same trials stored by our own server
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_same_analysis_as_a_study(tmp_path, fmt):
    rows = _table(n_people=20)
    path = tmp_path / f"trials.{fmt}"
    if fmt == "csv":
        _write(path, rows)
    elif fmt == "tsv":
        _write(path, rows, delimiter="\t")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    got = analyze_table(path, n_boot=300)
    study = Study(tmp_path, {"conditions": ["none", "similar"], "design": "between", "two_stage": False, "seed": 0,
                             "class_names": ["a", "b"], "items": [], "samples": {}})
    expected = analyze_rows(study, _study_rows(rows), n_boot=300)
    for c in ("none", "similar", "overall"):
        mine, theirs = (got["conditions"].get(c) or got["overall"]), (expected["conditions"].get(c) or expected["overall"])
        for m in ("accuracy", "over_reliance", "confidence_ai_right", "median_response_ms"):
            assert mine[m]["estimate"] == pytest.approx(theirs[m]["estimate"]), (c, m)
            assert mine[m]["ci"] == pytest.approx(theirs[m]["ci"]), (c, m)
    for key in ("estimate", "ci"):
        assert got["differences"]["similar"]["accuracy"][key] == pytest.approx(
            expected["differences"]["similar"]["accuracy"][key])
    for key in ("log_odds", "ci", "p_value"):
        assert got["regression"]["terms"]["similar"][key] == pytest.approx(expected["regression"]["terms"]["similar"][key])
    assert got["source"] == {"trials": str(path), "format": fmt, "rows": 200, "columns": {}}


# --columns maps a platform's names; values as platforms write them (TRUE/False, 1.0, Accept) are read
def test_columns_mapping(tmp_path, capsys):
    rows = [{"UID": r["participant"], "Method": r["condition"], "AIRight": ["FALSE", "TRUE"][r["ai_correct"]],
             "Choice": r["decision"].capitalize(), "Conf": f"{r['confidence']}.0", "RT": r["response_ms"]}
            for r in _table()]
    path = _write(tmp_path / "gorilla.csv", rows, header=["UID", "Method", "AIRight", "Choice", "Conf", "RT"])
    columns = "participant=UID,condition=Method,ai_correct=AIRight,decision=Choice,confidence=Conf,response_ms=RT"
    assert main(["study", "analyze", "--trials", str(path), "--columns", columns, "--json", "--n-boot", "300"]) == 0
    out = json.loads(capsys.readouterr().out)
    plain = analyze_table(_write(tmp_path / "t.csv", _table()), n_boot=300)
    assert out["conditions"]["none"]["accuracy"] == plain["conditions"]["none"]["accuracy"]
    assert out["source"]["columns"]["participant"] == "UID"
    assert parse_columns(" participant = UID ,, condition=M ") == {"participant": "UID", "condition": "M"}
    with pytest.raises(ParameterError, match="--columns maps 'subject', which is not one of the table's fields"):
        parse_columns("subject=UID")
    with pytest.raises(ParameterError, match="--columns takes comma-separated NAME=COLUMN pairs"):
        parse_columns("participant")


# a required column that is missing is named (with the name --columns mapped it from), with the table's columns
def test_missing_column(tmp_path):
    path = _write(tmp_path / "t.csv", _table(), header=["participant", "condition", "ai_correct"])
    with pytest.raises(DataError, match=r"t.csv has no column 'decision', which the analysis needs. Its columns are "
                                        r"\['participant', 'condition', 'ai_correct'\]; map other names with --columns, "
                                        r"e.g. --columns decision=YOUR_COLUMN."):
        read_trials(path)
    with pytest.raises(DataError, match=r"has no column 'Choice' \(mapped from 'decision' with --columns\)"):
        read_trials(path, columns={"decision": "Choice"})
    with pytest.raises(DataError, match=r"has no column 'true_label', no column 'ai_label', no column 'initial_label', "
                                        "no column 'final_label', which a two-stage analysis needs"):
        read_trials(path, two_stage=True)
    # a column named twice: refused (a row read by name kept the last one, and the analysis was silently wrong)
    twice = tmp_path / "twice.csv"
    twice.write_text("participant,condition,ai_correct,decision,decision\nA,none,1,accept,reject\n")
    with pytest.raises(DataError, match=r"twice.csv: the header names the columns \['decision'\] more than once"):
        read_trials(twice)


# an unknown decision, a confidence out of range, a bad ai_correct or time: the row is named by its line in the file
@pytest.mark.parametrize("field, value, message", [
    ("decision", "maybe", r"t.csv, line 5: column 'decision' must be 'accept' or 'reject'; got 'maybe'."),
    ("confidence", "7", r"t.csv, line 5: column 'confidence' must be an integer from 1 to 4; got '7' \(out of range\)."),
    ("confidence", "high", r"t.csv, line 5: column 'confidence' must be an integer from 1 to 4; got 'high'."),
    ("ai_correct", "2", r"t.csv, line 5: column 'ai_correct' must be 0/1, true/false or yes/no; got '2'."),
    ("response_ms", "-3", r"t.csv, line 5: column 'response_ms' must be a number of milliseconds >= 0; got '-3'."),
    ("participant", "", r"t.csv, line 5: column 'participant' is empty; every trial needs it."),
])
def test_bad_value_names_the_line(tmp_path, field, value, message):
    rows = _table()
    rows[3][field] = value  # header is line 1: the fourth row is line 5
    with pytest.raises(DataError, match=message):
        read_trials(_write(tmp_path / "t.csv", rows))


# in JSON lines and Parquet too, the row is named (lines; Parquet has rows, not lines)
def test_bad_value_jsonl_and_parquet(tmp_path):
    import pandas as pd

    rows = _table()
    rows[2]["decision"] = "ok"
    (tmp_path / "t.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # a blank first line
    with pytest.raises(DataError, match=r"t.jsonl, line 4: column 'decision' must be 'accept' or 'reject'; got 'ok'."):
        read_trials(tmp_path / "t.jsonl")
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet, row 3: column 'decision' must be 'accept' or 'reject'"):
        read_trials(tmp_path / "t.parquet")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + '\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: each line must be a JSON object, not list."):
        read_trials(tmp_path / "bad.jsonl")


# a participant in two conditions of a between-subjects design is refused, naming both lines; within, fine
def test_participant_in_two_conditions(tmp_path):
    rows = _table()
    rows[12]["participant"] = "P0"  # P1's row, in 'similar'; P0 is in 'none'
    path = _write(tmp_path / "t.csv", rows)
    with pytest.raises(DataError, match=r"participant 'P0' appears in two conditions, 'none' \(line 2\) and 'similar' "
                                        r"\(line 14\), of a between-subjects design. If each participant saw several "
                                        "conditions, pass --design within"):
        read_trials(path)
    assert read_trials(path, design="within").conditions == ["none", "similar"]
    rows[12]["participant"], rows[13]["item"] = "P1", rows[11]["item"]
    with pytest.raises(DataError, match=r"participant 'P1' answered item 'img1' under 'similar' twice \(line 13 and "
                                        r"line 15\)"):
        read_trials(_write(tmp_path / "u.csv", rows))


# an empty table, a header alone, an unknown suffix, a missing file: each a clear error
def test_empty_and_unreadable(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv is empty: it has no header line and no trials."):
        read_trials(tmp_path / "empty.csv")
    _write(tmp_path / "header.csv", [])
    with pytest.raises(DataError, match="header.csv holds no trials: it has a header but no rows."):
        read_trials(tmp_path / "header.csv")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl is empty: it holds no JSON lines."):
        read_trials(tmp_path / "blank.jsonl")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ParameterError, match=r"Cannot tell the format of .*t.xlsx from its suffix '.xlsx': name it .csv"):
        read_trials(tmp_path / "t.xlsx")
    with pytest.raises(DataNotFoundError, match="No trial table at"):
        read_trials(tmp_path / "nope.csv")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="Cannot read .*bad.parquet as Parquet"):
        read_trials(tmp_path / "bad.parquet")


# Parquet without pandas/pyarrow says what to install
def test_parquet_needs_pandas(tmp_path, monkeypatch):
    import builtins

    from actclust.exceptions import MissingDependencyError

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError("no pandas"))
                        if name == "pandas" else real(name, *a, **k))
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingDependencyError, match=r"Reading Parquet .* needs pandas and pyarrow .*: pip install "
                                                     "pandas pyarrow, or save the table as CSV."):
        read_trials(tmp_path / "t.parquet")


# conditions without wrong-AI trials: the metrics that need them are null, with the reason, through the CLI too
def test_no_wrong_items(tmp_path, capsys):
    rows = [r for r in _table() if r["ai_correct"] or r["condition"] == "none"]
    path = _write(tmp_path / "t.csv", rows)
    assert main(["study", "analyze", "--trials", str(path), "--json", "--n-boot", "200"]) == 0
    similar = json.loads(capsys.readouterr().out)["conditions"]["similar"]
    assert similar["over_reliance"] is None
    assert similar["null_reasons"]["over_reliance"] == "no trial where the AI was wrong"


# two-stage tables: final answers, derived decisions and AI correctness, complementarity; a contradiction is refused
def test_two_stage_table(tmp_path):
    rng, rows = np.random.default_rng(2), []
    for p in range(12):
        for i in range(10):
            true, ai = "cat", "cat" if i % 2 == 0 else "dog"
            own = "cat" if rng.random() < 0.6 else "fox"
            final = ai if rng.random() < 0.7 else own
            rows.append({"participant": p, "condition": "similar", "true_label": true, "ai_label": ai,
                         "initial_label": own, "final_label": final})
    header = ["participant", "condition", "true_label", "ai_label", "initial_label", "final_label"]
    table = read_trials(_write(tmp_path / "t.csv", rows, header=header), two_stage=True)
    t = table.trials[1]
    assert t["ai_right"] is False and t["accept"] == (rows[1]["final_label"] == "dog")
    assert t["final_right"] == (rows[1]["final_label"] == "cat") and t["own_right"] == (rows[1]["initial_label"] == "cat")
    out = analyze_table(tmp_path / "t.csv", two_stage=True, n_boot=200)
    c = out["complementarity"]["similar"]
    assert c["team"]["estimate"] == pytest.approx(np.mean([r["final_label"] == "cat" for r in rows]))
    assert c["ai"]["estimate"] == 0.5 and c["human"]["estimate"] == pytest.approx(
        np.mean([r["initial_label"] == "cat" for r in rows]))
    rows[0]["ai_correct"] = "0"  # the AI's label is the true one
    with pytest.raises(DataError, match=r"t2.csv, line 2: column 'ai_correct' says the AI was wrong, but its label 'cat' "
                                        "is the true label 'cat'."):
        read_trials(_write(tmp_path / "t2.csv", rows, header=header + ["ai_correct"]), two_stage=True)
    # a decision that contradicts the final answer: both an accept and a wrong final answer were counted (accuracy
    # 1.0 beside final accuracy 0.0: an outside check); the server refuses such an answer, and so does the table
    bad = [{"participant": "p1", "condition": "none", "true_label": "1", "ai_label": "1", "initial_label": "2",
            "final_label": "2", "decision": "accept"}]
    with pytest.raises(DataError, match=r"t3.csv, line 2: column 'decision' says accept, but column 'final_label' '2' "
                                        r"differs from the AI's label '1': accepting makes the AI's label the final "
                                        "answer, rejecting keeps another."):
        read_trials(_write(tmp_path / "t3.csv", bad, header=list(bad[0])), two_stage=True)
    bad[0].update(final_label="1", decision="reject")
    with pytest.raises(DataError, match=r"says reject, but column 'final_label' '1' is the AI's label '1'"):
        read_trials(_write(tmp_path / "t4.csv", bad, header=list(bad[0])), two_stage=True)
    bad[0].update(final_label="1", decision="accept")
    assert read_trials(_write(tmp_path / "t5.csv", bad, header=list(bad[0])), two_stage=True).trials[0]["accept"]
    # a reject without a final label where the first answer was the AI's: the server stores it (the final answer is the
    # first), and the folder's analysis counts a reject; the table was refused, naming a final_label it did not have
    # (an outside check)
    same = [{"participant": "p1", "condition": "none", "true_label": "1", "ai_label": "1", "initial_label": "1",
             "decision": "reject"}]
    t = read_trials(_write(tmp_path / "t6.csv", same, header=list(same[0])), two_stage=True).trials[0]
    assert t["accept"] is False and t["final_right"] is True and t["own_right"] is True


# the CLI: a study folder or --trials (one of them), table-only options refused for a folder, errors exit 2
def test_cli_choices(tmp_path, capsys):
    path = _write(tmp_path / "t.csv", _table())
    assert main(["study", "analyze"]) == 2
    assert "Give a study folder or --trials TABLE (one of them)" in capsys.readouterr().err
    assert main(["study", "analyze", str(tmp_path), "--trials", str(path)]) == 2
    capsys.readouterr()
    assert main(["study", "analyze", str(tmp_path), "--design", "within"]) == 2
    assert "--design describe a trial table (--trials)" in capsys.readouterr().err
    assert main(["study", "analyze", "--trials", str(path), "--reference", "other"]) == 2
    assert "The reference condition must be one of the conditions ['none', 'similar']" in capsys.readouterr().err
    assert main(["study", "analyze", "--trials", str(path), "--n-boot", "200", "--reference", "similar"]) == 0
    assert capsys.readouterr().out.startswith("condition")
    assert main(["study", "analyze", "--trials", str(path), "--html", str(path), "--overwrite"]) == 2
    assert "Refusing to write the page to" in capsys.readouterr().err and path.read_text().startswith("participant")
