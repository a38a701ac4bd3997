"""Trial tables from any platform (Prolific with Gorilla, Qualtrics, jsPsych, your own pages),
analysed as our own studies are.

A table is long: one row per answer. Columns (``--columns`` maps other names onto these)::

    participant   any id                   required
    condition     any name                 required
    ai_correct    0/1, true/false, yes/no  required (two-stage: or true_label and ai_label)
    decision      accept / reject          required (two-stage: or final_label)
    confidence    1-4                      optional
    item          any id                   optional (a participant answering an item twice is refused)
    response_ms   milliseconds >= 0        optional (median by condition, with its interval)
    true_label, ai_label, initial_label, final_label      two-stage studies (``two_stage=True``)

CSV (``.csv``), TSV (``.tsv``, ``.tab``) and JSON lines (``.jsonl``, ``.ndjson``) are read with
the standard library; Parquet (``.parquet``, ``.pq``) needs pandas with pyarrow. Nothing is
analysed silently wrong: a missing column, a value that is not what its column holds (named
by its line in the file), a participant in two conditions of a between-subjects design, an
empty table, each raise a :class:`~actclust.exceptions.DataError` that says what to change.

In a two-stage table, a trial's final answer is ``final_label``, else the AI's label when the
decision is ``accept`` and the participant's own when ``reject``; a missing ``decision`` is
``accept`` exactly when the final answer is the AI's label; a missing ``ai_correct`` is whether
the AI's label is the true one (given both, they must agree).
"""

from __future__ import annotations

import csv
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..exceptions import DataError, DataNotFoundError, MissingDependencyError, ParameterError

__all__ = ["FIELDS", "TrialTable", "parse_columns", "read_trials", "analyze_table"]

REQUIRED = ("participant", "condition", "ai_correct", "decision")
LABELS = ("true_label", "ai_label", "initial_label", "final_label")
FIELDS = REQUIRED + ("confidence", "item", "response_ms") + LABELS
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
            ".pq": "parquet"}
_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "1.0"}, {"0", "false", "f", "no", "n", "0.0"}


@dataclass
class TrialTable:
    """A table read by :func:`read_trials`: its trials (as :func:`~actclust.study.analyze.analyze_trials`
    takes them) and conditions in the order they first appear."""

    path: Path
    format: str
    n_rows: int
    conditions: list
    trials: list = field(repr=False)


def parse_columns(text: Optional[str]) -> dict:
    """``"participant=UID,condition=Method"`` -> ``{"participant": "UID", "condition": "Method"}``."""
    out: dict = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        ours, sep, theirs = (s.strip() for s in part.partition("="))
        if not sep or not ours or not theirs:
            raise ParameterError(f"--columns takes comma-separated NAME=COLUMN pairs (e.g. participant=UID,"
                                 f"condition=Method). Got {part!r} in {text!r}.")
        if ours not in FIELDS:
            raise ParameterError(f"--columns maps {ours!r}, which is not one of the table's fields "
                                 f"{', '.join(FIELDS)}. Got {text!r}.")
        out[ours] = theirs
    return out


def _format(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ParameterError(f"Cannot tell the format of {path} from its suffix {path.suffix!r}: name it .csv, .tsv, "
                             ".jsonl or .parquet.")
    return fmt


def _rows(path: Path, fmt: str):
    """``(columns, iterator of (where, row dict))``; ``where`` names the row as the user sees the file."""
    if fmt in ("csv", "tsv"):
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(handle, delimiter="," if fmt == "csv" else "\t")
            header = next(reader, None)
            records = [(f"line {reader.line_num}", values) for values in reader]
        if header is None:
            raise DataError(f"{path} is empty: it has no header line and no trials.")
        header = [h.strip() for h in header]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:  # a row read as a dict would keep the last of them, silently
            raise DataError(f"{path}: the header names the columns {repeated} more than once; each column once.")

        def rows():
            for where, values in records:
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise DataError(f"{path}, {where}: {len(values)} fields where the header has {len(header)}.")
                yield where, dict(zip(header, values))
        return header, rows()
    if fmt == "jsonl":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        if not numbered:
            raise DataError(f"{path} is empty: it holds no JSON lines.")

        def records():
            for n, line in numbered:
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}, line {n}: not JSON ({e}).") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {n}: each line must be a JSON object, not {type(row).__name__}.")
                yield f"line {n}", row
        first = next(records())[1]
        return list(first), records()
    try:
        import pandas as pd

        frame = pd.read_parquet(path)
    except ImportError as e:
        raise MissingDependencyError(f"Reading Parquet ({path}) needs pandas and pyarrow ({e}): pip install pandas "
                                     "pyarrow, or save the table as CSV.") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's errors: a damaged or foreign file
        raise DataError(f"Cannot read {path} as Parquet: {type(e).__name__}: {e}") from None
    return [str(c) for c in frame.columns], ((f"row {i + 1}", r)
                                             for i, r in enumerate(frame.to_dict(orient="records")))


class _Bad(Exception):
    """A value that is not what its column holds; re-raised as a DataError naming the row and column."""


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _text(v) -> str:
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = _text(v).lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise _Bad(f"must be 0/1, true/false or yes/no; got {v!r}")


def _decision(v) -> bool:
    s = str(v).strip().lower()
    if s not in ("accept", "reject"):
        raise _Bad(f"must be 'accept' or 'reject'; got {v!r}")
    return s == "accept"


def _confidence(v) -> int:
    try:
        c = float(v)
    except (TypeError, ValueError):
        raise _Bad(f"must be an integer from 1 to 4; got {v!r}") from None
    if not c.is_integer() or not 1 <= c <= 4:
        raise _Bad(f"must be an integer from 1 to 4; got {v!r} (out of range)")
    return int(c)


def _ms(v) -> float:
    try:
        ms = float(v)
    except (TypeError, ValueError):
        raise _Bad(f"must be a number of milliseconds; got {v!r}") from None
    if not math.isfinite(ms) or ms < 0:
        raise _Bad(f"must be a number of milliseconds >= 0; got {v!r}")
    return ms


def read_trials(path, *, columns: Optional[dict] = None, design: str = "between", two_stage: bool = False) -> TrialTable:
    """Read and check a trial table (see the module docstring); ``columns`` maps field -> the table's column."""
    path = Path(path)
    if design not in ("between", "within"):
        raise ParameterError(f"design must be one of ['between', 'within']. Got {design!r} instead.")
    if not path.is_file():
        raise DataNotFoundError(f"No trial table at {path}.")
    fmt = _format(path)
    names = {f: (columns or {}).get(f, f) for f in FIELDS}
    header, rows = _rows(path, fmt)

    def col(field_name):
        mapped = f" (mapped from {field_name!r} with --columns)" if names[field_name] != field_name else ""
        return f"column {names[field_name]!r}{mapped}"
    needed = ["participant", "condition"] + (["ai_correct", "decision"] if not two_stage else
                                             ["true_label", "ai_label", "initial_label"])
    absent = [f for f in needed if names[f] not in header]
    if two_stage and names["final_label"] not in header and names["decision"] not in header:
        absent.append("final_label")
    if absent:
        raise DataError(f"{path} has no {', no '.join(col(f) for f in absent)}, which "
                        f"{'a two-stage ' if two_stage else 'the '}analysis needs. Its columns are {header}; map "
                        f"other names with --columns, e.g. --columns {absent[0]}=YOUR_COLUMN.")
    trials, first_seen, conditions, answered, n_rows = [], {}, [], {}, 0
    for where, raw in rows:
        n_rows += 1

        def get(f, convert=None, required=False):
            v = raw.get(names[f])
            if _missing(v):
                if required:
                    raise DataError(f"{path}, {where}: {col(f)} is empty; every trial needs it.")
                return None
            if convert is None:
                return _text(v)
            try:
                return convert(v)
            except _Bad as e:
                raise DataError(f"{path}, {where}: {col(f)} {e}.") from None
        t = {"participant": get("participant", required=True), "condition": get("condition", required=True),
             "item": get("item"), "confidence": get("confidence", _confidence), "response_ms": get("response_ms", _ms),
             "own_right": None, "final_right": None}
        ai_right, accept = get("ai_correct", _bool, not two_stage), get("decision", _decision, not two_stage)
        if two_stage:
            true, ai, own = (get(f, required=True) for f in ("true_label", "ai_label", "initial_label"))
            final = get("final_label")
            if final is None and accept is None:
                raise DataError(f"{path}, {where}: neither {col('final_label')} nor {col('decision')} says the final "
                                "answer; a two-stage trial needs one.")
            given = final is not None
            if final is None:  # as the server records it: a reject keeps the first answer, also where it is the AI's
                final = ai if accept else own
            if accept is None:
                accept = final == ai
            elif given and accept != (final == ai):  # the server's rule; read as it was, both an accept and a wrong answer counted
                raise DataError(f"{path}, {where}: {col('decision')} says {'accept' if accept else 'reject'}, but "
                                f"{col('final_label')} {final!r} {'differs from' if accept else 'is'} the AI's label "
                                f"{ai!r}: accepting makes the AI's label the final answer, rejecting keeps another.")
            if ai_right is None:
                ai_right = ai == true
            elif ai_right != (ai == true):
                raise DataError(f"{path}, {where}: {col('ai_correct')} says the AI was {'right' if ai_right else 'wrong'}"
                                f", but its label {ai!r} {'differs from' if ai_right else 'is'} the true label "
                                f"{true!r}.")
            t["own_right"], t["final_right"] = own == true, final == true
        t["ai_right"], t["accept"] = ai_right, accept
        p, c = t["participant"], t["condition"]
        if c not in conditions:
            conditions.append(c)
        if design == "between":
            seen = first_seen.setdefault(p, (c, where))
            if seen[0] != c:
                raise DataError(f"{path}: participant {p!r} appears in two conditions, {seen[0]!r} ({seen[1]}) and "
                                f"{c!r} ({where}), of a between-subjects design. If each participant saw several "
                                "conditions, pass --design within; otherwise fix the table.")
        if t["item"] is not None:
            before = answered.setdefault((p, c, t["item"]), where)
            if before != where:
                raise DataError(f"{path}: participant {p!r} answered item {t['item']!r} under {c!r} twice ({before} "
                                f"and {where}); one row per answer, please.")
        trials.append(t)
    if not trials:
        raise DataError(f"{path} holds no trials: it has a header but no rows.")
    return TrialTable(path=path, format=fmt, n_rows=n_rows, conditions=conditions, trials=trials)


def analyze_table(path, *, columns: Optional[dict] = None, design: str = "between", two_stage: bool = False,
                  reference: Optional[str] = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """:func:`~actclust.study.analyze.analyze_trials` of a trial table; ``"source"`` says which."""
    from .analyze import analyze_trials

    table = read_trials(path, columns=columns, design=design, two_stage=two_stage)
    conditions = table.conditions
    first = reference if reference is not None else ("none" if "none" in conditions else None)
    if first in conditions:  # the reference first, the others as they appear
        conditions = [first] + [c for c in conditions if c != first]
    out = analyze_trials(table.trials, conditions, design=design, two_stage=two_stage, reference=reference,
                         n_boot=n_boot, seed=seed)
    out["source"] = {"trials": str(table.path), "format": table.format, "rows": table.n_rows,
                     "columns": dict(columns or {})}
    if not any(t["response_ms"] is not None for t in table.trials):
        out["notes"].append("no response times: the table has no response_ms column (or it is empty)")
    return out
