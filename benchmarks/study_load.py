"""Load test of ``actclust study serve``: concurrent simulated participants, a ``kill -9`` mid-way.

    python benchmarks/study_load.py [--participants 100] [--think 1.0] [--kill-at 0.5]

Makes a 40-item study from the digits demo run (``actclust demo``, then ``actclust study create``;
cached in ``benchmarks/.cache/``), serves it with a real ``actclust study serve`` process on a
loopback port, and runs ``--participants`` simulated participants at once (asyncio + httpx),
arriving at random within the first ``--arrive`` seconds, each answering all 40 trials and
waiting a random think time (uniform in [0, 2 x --think] seconds) before each answer. When ``--kill-at`` of all answers have been acknowledged, the server gets SIGKILL
and is started again on the same port; participants retry what failed (the same request, with
jittered exponential back-off) and so resume where they were.

Reports: answers sent (POST attempts not refused at connect), acknowledged (distinct answers the server confirmed
with 200), stored (rows in the SQLite file afterwards), acknowledged but not stored, duplicate
rows, and p50/p95/max latency of the successful requests (POST session, GET next and POST
answer), with the load the machine was under (1-minute load average sampled every second, and
the CPU seconds the server and this client used). The bar: every acknowledged answer stored, 0
duplicates, p95 < 100 ms. Writes ``benchmarks/results/study_load.json`` (``--out``) and prints one
table.

Each simulated participant has its own HTTP client (connection), as each browser has its own.
An earlier version shared one httpx client among all 100: httpcore 1.0's pool hands every
waiting request the first idle connection, one wins and the others retry on the next free one
(encode/httpcore#822), so in a burst some requests waited 5 s *in the client* before being sent
while the server answered each in 1 ms; that, not the server, missed the bar with ``--arrive 0``.
The server runs with ``--sessions-per-address 0``: every simulated participant comes from
127.0.0.1, which the per-address limit would (rightly) stop after 20.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import ssl
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
CACHE, RESULTS = HERE / ".cache", HERE / "results"
ITEMS = 40
ADMIN = "benchmark-admin-token"


def make_study() -> Path:
    """The digits demo run and a 40-item study of it (18 wrong: the test split has 19 errors)."""
    run, study = CACHE / "study_demo_run", CACHE / "study_load"
    cli = [sys.executable, "-m", "actclust.cli"]
    if not (run / "manifest.json").exists():
        subprocess.run(cli + ["demo", "--out", str(run), "--quiet", "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    if study.exists():
        for f in study.iterdir():
            f.unlink()  # a fresh study (no responses) each run
    subprocess.run(cli + ["study", "create", str(run), "--data", "digits", "--out", str(study), "--items", str(ITEMS),
                          "--wrong-share", "0.45", "--conditions", "none,similar,concepts,full", "--quiet",
                          "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, study: Path, port: int):
        self.study, self.port, self.proc, self.log = study, port, None, CACHE / "study_load_server.log"

    async def start(self) -> float:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "actclust.cli", "study", "serve", str(self.study),
                                      "--port", str(self.port), "--admin-token", ADMIN, "--sessions-per-address", "0"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        async with httpx.AsyncClient() as c:
            while True:
                try:
                    if (await c.get(f"http://127.0.0.1:{self.port}/api/health")).status_code == 200:
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log}")
                await asyncio.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the running server process (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        self.cpu_before_kill = self.cpu_seconds()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Stats:
    def __init__(self):
        self.sent = 0  # POST attempts that reached the server (not refused)
        self.lost_acks = 0  # of which the connection died before the answer came back
        self.acked: dict = {}  # (session, trial, stage) -> decision
        self.duplicate_acks = 0  # a retried answer the server already had: acknowledged as a duplicate
        self.latency = {"next": [], "answer": [], "session": []}
        self.failures = 0  # requests that got no answer (server down): retried
        self.timeline: list = []  # (start, latency, kind) of every successful request
        self.server: list = []  # the server's own time for each (its Server-Timing header), ms


def server_ms(response) -> float:
    return float(response.headers.get("server-timing", "app;dur=nan").split("dur=")[1])


async def call(client, stats, kind, method, url, rng, **kw):
    """One request, retried with jittered back-off until the server answers; a 4xx/5xx is a bug here: raised."""
    delay = 0.05
    while True:
        t0 = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
        except httpx.TransportError:
            stats.failures += 1
            await asyncio.sleep(rng.uniform(0, delay))  # "full jitter": retries do not arrive in lockstep
            delay = min(delay * 2, 2.0)
            continue
        if r.status_code != 200:
            raise SystemExit(f"{method} {url} -> {r.status_code}: {r.text}")
        stats.latency[kind].append(time.perf_counter() - t0)
        stats.timeline.append((t0, time.perf_counter() - t0, kind))
        stats.server.append(server_ms(r))
        return r.json()


async def sample_load(samples: list) -> None:
    """The 1-minute load average, every second, until cancelled."""
    while True:
        samples.append(os.getloadavg()[0])
        await asyncio.sleep(1.0)


async def participant(client, stats, rng, think, arrive):
    await asyncio.sleep(rng.uniform(0, arrive))
    s = await call(client, stats, "session", "POST", "/api/sessions", json={}, rng=rng)
    base, auth = f"/api/sessions/{s['session_id']}", {"Authorization": f"Bearer {s['token']}"}
    while True:
        t = await call(client, stats, "next", "GET", base + "/next", headers=auth, rng=rng)
        if t.get("done"):
            return
        await asyncio.sleep(rng.uniform(0, 2 * think))
        body = {"trial_id": t["trial_id"], "decision": rng.choice(["accept", "reject"]), "confidence": rng.randint(1, 4)}
        delay = 0.05
        while True:  # the same answer until it is acknowledged: a lost acknowledgement must not duplicate it
            t0 = time.perf_counter()
            try:
                r = await client.post(base + "/responses", headers=auth, json=body)
            except httpx.ConnectError:  # refused: the server is down, nothing was sent
                stats.failures += 1
            except httpx.TransportError:  # sent, but the connection died before the acknowledgement
                stats.sent += 1
                stats.lost_acks += 1
                stats.failures += 1
            else:
                stats.sent += 1
                break
            await asyncio.sleep(rng.uniform(0, delay))
            delay = min(delay * 2, 2.0)
        stats.latency["answer"].append(time.perf_counter() - t0)
        stats.timeline.append((t0, time.perf_counter() - t0, "answer"))
        stats.server.append(server_ms(r))
        if r.status_code != 200:
            raise SystemExit(f"POST answer -> {r.status_code}: {r.text}")
        ack = r.json()
        stats.duplicate_acks += ack["duplicate"]
        stats.acked[(s["session_id"], t["trial_id"], ack["stage"])] = body["decision"]


async def main_async(args) -> dict:
    study = make_study()
    load_before = os.getloadavg()[0]
    port = free_port()
    server = Server(study, port)
    first_start = await server.start()
    stats = Stats()
    total = args.participants * ITEMS
    ctx = ssl.create_default_context()  # one for all clients: making one per client costs ~20 ms of CPU each
    clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, verify=ctx)
               for _ in range(args.participants)]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            await stack.enter_async_context(client)
        rng = random.Random(0)
        loads: list = []
        sampler = asyncio.create_task(sample_load(loads))
        own_cpu = time.process_time()
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(participant(client, stats, random.Random(rng.random()), args.think, args.arrive))
                 for client in clients]
        while len(stats.acked) < args.kill_at * total:
            await asyncio.sleep(0.01)
        acked_at_kill = len(stats.acked)
        server.kill()
        down = time.perf_counter()
        await asyncio.sleep(args.down)
        restart = await server.start()
        outage = time.perf_counter() - down
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        sampler.cancel()
        server_cpu = server.cpu_before_kill + server.cpu_seconds()
        client_cpu = time.process_time() - own_cpu
    server.stop()
    when = np.asarray([t for t, _, _ in stats.timeline]) - t0
    took = np.asarray([d for _, d, _ in stats.timeline]) * 1000
    slowest = [[stats.timeline[i][2], round(float(when[i]), 2), round(float(took[i]), 1), stats.server[i]]
               for i in np.argsort(-took)[:10]]  # kind, start (s), latency (ms), the app's own time (ms)
    windows = [{"from_s": a, "n": int(m.sum()), "p95_ms": round(float(np.percentile(took[m], 95)), 1)}
               for a in range(0, int(when.max()) + 1, 5) if (m := (when >= a) & (when < a + 5)).any()]
    db = sqlite3.connect(study / "responses.sqlite")
    rows = db.execute("SELECT s.id, r.trial_id, r.stage, r.decision FROM responses r JOIN trials t ON r.trial_id = t.id "
                      "JOIN sessions s ON s.number = t.session_number").fetchall()
    per_item = db.execute("SELECT COUNT(*) FROM (SELECT t.session_number, t.item_id, r.stage, COUNT(*) AS n FROM "
                          "responses r JOIN trials t ON r.trial_id = t.id GROUP BY 1, 2, 3 HAVING n > 1)").fetchone()[0]
    sessions = db.execute("SELECT COUNT(*), SUM(completed IS NOT NULL) FROM sessions").fetchone()
    stored = {(s, t, st): d for s, t, st, d in rows}
    lost = [k for k, d in stats.acked.items() if stored.get(k) != d]
    lat = {k: np.asarray(v) * 1000 for k, v in stats.latency.items()}
    both = np.concatenate([lat["session"], lat["next"], lat["answer"]])
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "participants": args.participants, "trials_each": ITEMS, "think_s_mean": args.think,
        "arrivals_within_s": args.arrive,
        "kill_after_acknowledged": acked_at_kill, "server_start_s": round(first_start, 2),
        "outage_s": round(outage, 2), "restart_s": round(restart, 2), "wall_s": round(wall, 1),
        "answers_sent": stats.sent, "answers_acknowledged": len(stats.acked), "answers_stored": len(rows),
        "acknowledged_not_stored": len(lost), "duplicate_rows": len(rows) - len(stored) + per_item,
        "sent_without_acknowledgement": stats.lost_acks,
        "retries_acknowledged_as_duplicate": stats.duplicate_acks, "requests_failed_and_retried": stats.failures,
        "sessions": sessions[0], "sessions_completed": sessions[1],
        "load_average_1min": {"before": round(load_before, 2), "during_mean": round(float(np.mean(loads)), 2),
                              "during_max": round(float(np.max(loads)), 2), "after": round(os.getloadavg()[0], 2)},
        "cpu_seconds": {"server": round(server_cpu, 1), "client": round(client_cpu, 1), "wall": round(wall, 1)},
        "server_time_ms": {"p50": round(float(np.nanpercentile(stats.server, 50)), 2),
                           "p95": round(float(np.nanpercentile(stats.server, 95)), 2)},
        "kill_at_s": round(down - t0, 1), "p95_by_5s_window": windows, "slowest_10": slowest,
        "latency_ms": {k: {"n": int(len(v)), "p50": round(float(np.percentile(v, 50)), 1),
                           "p95": round(float(np.percentile(v, 95)), 1), "max": round(float(v.max()), 1)}
                       for k, v in {"all": both, "session": lat["session"], "next": lat["next"],
                                    "answer": lat["answer"]}.items() if len(v)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--participants", type=int, default=100)
    p.add_argument("--think", type=float, default=1.0, help="mean think time before each answer, seconds")
    p.add_argument("--arrive", type=float, default=5.0, help="participants arrive at random in the first ARRIVE s")
    p.add_argument("--kill-at", type=float, default=0.5, help="share of answers acknowledged before the kill")
    p.add_argument("--down", type=float, default=1.0, help="seconds the server stays down")
    p.add_argument("--out", default=str(RESULTS / "study_load.json"))
    args = p.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    r = asyncio.run(main_async(args))
    r["bar"] = {"every_acknowledged_stored": r["acknowledged_not_stored"] == 0, "no_duplicates": r["duplicate_rows"] == 0,
                "p95_below_100ms": r["latency_ms"]["all"]["p95"] < 100}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    print(f"{r['participants']} participants x {r['trials_each']} trials, think {r['think_s_mean']} s mean, "
          f"{r['machine']['cpus']} CPUs; SIGKILL after {r['kill_after_acknowledged']} acknowledged, "
          f"down {r['outage_s']} s (restart {r['restart_s']} s); {r['wall_s']} s in all")
    la, cpu = r["load_average_1min"], r["cpu_seconds"]
    print(f"  load average (1 min) before {la['before']}, during {la['during_mean']} (max {la['during_max']}), after "
          f"{la['after']} on {r['machine']['cpus']} CPUs; CPU seconds: server {cpu['server']}, client {cpu['client']} "
          f"in {cpu['wall']} s")
    print(f"  {'answers sent':<34} {r['answers_sent']:>7}")
    print(f"  {'answers acknowledged (distinct)':<34} {r['answers_acknowledged']:>7}")
    print(f"  {'answers stored':<34} {r['answers_stored']:>7}")
    print(f"  {'acknowledged but not stored':<34} {r['acknowledged_not_stored']:>7}")
    print(f"  {'duplicate rows':<34} {r['duplicate_rows']:>7}")
    print(f"  {'sent, connection lost before ack':<34} {r['sent_without_acknowledgement']:>7}")
    print(f"  {'retries acked as duplicates':<34} {r['retries_acknowledged_as_duplicate']:>7}")
    print(f"  {'requests failed (server down)':<34} {r['requests_failed_and_retried']:>7}")
    for k, v in r["latency_ms"].items():
        print(f"  {'latency ' + k + ' p50 / p95 / max ms':<34} {v['p50']:>7} {v['p95']:>7} {v['max']:>7}  (n={v['n']})")
    print(f"  {'server time p50 / p95 ms':<34} {r['server_time_ms']['p50']:>7} {r['server_time_ms']['p95']:>7}"
          "  (inside the app, from its Server-Timing header)")
    print("  bar: " + ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in r["bar"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
