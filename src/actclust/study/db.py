"""The study's SQLite store: sessions, their planned trials, and responses.

WAL journal, ``synchronous=FULL``, and every write in its own ``BEGIN IMMEDIATE`` transaction:
a response is acknowledged only after its commit, so an acknowledged response survives the
server being killed. ``UNIQUE(trial_id, stage)`` makes a second row for one answer impossible;
answering again with the same content is acknowledged as a duplicate, with other content
refused (409).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Optional

from ..exceptions import ParameterError
from .design import assign_condition, participant_rng, plan_trials
from .folder import Study

__all__ = ["SCHEMA_VERSION", "Store", "RequestRefused", "stages"]

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    number INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL,
    condition TEXT NOT NULL, external_id TEXT, completion_code TEXT NOT NULL,
    created REAL NOT NULL, completed REAL);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY, session_number INTEGER NOT NULL REFERENCES sessions(number),
    position INTEGER NOT NULL, item_id INTEGER NOT NULL, condition TEXT NOT NULL,
    UNIQUE (session_number, position));
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY, trial_id INTEGER NOT NULL REFERENCES trials(id), stage TEXT NOT NULL,
    decision TEXT, confidence INTEGER NOT NULL, label INTEGER, created REAL NOT NULL,
    UNIQUE (trial_id, stage));
"""


class RequestRefused(ParameterError):
    """A participant's request the study refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def stages(two_stage: bool) -> tuple:
    """The answers one trial takes: the own answer then the final one, or a single decision."""
    return ("initial", "final") if two_stage else ("decision",)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """Sessions and responses of one study in ``study.db_path``; safe to share between threads."""

    def __init__(self, study: Study):
        self.study, self.path = study, study.db_path
        self._local, self._lock = threading.local(), threading.Lock()
        self.stages = stages(study.two_stage)
        self._conn().executescript(_SCHEMA)  # each statement commits by itself (IF NOT EXISTS)
        with self._write() as db:
            version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if version is None:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema_version", str(SCHEMA_VERSION)), ("study_schema", study.data["schema"]),
                    ("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))])
            elif int(version[0]) != SCHEMA_VERSION:
                raise ParameterError(f"{self.path} has response schema version {version[0]}; this actclust "
                                     f"reads version {SCHEMA_VERSION}. Use the actclust version that created it.")

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _write(self):
        """One transaction, taken with the write lock first so that reads inside it stay valid.

        Writers of this process queue on a lock rather than on SQLite's busy handler, which
        sleeps in steps of up to 100 ms and made the p95 latency under load exceed a second.
        """
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ participants
    def create_session(self, external_id: Optional[str] = None) -> dict:
        """A new participant: condition and trials planned, a secret token (only its hash is kept)."""
        study = self.study
        session_id, token = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        code = secrets.token_hex(4).upper()
        with self._write() as db:
            number = db.execute("SELECT COALESCE(MAX(number), -1) + 1 FROM sessions").fetchone()[0]
            rng = participant_rng(study.seed, number)
            if study.design == "between":
                filled = dict(db.execute("SELECT condition, COUNT(*) FROM sessions GROUP BY condition").fetchall())
                condition = assign_condition(study.conditions, filled, rng)
            else:
                condition = "within"
            plan = plan_trials(study.items, study.conditions, study.design, number, condition, rng)
            db.execute("INSERT INTO sessions (number, id, token_hash, condition, external_id, completion_code, created)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (number, session_id, _hash(token), condition, external_id, code, time.time()))
            db.executemany("INSERT INTO trials (session_number, position, item_id, condition) VALUES (?, ?, ?, ?)",
                           [(number, pos, item, cond) for pos, (item, cond) in enumerate(plan)])
        return {"session_id": session_id, "token": token, "n_trials": len(plan) * len(self.stages)}

    def authorise(self, session_id: str, token: Optional[str]) -> sqlite3.Row:
        """The session, if ``token`` is its token: 404 for an unknown session, 401 for a wrong token."""
        row = self._conn().execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise RequestRefused(404, f"No session {session_id!r} in this study; start one with POST /api/sessions.")
        if not token or not secrets.compare_digest(_hash(token), row["token_hash"]):
            raise RequestRefused(401, "Missing or wrong token: send the header 'Authorization: Bearer <token>' "
                                      "with the token POST /api/sessions returned.")
        return row

    def _pending(self, db, number: int):
        """The first trial (by position) with an answer still due, and that answer's stage; None when done."""
        row = db.execute(
            "SELECT t.*, (SELECT COUNT(*) FROM responses r WHERE r.trial_id = t.id) AS answered FROM trials t "
            "WHERE t.session_number = ? AND (SELECT COUNT(*) FROM responses r WHERE r.trial_id = t.id) < ? "
            "ORDER BY t.position LIMIT 1", (number, len(self.stages))).fetchone()
        return None if row is None else (row, self.stages[row["answered"]])

    def next_trial(self, session: sqlite3.Row):
        """``(trial row, stage, answers done so far)``, or None when the session is complete."""
        db = self._conn()
        pending = self._pending(db, session["number"])
        if pending is None:
            return None
        done = db.execute("SELECT COUNT(*) FROM responses r JOIN trials t ON r.trial_id = t.id "
                          "WHERE t.session_number = ?", (session["number"],)).fetchone()[0]
        return pending[0], pending[1], done

    def record(self, session: sqlite3.Row, trial_id: int, decision, confidence: int, label) -> dict:
        """Store one answer in its own transaction; see the module docstring for repeats."""
        stage = self.stages[0] if len(self.stages) == 1 else ("initial" if decision is None else "final")
        with self._write() as db:
            trial = db.execute("SELECT * FROM trials WHERE id = ?", (trial_id,)).fetchone()
            if trial is None or trial["session_number"] != session["number"]:
                raise RequestRefused(403, f"Trial {trial_id} is not one of this session's trials.")
            old = db.execute("SELECT decision, confidence, label FROM responses WHERE trial_id = ? AND stage = ?",
                             (trial_id, stage)).fetchone()
            if old is not None:
                if tuple(old) == (decision, confidence, label):
                    return {"stored": True, "duplicate": True, "stage": stage}
                raise RequestRefused(409, f"Trial {trial_id} ({stage}) was already answered differently; "
                                          "an answer cannot be changed.")
            pending = self._pending(db, session["number"])
            if pending is None or pending[0]["id"] != trial_id or pending[1] != stage:
                due = "none: the session is complete" if pending is None else \
                    f"trial {pending[0]['id']} ({pending[1]})"
                raise RequestRefused(409, f"Trial {trial_id} ({stage}) is not the answer due now ({due}); "
                                          "GET /api/sessions/{id}/next for it.")
            self._check(stage, decision, label)
            db.execute("INSERT INTO responses (trial_id, stage, decision, confidence, label, created) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (trial_id, stage, decision, confidence, label, time.time()))
            if self._pending(db, session["number"]) is None:
                db.execute("UPDATE sessions SET completed = ? WHERE number = ?", (time.time(), session["number"]))
        return {"stored": True, "duplicate": False, "stage": stage}

    def _check(self, stage: str, decision, label) -> None:
        n = len(self.study.class_names)
        if stage == "initial" and label is None:
            raise RequestRefused(422, "This is the first stage of a two-stage trial: send your own answer as "
                                      "'label' (a class index) and no 'decision'.")
        if stage != "initial" and decision is None:
            raise RequestRefused(422, "Send 'decision': 'accept' or 'reject'.")
        if label is not None and not 0 <= label < n:
            raise RequestRefused(422, f"'label' must be a class index in [0, {n - 1}]; got {label}.")

    # ------------------------------------------------------------------ admin
    def progress(self) -> list:
        """Per condition: participants started and completed, answers stored."""
        db = self._conn()
        rows = db.execute(
            "SELECT t.condition AS condition, COUNT(DISTINCT t.session_number) AS started, "
            "COUNT(DISTINCT CASE WHEN s.completed IS NOT NULL THEN s.number END) AS completed, COUNT(r.id) AS answers "
            "FROM trials t JOIN sessions s ON s.number = t.session_number "
            "LEFT JOIN responses r ON r.trial_id = t.id GROUP BY t.condition").fetchall()
        got = {r["condition"]: dict(r) for r in rows}
        return [got.get(c, {"condition": c, "started": 0, "completed": 0, "answers": 0}) for c in self.study.conditions]

    def export(self) -> list:
        """Every stored answer with what the analysis needs, one dict per row, in storage order."""
        items = {it["id"]: it for it in self.study.items}
        rows = self._conn().execute(
            "SELECT s.id AS session_id, s.number AS participant, s.external_id, s.condition AS assigned, "
            "s.completed IS NOT NULL AS completed, t.id AS trial_id, t.position, t.item_id, t.condition, "
            "r.stage, r.decision, r.confidence, r.label, r.created "
            "FROM responses r JOIN trials t ON r.trial_id = t.id JOIN sessions s ON s.number = t.session_number "
            "ORDER BY r.id").fetchall()
        out = []
        for r in rows:
            it = items[r["item_id"]]
            out.append({**dict(r), "completed": bool(r["completed"]), "attention_check": bool(it.get("attention")),
                        "true_label": it["label"], "ai_prediction": it["prediction"], "ai_right": it["ai_right"]})
        return out
