"""The study's SQLite store: sessions, their planned trials, when each was shown, and responses.

WAL journal, ``synchronous=FULL``, and every write acknowledged only after the commit that
holds it, so an acknowledged response survives the server being killed. The server's writes
go through one :class:`Writer` thread that commits all the writes waiting at that moment in
one transaction (group commit, each write in its own savepoint): under a burst of arrivals
one fsync serves many participants instead of one each. ``UNIQUE(trial_id, stage)`` makes a
second row for one answer impossible; answering again with the same content is acknowledged
as a duplicate, with other content refused (409).

Schema versions: 1 (sessions, trials, responses); 2 adds ``displays`` (when each trial stage
was first shown: response times are measured on the server, from that moment to the answer)
and ``sessions.last_active`` (a session idle for longer than ``abandon_after`` seconds no
longer holds a place nor counts in the balance of conditions). A version-1 file is upgraded
in place when a server opens it, and read as it is by the analysis (without response times).
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import sqlite3
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Optional

from ..exceptions import InvalidSaveError, ParameterError
from .design import assign_condition, participant_rng, plan_trials
from .folder import Study
from .limits import ABANDON_AFTER_S

__all__ = ["SCHEMA_VERSION", "Store", "Writer", "RequestRefused", "stages", "read_responses", "ABANDON_AFTER_S"]

SCHEMA_VERSION = 2
_DISPLAYS = ("CREATE TABLE IF NOT EXISTS displays (trial_id INTEGER NOT NULL REFERENCES trials(id), stage TEXT NOT NULL, "
             "shown REAL NOT NULL, PRIMARY KEY (trial_id, stage))")
_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sessions (number INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL, "
    "condition TEXT NOT NULL, external_id TEXT, completion_code TEXT NOT NULL, created REAL NOT NULL, completed REAL, "
    "last_active REAL)",
    "CREATE TABLE IF NOT EXISTS trials (id INTEGER PRIMARY KEY, session_number INTEGER NOT NULL "
    "REFERENCES sessions(number), position INTEGER NOT NULL, item_id INTEGER NOT NULL, condition TEXT NOT NULL, "
    "UNIQUE (session_number, position))",
    "CREATE TABLE IF NOT EXISTS responses (id INTEGER PRIMARY KEY, trial_id INTEGER NOT NULL REFERENCES trials(id), "
    "stage TEXT NOT NULL, decision TEXT, confidence INTEGER NOT NULL, label INTEGER, created REAL NOT NULL, "
    "UNIQUE (trial_id, stage))",
    _DISPLAYS,
)
_UPGRADES = {  # from version -> statements that bring a file to the next version
    1: ("ALTER TABLE sessions ADD COLUMN last_active REAL",
        "UPDATE sessions SET last_active = COALESCE((SELECT MAX(r.created) FROM responses r JOIN trials t "
        "ON r.trial_id = t.id WHERE t.session_number = sessions.number), created)",
        _DISPLAYS),
}



_FIRST_STAGE = "This is the first stage of a two-stage trial: send your own answer as 'label' (a class index) and no 'decision'."
_DECIDE = "Send 'decision': 'accept' or 'reject'."

class RequestRefused(ParameterError):
    """A participant's request the study refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def stages(two_stage: bool) -> tuple:
    """The answers one trial takes: the own answer then the final one, or a single decision."""
    return ("initial", "final") if two_stage else ("decision",)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _broken(path, e: Exception) -> InvalidSaveError:
    return InvalidSaveError(f"{path} is not a readable actclust responses database ({type(e).__name__}: {e}). Restore "
                            "it from a backup; to collect anew, move it out of the study folder (its answers are then "
                            "no longer part of the study).")


def _schema_version(db: sqlite3.Connection, path) -> Optional[int]:
    """The file's schema version (None for a new, empty file); refuses a damaged or foreign file."""
    try:
        verdict = db.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {verdict}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None
        if "meta" not in tables:
            raise sqlite3.DatabaseError(f"it has tables {sorted(tables)} but no 'meta' table")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
        missing = {"sessions", "trials", "responses"} - tables
        if version is None or missing:
            raise sqlite3.DatabaseError(f"schema version {row and row[0]!r}, missing tables {sorted(missing)}")
    except sqlite3.DatabaseError as e:
        raise _broken(path, e) from None
    if version > SCHEMA_VERSION:
        raise InvalidSaveError(f"{path} has response schema version {version}; this actclust reads versions up to "
                               f"{SCHEMA_VERSION}. Use the actclust version that created it.")
    return version


def _matches(db: sqlite3.Connection, study: Study) -> None:
    """Refuse responses that belong to another version of the study (items or conditions it lacks)."""
    items = {it["id"] for it in study.items}
    stray = [r[0] for r in db.execute("SELECT DISTINCT item_id FROM trials") if r[0] not in items]
    odd = [r[0] for r in db.execute("SELECT DISTINCT condition FROM trials") if r[0] not in study.conditions]
    if stray or odd:
        what = (f"items {sorted(stray)[:5]}" if stray else "") + (" and " if stray and odd else "") + \
               (f"conditions {sorted(odd)}" if odd else "")
        raise InvalidSaveError(f"{study.db_path} holds trials of {what} that {study.path / 'study.json'} does not "
                               "have: the responses belong to another version of the study. Put back the study.json "
                               "they were collected with.")


class Store:
    """Sessions and responses of one study in ``study.db_path``; safe to share between threads.

    ``max_participants`` caps the sessions that hold a place (completed, or active within
    ``abandon_after`` seconds); ``None``: no cap.
    """

    def __init__(self, study: Study, *, max_participants: Optional[int] = None,
                 abandon_after: float = ABANDON_AFTER_S, clock=time.time):
        self.study, self.path = study, study.db_path
        self.max_participants, self.abandon_after, self.clock = max_participants, float(abandon_after), clock
        self._local, self._lock = threading.local(), threading.Lock()
        self.stages = stages(study.two_stage)
        try:
            with self._write() as db:  # one process at a time creates or upgrades the file
                version = _schema_version(db, self.path)
                if version is None:
                    for statement in _TABLES:
                        db.execute(statement)
                    db.executemany("INSERT INTO meta VALUES (?, ?)", [
                        ("schema_version", str(SCHEMA_VERSION)), ("study_schema", study.data["schema"]),
                        ("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))])
                while version is not None and version < SCHEMA_VERSION:
                    for statement in _UPGRADES[version]:
                        db.execute(statement)
                    version += 1
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
                _matches(db, study)
        except sqlite3.DatabaseError as e:
            raise _broken(self.path, e) from None

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

    def run_batch(self, batch: list) -> None:
        """Run ``[(fn, args, future)]`` in one transaction, each ``fn(db, *args)`` in its own savepoint.

        A write that raises is rolled back alone and its future gets the error; the others'
        futures get their results only after the commit (so nothing is acknowledged that a
        crash could lose), or all get the error if the commit fails.
        """
        done = []
        try:
            with self._write() as db:
                for fn, args, future in batch:
                    if not future.set_running_or_notify_cancel():
                        continue
                    db.execute("SAVEPOINT op")
                    try:
                        value = fn(db, *args)
                    except Exception as e:  # noqa: BLE001 - handed to the caller through its future
                        db.execute("ROLLBACK TO op")
                        db.execute("RELEASE op")
                        done.append((future, False, e))
                    else:
                        db.execute("RELEASE op")
                        done.append((future, True, value))
        except BaseException as e:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for future, ok, value in done:
            future.set_result(value) if ok else future.set_exception(value)

    def _run(self, fn, *args):
        """One write on the calling thread, as a batch of one."""
        future = Future()
        self.run_batch([(fn, args, future)])
        return future.result()

    # ------------------------------------------------------------------ participants
    def create_session(self, external_id: Optional[str] = None, now: Optional[float] = None) -> dict:
        """A new participant: condition and trials planned, a secret token (only its hash is kept).

        Raises :class:`RequestRefused` (403) when ``max_participants`` places are held.
        """
        return self._run(self.create_session_in, external_id, now)

    _HOLDING = "(completed IS NOT NULL OR COALESCE(last_active, created) >= ?)"  # holds a place: the since time

    def create_session_in(self, db, external_id: Optional[str], now: Optional[float]) -> dict:
        """:meth:`create_session` inside the transaction ``db``."""
        study, now = self.study, self.clock() if now is None else now
        if self.max_participants is not None:
            held = db.execute(f"SELECT COUNT(*) FROM sessions WHERE {self._HOLDING}",
                              (now - self.abandon_after,)).fetchone()[0]
            if held >= self.max_participants:
                people = "participant" if self.max_participants == 1 else "participants"
                raise RequestRefused(403, f"This study is full: it has the {self.max_participants} {people} it "
                                          "needs. Thank you for your interest.")
        session_id, token = _session_id(), secrets.token_urlsafe(32)
        code = secrets.token_hex(4).upper()
        number = db.execute("SELECT COALESCE(MAX(number), -1) + 1 FROM sessions").fetchone()[0]
        rng = participant_rng(study.seed, number)
        if study.design == "between":
            filled = dict(db.execute(f"SELECT condition, COUNT(*) FROM sessions WHERE {self._HOLDING} "
                                     "GROUP BY condition", (now - self.abandon_after,)).fetchall())
            condition = assign_condition(study.conditions, filled, rng)
        else:
            condition = "within"
        plan = plan_trials(study.items, study.conditions, study.design, number, condition, rng)
        db.execute("INSERT INTO sessions (number, id, token_hash, condition, external_id, completion_code, created, "
                   "last_active) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (number, session_id, _hash(token), condition, external_id, code, now, now))
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
        """``(trial row, stage, answers done so far, shown before)``, or None when the session is complete."""
        db = self._conn()
        pending = self._pending(db, session["number"])
        if pending is None:
            return None
        done = db.execute("SELECT COUNT(*) FROM responses r JOIN trials t ON r.trial_id = t.id "
                          "WHERE t.session_number = ?", (session["number"],)).fetchone()[0]
        shown = db.execute("SELECT 1 FROM displays WHERE trial_id = ? AND stage = ?",
                           (pending[0]["id"], pending[1])).fetchone() is not None
        return pending[0], pending[1], done, shown

    def own_answer(self, trial_id: int) -> Optional[int]:
        """The class a participant gave as their own answer to a trial (the first of two stages), if any."""
        row = self._conn().execute("SELECT label FROM responses WHERE trial_id = ? AND stage = 'initial'",
                                   (trial_id,)).fetchone()
        return None if row is None else row["label"]

    def mark_shown_in(self, db, trial_id: int, stage: str, now: float) -> None:
        """Record when a trial stage was first shown (a later showing, e.g. after a reload, keeps the first)."""
        db.execute("INSERT OR IGNORE INTO displays (trial_id, stage, shown) VALUES (?, ?, ?)", (trial_id, stage, now))

    def mark_shown(self, trial_id: int, stage: str, now: Optional[float] = None) -> None:
        self._run(self.mark_shown_in, trial_id, stage, self.clock() if now is None else now)

    def record(self, session: sqlite3.Row, trial_id: int, decision, confidence: int, label,
               now: Optional[float] = None) -> dict:
        """Store one answer in its own transaction; see the module docstring for repeats."""
        return self._run(self.record_in, session["number"], trial_id, decision, confidence, label, now)

    def record_in(self, db, number: int, trial_id: int, decision, confidence: int, label,
                  now: Optional[float] = None) -> dict:
        """:meth:`record` inside the transaction ``db``."""
        now = self.clock() if now is None else now
        stage = self.stages[0] if len(self.stages) == 1 else ("initial" if decision is None else "final")
        trial = db.execute("SELECT * FROM trials WHERE id = ?", (trial_id,)).fetchone()
        if trial is None or trial["session_number"] != number:
            raise RequestRefused(403, f"Trial {trial_id} is not one of this session's trials.")
        old = db.execute("SELECT decision, confidence, label FROM responses WHERE trial_id = ? AND stage = ?",
                         (trial_id, stage)).fetchone()
        if old is not None:
            if tuple(old) == (decision, confidence, label):
                return {"stored": True, "duplicate": True, "stage": stage}
            raise RequestRefused(409, f"Trial {trial_id} ({stage}) was already answered differently; "
                                      "an answer cannot be changed.")
        pending = self._pending(db, number)
        if pending is not None and pending[0]["id"] == trial_id and pending[1] != stage:
            self._check(pending[1], decision if pending[1] != "initial" else None, label)  # the due stage's rule
            raise RequestRefused(422, _FIRST_STAGE if pending[1] == "initial" else _DECIDE)
        if pending is None or pending[0]["id"] != trial_id or pending[1] != stage:
            due = "none: the session is complete" if pending is None else f"trial {pending[0]['id']} ({pending[1]})"
            raise RequestRefused(409, f"Trial {trial_id} ({stage}) is not the answer due now ({due}); "
                                      "GET /api/sessions/{id}/next for it.")
        self._check(stage, decision, label)
        if stage == "final" and len(self.stages) > 1 and label is not None:
            # a final class beside the decision must agree with it: accepting makes the AI's class the final answer,
            # rejecting may name another class, never the AI's (the analysis would count both an accept and a reject)
            ai = self.study.item(trial["item_id"])["prediction"]
            if (decision == "accept") != (label == ai):
                raise RequestRefused(422, f"'label' {label} contradicts 'decision': {decision!r} (the AI's class is "
                                          f"{ai}): accepting makes it your final answer; rejecting keeps your own, or "
                                          "another class in 'label'.")
        db.execute("INSERT INTO responses (trial_id, stage, decision, confidence, label, created) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (trial_id, stage, decision, confidence, label, now))
        db.execute("UPDATE sessions SET last_active = ? WHERE number = ?", (now, number))
        if self._pending(db, number) is None:
            db.execute("UPDATE sessions SET completed = ? WHERE number = ?", (now, number))
        return {"stored": True, "duplicate": False, "stage": stage}

    def _check(self, stage: str, decision, label) -> None:
        n = len(self.study.class_names)
        if stage == "initial" and label is None:
            raise RequestRefused(422, _FIRST_STAGE)
        if stage != "initial" and decision is None:
            raise RequestRefused(422, _DECIDE)
        if label is not None and len(self.stages) == 1:  # stored and exported, read by nothing (an outside check)
            raise RequestRefused(422, "This study has one stage: send 'decision' ('accept' or 'reject') and "
                                      "'confidence', and no 'label'.")
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

    def places_held(self, now: Optional[float] = None) -> int:
        """Sessions holding a place now: completed, or active within ``abandon_after`` seconds."""
        now = self.clock() if now is None else now
        return self._conn().execute(f"SELECT COUNT(*) FROM sessions WHERE {self._HOLDING}",
                                    (now - self.abandon_after,)).fetchone()[0]

    def export(self) -> list:
        """Every stored answer with what the analysis needs, one dict per row, in storage order."""
        return _export(self._conn(), self.study)


def _export(db: sqlite3.Connection, study: Study) -> list:
    items = {it["id"]: it for it in study.items}
    has_displays = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'displays'").fetchone()
    shown = ("(SELECT d.shown FROM displays d WHERE d.trial_id = r.trial_id AND d.stage = r.stage)" if has_displays
             else "NULL")
    rows = db.execute(
        "SELECT s.id AS session_id, s.number AS participant, s.external_id, s.condition AS assigned, "
        "s.completed IS NOT NULL AS completed, t.id AS trial_id, t.position, t.item_id, t.condition, "
        f"r.stage, r.decision, r.confidence, r.label, r.created, {shown} AS shown "
        "FROM responses r JOIN trials t ON r.trial_id = t.id JOIN sessions s ON s.number = t.session_number "
        "ORDER BY r.id").fetchall()
    out = []
    for r in rows:
        it = items.get(r["item_id"])
        if it is None:
            raise InvalidSaveError(f"{study.db_path} holds answers to item {r['item_id']}, which {study.path}/study.json "
                                   "does not have: the responses belong to another version of the study.")
        row = {**dict(r), "completed": bool(r["completed"]), "attention_check": bool(it.get("attention")),
               "true_label": it["label"], "ai_prediction": it["prediction"], "ai_right": it["ai_right"]}
        row["response_ms"] = None if r["shown"] is None else round(max(0.0, r["created"] - r["shown"]) * 1000, 1)
        out.append(row)
    return out


def read_responses(study: Study) -> list:
    """The exported rows of a study's responses, read without writing anything (any schema version)."""
    path = study.db_path
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise _broken(path, e) from None
    try:
        db.row_factory = sqlite3.Row
        _schema_version(db, path)
        try:
            _matches(db, study)
            return _export(db, study)
        except sqlite3.DatabaseError as e:
            raise _broken(path, e) from None
    finally:
        db.close()


def count_taken_part(path) -> Optional[tuple]:
    """``(sessions, responses)`` in the database at ``path``, read only; ``None`` where it cannot be read."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("sessions", "responses"))
    except sqlite3.Error:
        return None
    finally:
        db.close()


class Writer:
    """One thread that runs a store's writes, committing the writes waiting at once together.

    At most ``max_batch`` per transaction: larger batches save fsyncs but make the first writes of
    a burst wait for the last (16: an fsync and ~10 ms of work per batch on a 2-core machine).

    ``submit(fn, *args)`` queues ``fn(db, *args)`` (one of the store's ``*_in`` methods) and
    returns a :class:`concurrent.futures.Future` resolved after the commit that holds it.
    """

    def __init__(self, store: Store, max_batch: int = 16):
        self.store, self.max_batch = store, max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="actclust-study-writer", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._queue.put((fn, args, future))
        return future

    def close(self) -> None:
        """Commit what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self.store.run_batch(batch)


def _session_id() -> str:
    """A new session id: 16 random bytes, URL-safe, never starting with ``-``: the CSV export quotes cells that start
    like a spreadsheet formula, which changed one id in 64 there (a join of the CSV with the JSON export, or the
    database, then lost those rows: an outside check)."""
    while True:
        sid = secrets.token_urlsafe(16)
        if not sid.startswith("-"):
            return sid
