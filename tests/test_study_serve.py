"""Serving a study to a crowd: limits on new sessions, places freed by abandoned sessions, response times
measured on the server, a reverse proxy in front (forwarded headers, no secret in access logs), the response
file's schema versions and damage, and a study folder checked before anyone takes part."""

import json
import logging
import sqlite3
from concurrent.futures import Future

import httpx
import pytest

from actclust.cli.commands import main
from actclust.exceptions import InvalidSaveError
from actclust.study.analyze import analyze_study
from actclust.study.app import RateLimit
from actclust.study.db import RequestRefused, Store, read_responses
from actclust.study.folder import load_study

from conftest import XSS_CLASS, LiveStudyServer, make_study

ADMIN = {"Authorization": "Bearer admin-secret"}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def _client(folder, **options):
    from fastapi.testclient import TestClient

    from actclust.study.app import make_app

    return TestClient(make_app(folder, "admin-secret", **options))


def _session(client, **kw):
    r = client.post("/api/sessions", json={}, **kw)
    return r, ({"Authorization": f"Bearer {r.json()['token']}"} if r.status_code == 200 else None)


# a client address may start at most N sessions per window (429 with Retry-After); the window slides
def test_rate_limit_per_address(tmp_path, study_source, capsys):
    folder = make_study(tmp_path / "s", study_source)
    with _client(folder, sessions_per_address=3) as client:
        for _ in range(3):
            assert _session(client)[0].status_code == 200
        r = _session(client)[0]
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert r.json()["detail"].startswith("Too many new sessions from your address (3 in 60 minutes); try again in")
    clock = Clock(0.0)
    limit = RateLimit(2, 60, clock=clock)
    limit.check("a"), limit.check("a"), limit.check("b")
    with pytest.raises(RequestRefused, match=r"try again in 60 seconds") as refused:
        limit.check("a")
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "60"}
    clock.now = 60.5  # the first two left the window
    limit.check("a")
    RateLimit(0, 60).check("a")  # 0: no limit
    # the server says it refuses (once a window, no address): a researcher heard of 429s only from participants
    said = capsys.readouterr().err
    assert said.count("refusing new sessions from an address that started") == 2  # the client's, then this one's
    assert "--sessions-per-address N (0: no limit)" in said and "'a'" not in said and "127.0.0.1" not in said
    limit.check("a")  # 60.5: the second in this window
    for _ in range(2):  # refused twice: said once (a window after it was last said), not again within the window
        with pytest.raises(RequestRefused):
            limit.check("a")
    assert capsys.readouterr().err.count("refusing new sessions") == 1


# --max-participants: once N sessions hold a place, new ones get 403; a session idle for --abandon-after frees
# its place, and stops counting in the balance of conditions
def test_max_participants_and_abandoned_sessions(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source, conditions=["none", "similar"])
    clock = Clock()
    with _client(folder, max_participants=2, abandon_after=600, clock=clock) as client:
        (first, auth), _ = _session(client), _session(client)
        full = _session(client)[0]
        assert full.status_code == 403
        assert full.json()["detail"] == ("This study is full: it has the 2 participants it needs. Thank you for your "
                                         "interest.")
        assert "Places held now (completed, or active recently): 2 of 2" in client.get("/admin", headers=ADMIN).text
        clock.now += 300
        base = f"/api/sessions/{first.json()['session_id']}"
        t = client.get(base + "/next", headers=auth).json()
        assert client.post(base + "/responses", headers=auth,
                           json={"trial_id": t["trial_id"], "decision": "accept", "confidence": 1}).status_code == 200
        clock.now += 301  # the second session is idle for 601 s > 600: abandoned; the first answered 301 s ago
        assert _session(client)[0].status_code == 200
        assert _session(client)[0].status_code == 403


# a flood of sessions that never answer cannot skew the balance of conditions among those who do: once the
# flood is abandoned, the conditions fill by the sessions that hold a place
def test_flood_does_not_skew_balance(tmp_path, study_source):
    study = load_study(make_study(tmp_path / "s", study_source, conditions=["none", "similar"]))
    clock = Clock()
    store = Store(study, abandon_after=600, clock=clock)
    real = []
    for n in range(3):  # real participants, who answer
        s = store.create_session()
        real.append(s)
        session = store.authorise(s["session_id"], s["token"])
        store.record(session, store.next_trial(session)[0]["id"], "accept", 2, None)
    for _ in range(9):  # bots that never answer
        store.create_session()
    clock.now += 601  # the bots are abandoned; the real ones answer again
    for s in real:
        session = store.authorise(s["session_id"], s["token"])
        store.record(session, store.next_trial(session)[0]["id"], "accept", 2, None)
    conditions = [store.authorise(s["session_id"], s["token"])["condition"] for s in real]
    later = [store.create_session() for _ in range(5)]
    later = [store.authorise(s["session_id"], s["token"])["condition"] for s in later]
    counts = {c: (conditions + later).count(c) for c in ("none", "similar")}
    assert sorted(counts.values()) == [4, 4]  # 3 real + 5 later: balanced as if the bots never came


# response time is measured on the server, from the trial's first display to its answer; a reload shows the
# same trial without restarting the clock; in two-stage trials it runs from the first stage's display
@pytest.mark.parametrize("two_stage", [False, True])
def test_response_time_server_side(tmp_path, study_source, two_stage):
    folder = make_study(tmp_path / "s", study_source, conditions=["none"], two_stage=two_stage, items=4)
    clock = Clock(5000.0)
    with _client(folder, clock=clock) as client:
        s = client.post("/api/sessions").json()
        auth, base = {"Authorization": f"Bearer {s['token']}"}, f"/api/sessions/{s['session_id']}"
        for k in range(4):
            t = client.get(base + "/next", headers=auth).json()
            clock.now += 1.5
            assert client.get(base + "/next", headers=auth).json() == t  # a reload: the clock keeps running
            clock.now += 2.0 + k
            if two_stage:
                assert client.post(base + "/responses", headers=auth,
                                   json={"trial_id": t["trial_id"], "label": 0, "confidence": 2}).status_code == 200
                client.get(base + "/next", headers=auth)
                clock.now += 1.0
            assert client.post(base + "/responses", headers=auth, json={
                "trial_id": t["trial_id"], "decision": "accept", "confidence": 2}).status_code == 200
        rows = client.get("/admin/export.json", headers=ADMIN).json()["responses"]
    final = [r["response_ms"] for r in rows if r["stage"] != "initial"]
    assert final == ([1000.0] * 4 if two_stage else [3500.0, 4500.0, 5500.0, 6500.0])  # each stage from its display
    trial_ms = [4500, 5500, 6500, 7500] if two_stage else [3500, 4500, 5500, 6500]  # a trial: first display to answer
    out = analyze_study(folder, n_boot=200)["conditions"]["none"]["median_response_ms"]
    assert out == {"estimate": float((trial_ms[1] + trial_ms[2]) / 2), "ci": None,
                   "note": "from 1 participant: no interval (resampling one participant gives the same value every time)"}


V1_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (number INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL,
    condition TEXT NOT NULL, external_id TEXT, completion_code TEXT NOT NULL, created REAL NOT NULL, completed REAL);
CREATE TABLE trials (id INTEGER PRIMARY KEY, session_number INTEGER NOT NULL REFERENCES sessions(number),
    position INTEGER NOT NULL, item_id INTEGER NOT NULL, condition TEXT NOT NULL, UNIQUE (session_number, position));
CREATE TABLE responses (id INTEGER PRIMARY KEY, trial_id INTEGER NOT NULL REFERENCES trials(id), stage TEXT NOT NULL,
    decision TEXT, confidence INTEGER NOT NULL, label INTEGER, created REAL NOT NULL, UNIQUE (trial_id, stage));
INSERT INTO meta VALUES ('schema_version', '1'), ('study_schema', 'actclust.study/1'), ('created', '2024-01-01');
INSERT INTO sessions VALUES (0, 'old-session', 'x', 'none', NULL, 'CODE', 100.0, NULL);
INSERT INTO trials VALUES (1, 0, 0, 0, 'none'), (2, 0, 1, 1, 'none');
INSERT INTO responses VALUES (1, 1, 'decision', 'accept', 3, NULL, 110.0);
"""


# a study served by the previous actclust (responses schema 1): analysed as it is (no response times, said so),
# and upgraded in place when served again, its answers kept
def test_schema_1_still_opens(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source, conditions=["none"])
    db = sqlite3.connect(folder / "responses.sqlite")
    db.executescript(V1_TABLES)
    db.close()
    rows = read_responses(load_study(folder))
    assert len(rows) == 1 and rows[0]["response_ms"] is None and rows[0]["decision"] == "accept"
    out = analyze_study(folder, n_boot=200)
    assert out["overall"]["n_responses"] == 1 and out["conditions"]["none"]["median_response_ms"] is None
    assert "no response times: this study's answers were stored before actclust recorded" in out["notes"][-1]
    version = sqlite3.connect(folder / "responses.sqlite").execute("SELECT value FROM meta").fetchone()[0]
    assert version == "1"  # analysis writes nothing
    store = Store(load_study(folder))
    db = sqlite3.connect(folder / "responses.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    assert db.execute("SELECT last_active FROM sessions").fetchone()[0] == 110.0
    assert store.export()[0]["decision"] == "accept"
    s = store.create_session()
    session = store.authorise(s["session_id"], s["token"])
    store.mark_shown(store.next_trial(session)[0]["id"], "decision", now=store.clock() - 2)
    store.record(session, store.next_trial(session)[0]["id"], "reject", 1, None)
    assert 1999 < store.export()[-1]["response_ms"] < 3000


# issue 17 item 9: a damaged responses.sqlite is a clear error for serve and analyze (it was sqlite3's own
# DatabaseError); so are a newer schema and responses to items the study does not have
def test_damaged_responses(tmp_path, study_source, capsys):
    folder = make_study(tmp_path / "s", study_source)
    db_path = folder / "responses.sqlite"
    db_path.write_bytes(b"this is not a database" * 300)
    message = r"responses.sqlite is not a readable actclust responses database \(DatabaseError: file is not a database\)"
    with pytest.raises(InvalidSaveError, match=message):
        analyze_study(folder, n_boot=100)
    with pytest.raises(InvalidSaveError, match=message):
        Store(load_study(folder))
    assert main(["study", "analyze", str(folder)]) == 2 and "Restore it from a backup" in capsys.readouterr().err
    db_path.unlink()
    Store(load_study(folder))
    sqlite3.connect(db_path).execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'").connection.commit()
    with pytest.raises(InvalidSaveError, match="has response schema version 9; this actclust reads versions up to 2"):
        analyze_study(folder, n_boot=100)
    db_path.unlink()
    db = sqlite3.connect(db_path)
    db.executescript(V1_TABLES.replace("(2, 0, 1, 1, 'none')", "(2, 0, 1, 77, 'none')"))
    db.close()
    with pytest.raises(InvalidSaveError, match=r"holds trials of items \[77\] that .*study.json does not have"):
        Store(load_study(folder))
    db_path.unlink()
    db = sqlite3.connect(db_path)
    db.executescript("CREATE TABLE other (x);")
    db.close()
    with pytest.raises(InvalidSaveError, match=r"it has tables \['other'\] but no 'meta' table"):
        analyze_study(folder, n_boot=100)


def _edit(folder, change):
    data = json.loads((folder / "study.json").read_text())
    change(data)
    (folder / "study.json").write_text(json.dumps(data))


# issue 17 item 9: an edited study.json is refused when serve starts, naming what is wrong (the old server
# started and answered 500 to the participants it reached)
@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(conditions=[]), "'conditions' must be a non-empty list of names from"),
    (lambda d: d["items"][3].update(id=2 ** 63), r"item 3 \(id 9223372036854775808\) must have an integer 'id' in "
                                                 r"\[0, 2\*\*63 - 1\]"),
    (lambda d: d["items"][0].pop("views"), r"item 0 \(id 0\) has no 'views' \(what each condition shows\)"),
    (lambda d: d["items"][1]["views"].pop("similar"), r"item 1 \(id 1\) lacks the views \['similar'\] that its "
                                                      "conditions show"),
    (lambda d: d["items"][2].update(prediction=7), r"item 2 \(id 2\) has a 'prediction' that is not a class index"),
    (lambda d: d["items"][2]["views"]["similar"].append(10 ** 6), "has 'similar' samples that are not training samples"),
    (lambda d: d["items"].append(dict(d["items"][0])), r"item 12 \(id 0\) repeats the id of an earlier item"),
    (lambda d: d.update(design="mixed"), "'design' must be 'between' or 'within', not 'mixed'"),
    (lambda d: d.update(items=[]), "'items' must be a non-empty list"),
    # JSON's NaN passed the checks of numbers, then the API could not answer with it: 500s to participants
    (lambda d: d["items"][0].update(confidence=float("nan")), r"study.json: cannot be read as JSON \(NaN is not a "
                                                               r"number a study holds\)"),
])
def test_edited_study_refused_at_start(tmp_path, study_source, monkeypatch, capsys, change, message):
    import uvicorn

    folder = make_study(tmp_path / "s", study_source, conditions=["none", "similar"])
    _edit(folder, change)
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(app))
    assert main(["study", "serve", str(folder), "--admin-token", "t"]) == 2 and ran == []
    err = capsys.readouterr().err
    assert "study.json: " in err and "Create the study again (actclust study create)" in err
    with pytest.raises(InvalidSaveError, match=message):
        load_study(folder)


# a study's files are its own: a link named responses.sqlite (dangling, or to a database of the user's), or its
# write-ahead log, made serve create or change files wherever it pointed, outside the folder; a linked study.json
# was read from outside it (found by an outside security check)
@pytest.mark.parametrize("name", ["responses.sqlite", "responses.sqlite-wal", "study.json"])
def test_linked_study_files_refused(tmp_path, study_source, name):
    from actclust.study.app import make_app

    folder = make_study(tmp_path / "s", study_source, conditions=["none", "similar"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / name
    if name == "study.json":
        (folder / name).rename(target)
    (folder / name).symlink_to(target)
    with pytest.raises(InvalidSaveError, match=rf"s/{name} is not a regular file \(a link, or something else\)"):
        make_app(folder, "t")
    assert sorted(p.name for p in elsewhere.iterdir()) == ([name] if name == "study.json" else [])


# writes that arrive together are committed together; one refused write is rolled back alone
def test_group_commit(tmp_path, study_source):
    study = load_study(make_study(tmp_path / "s", study_source))
    store = Store(study)
    futures = [Future() for _ in range(3)]

    def refuse(db):
        db.execute("INSERT INTO meta VALUES ('half-done', 'x')")
        raise RequestRefused(409, "no")
    store.run_batch([(store.create_session_in, (None, None), futures[0]), (refuse, (), futures[1]),
                     (store.create_session_in, ("ext", None), futures[2])])
    assert futures[0].result()["n_trials"] == 12 and futures[2].result()["n_trials"] == 12
    with pytest.raises(RequestRefused, match="no"):
        futures[1].result()
    db = sqlite3.connect(study.db_path)
    assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 2
    assert db.execute("SELECT COUNT(*) FROM meta WHERE key = 'half-done'").fetchone()[0] == 0


# behind a TLS-terminating proxy on the same host: the forwarded address is the one limited, a forwarded
# https makes the admin cookie Secure, headers from a proxy that is not trusted are ignored, and the access
# log never holds the admin token
@pytest.mark.slow
def test_behind_reverse_proxy(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source)
    app = {"sessions_per_address": 2}
    served = LiveStudyServer(folder, "proxy-admin-token-0123456789", app=app, proxy_headers=True,
                             forwarded_allow_ips="127.0.0.1", access_log=True, log_level="info")
    logged = []  # uvicorn configured its loggers (no propagation): listen on its access logger itself
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("uvicorn.access").addHandler(handler)
    with served as server, httpx.Client(base_url=server.url) as http:
        def start(address):
            return http.post("/api/sessions", json={}, headers={"X-Forwarded-For": address}).status_code
        assert [start("203.0.113.5") for _ in range(3)] == [200, 200, 429]
        assert start("198.51.100.7") == 200  # another participant behind the same proxy
        r = http.post("/admin/login", data={"token": server.admin_token}, follow_redirects=False,
                      headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
        assert http.get("/admin/export.csv", headers={"Authorization": f"Bearer {server.admin_token}"}).status_code == 200
        assert http.get("/admin/export.csv", params={"token": server.admin_token}).status_code == 401
    logging.getLogger("uvicorn.access").removeHandler(handler)
    assert any("POST /admin/login" in line and "303" in line for line in logged)
    assert any("203.0.113.5" in line for line in logged)  # the access log shows the forwarded address
    assert not any("proxy-admin-token-0123456789" in line for line in logged if "token=" not in line)
    assert sum("proxy-admin-token-0123456789" in line for line in logged) == 1  # only the refused ?token= request
    with LiveStudyServer(folder, app=app, proxy_headers=True, forwarded_allow_ips="10.9.9.9") as server, \
            httpx.Client(base_url=server.url) as http:
        codes = [http.post("/api/sessions", json={}, headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
                 for i in range(3)]
    assert codes == [200, 200, 429]  # an untrusted peer's X-Forwarded-For is ignored: all count for 127.0.0.1


# two-stage trials: an answer of the other stage's form gets that stage's rule (not 'fetch the trial you answered'),
# and a final class beside the decision must agree with it (rejecting while naming the AI's class was stored)
def test_two_stage_answer_forms(tmp_path, study_source):
    folder = make_study(tmp_path / "s", study_source, conditions=["none"], two_stage=True, items=2)
    with _client(folder, clock=Clock(5000.0)) as client:
        s = client.post("/api/sessions").json()
        auth, base = {"Authorization": f"Bearer {s['token']}"}, f"/api/sessions/{s['session_id']}"
        t = client.get(base + "/next", headers=auth).json()
        r = client.post(base + "/responses", headers=auth,
                        json={"trial_id": t["trial_id"], "decision": "accept", "label": 1, "confidence": 2})
        assert r.status_code == 422 and "first stage of a two-stage trial: send your own answer as 'label'" in r.text
        assert client.post(base + "/responses", headers=auth,
                           json={"trial_id": t["trial_id"], "label": 0, "confidence": 2}).status_code == 200
        second = client.get(base + "/next", headers=auth).json()
        ai = second["prediction"]["class"]
        assert second["own"] == {"class": 0, "name": XSS_CLASS} and t["own"] is None  # the first answer, shown again
        r = client.post(base + "/responses", headers=auth,
                        json={"trial_id": t["trial_id"], "decision": "reject", "label": ai, "confidence": 2})
        assert r.status_code == 422 and f"'label' {ai} contradicts 'decision': 'reject'" in r.text
        other = (ai + 1) % 3
        assert client.post(base + "/responses", headers=auth, json={  # another final class: as documented
            "trial_id": t["trial_id"], "decision": "reject", "label": other, "confidence": 2}).status_code == 200
