"""The study as an ASGI app (FastAPI): participant pages, the JSON API they use, admin pages.

Reads only the study folder; imports neither torch nor the model. See ``make_app``.

API (the participant's pages use it too)::

    POST /api/sessions                       {"external_id": str?} -> {"session_id", "token", "n_trials"}
    GET  /api/sessions/{id}/next             Bearer token -> a trial, or {"done": true, "completion_code"}
    POST /api/sessions/{id}/responses        Bearer token, {"trial_id", "decision", "confidence", "label"?}

New sessions are limited per client address (429 beyond ``sessions_per_address`` in
``address_window`` seconds) and in all (403 once ``max_participants`` places are held). The
address is the connection's peer, or, behind a reverse proxy that uvicorn trusts
(``forwarded_allow_ips``), the one the proxy forwards. The admin token is never accepted in an
address (addresses end up in access logs): the admin logs in with a form (POST) that sets an
HttpOnly cookie, or sends ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import functools
import io
import json
import math
import secrets
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Literal, Optional

from fastapi import FastAPI, Header, Request
from jinja2 import Environment, FileSystemLoader
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from ..views.render import MAX_FEATURES
from .db import RequestRefused, Store, Writer
from .folder import Study, load_study
from .limits import ABANDON_AFTER_S, ADDRESS_WINDOW_S, SESSIONS_PER_ADDRESS

__all__ = ["make_app", "MAX_BODY_BYTES", "RateLimit"]

MAX_BODY_BYTES = 16 * 1024  # a response is ~100 bytes; anything much larger is not one
_HERE = Path(__file__).parent


class NewSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    external_id: Optional[str] = Field(default=None, max_length=200)


_ID_MAX = 2 ** 63 - 1  # SQLite's largest integer: a larger id is no trial's, and SQLite cannot even look it up


class Answer(BaseModel):
    # integers as JSON numbers only: not true (a bool), not "3"
    model_config = ConfigDict(extra="forbid")
    trial_id: StrictInt = Field(ge=0, le=_ID_MAX)
    decision: Optional[Literal["accept", "reject"]] = None
    confidence: StrictInt = Field(ge=1, le=4)
    label: Optional[StrictInt] = Field(default=None, ge=0, le=_ID_MAX)


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, whether or not it declares its length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:  # read the whole (small) body first, so that no handler sees a part of a large one
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        return await self.app(scope, _replay(chunks, receive), send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"Request body larger than {self.limit} bytes."}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _Headers:
    """ASGI middleware: security and caching headers on every response, and the app's own time (Server-Timing).

    Plain ASGI rather than ``@app.middleware("http")``, whose BaseHTTPMiddleware runs each request
    in an extra task with memory streams: with it the server spent a third more CPU on the load
    benchmark's 8,200 requests (16.5 s against 10.6 s).
    """

    HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"),
               (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                            b"style-src 'self' 'unsafe-inline'; script-src 'self'")]
    NAMES = {name for name, _ in HEADERS} | {b"server-timing"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def stamped(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.NAMES]
                took = f"app;dur={(time.perf_counter() - start) * 1000:.2f}".encode()
                message = {**message, "headers": kept + self.HEADERS + [(b"server-timing", took)]}
            await send(message)
        await self.app(scope, receive, stamped)


def _replay(messages: list, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive


def _cell(value):
    """A CSV cell that a spreadsheet will not run: text starting like a formula gets a leading quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class RateLimit:
    """At most ``limit`` events per key in any ``window`` seconds (a sliding window kept in memory).

    Keys are client addresses, kept only as long as they have events in the window, and never
    written anywhere. ``limit=0`` turns the limit off.
    """

    def __init__(self, limit: int, window: float, clock=time.monotonic, max_keys: int = 100_000):
        self.limit, self.window, self.clock, self.max_keys = limit, float(window), clock, max_keys
        self._events: dict = {}
        self._said = None  # when the server last said it refused sessions (at most once a window)

    def check(self, key: str) -> None:
        """Count one event for ``key``, or raise :class:`RequestRefused` (429, with Retry-After) when over."""
        if not self.limit:
            return
        now = self.clock()
        if len(self._events) >= self.max_keys:  # a spray of addresses: forget the ones with nothing recent
            for k in [k for k, q in self._events.items() if q[-1] <= now - self.window]:
                del self._events[k]
        seen = self._events.setdefault(key, collections.deque())
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(seen) >= self.limit:
            wait = max(1, math.ceil(seen[0] + self.window - now))
            if self._said is None or now - self._said >= self.window:  # else a researcher heard only from participants
                self._said = now
                print(f"actclust study serve: refusing new sessions from an address that started {self.limit} in "
                      f"{self.window / 60:g} minutes (HTTP 429); a lab or classroom behind one address needs "
                      "--sessions-per-address N (0: no limit)", file=sys.stderr, flush=True)
            raise RequestRefused(429, f"Too many new sessions from your address ({self.limit} in "
                                      f"{self.window / 60:g} minutes); try again in {wait} seconds.",
                                 headers={"Retry-After": str(wait)})
        seen.append(now)


def _bearer(authorization: Optional[str]) -> Optional[str]:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def make_app(study, admin_token: str, *, max_body: int = MAX_BODY_BYTES, max_participants: Optional[int] = None,
             abandon_after: float = ABANDON_AFTER_S, sessions_per_address: int = SESSIONS_PER_ADDRESS,
             address_window: float = ADDRESS_WINDOW_S, clock=time.time) -> FastAPI:
    """The study app for a study folder (path or :class:`~actclust.study.folder.Study`).

    ``admin_token`` guards every ``/admin`` page and export: log in on ``/admin`` (a form that
    sets a cookie), or send it as a Bearer header; never in the address. ``max_participants``,
    ``abandon_after``: see :class:`~actclust.study.db.Store`; ``sessions_per_address`` new
    sessions per client address in any ``address_window`` seconds (0: no limit).
    """
    study = study if isinstance(study, Study) else load_study(study)
    store = Store(study, max_participants=max_participants, abandon_after=abandon_after, clock=clock)
    writer = Writer(store)
    limit = RateLimit(sessions_per_address, address_window)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        writer.close()  # the answers being written are committed before the server exits

    app = FastAPI(title="actclust study", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=max_body)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    # autoescape every template: Starlette's default escapes only *.html, and ours end in .j2
    pages = Jinja2Templates(env=Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True))
    app.state.store, app.state.study = store, study
    choices = [{"class": c, "name": n} for c, n in enumerate(study.class_names)]
    explanation = functools.lru_cache(maxsize=None)(study.explanation)  # composed once per item and condition

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        # where each error is and why, without the value it was given: NaN or Infinity (which JSON bodies may
        # hold) cannot be written back as JSON, and FastAPI's own answer then fails with a 500
        return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                                         "type": str(e.get("type", ""))} for e in exc.errors()]}, status_code=422)

    @app.exception_handler(RequestRefused)
    async def refused(request, exc: RequestRefused):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers={**headers, **(exc.headers or {})})

    app.add_middleware(_Headers)  # added last: the outermost, so its time covers the whole app

    # ---------------------------------------------------------------- participant pages
    @app.get("/", response_class=HTMLResponse)
    def consent(request: Request):
        return pages.TemplateResponse(request, "consent.html.j2", {"study": study})

    @app.get("/study", response_class=HTMLResponse)
    def trials_page(request: Request):
        return pages.TemplateResponse(request, "study.html.j2", {"study": study})

    # ---------------------------------------------------------------- JSON API
    # Reads (well under a millisecond) run on the event loop; writes, which wait for an fsync, in
    # one writer thread that commits every write waiting together (group commit), so that a slow
    # disk never stalls the loop and a burst of arrivals shares its fsyncs. Sync handlers in
    # Starlette's pool of 40 threads fought the loop for the GIL: p50 ~0.4 s for 100 sessions.
    async def write(fn, *args):
        return await asyncio.wrap_future(writer.submit(fn, *args))

    @app.post("/api/sessions")
    async def new_session(request: Request, body: Optional[NewSession] = None):
        limit.check(request.client.host if request.client else "unknown")
        return await write(store.create_session_in, None if body is None else body.external_id, clock())

    @app.get("/api/sessions/{session_id}/next")
    async def next_trial(session_id: str, authorization: Optional[str] = Header(default=None)):
        session = store.authorise(session_id, _bearer(authorization))
        pending = store.next_trial(session)
        if pending is None:
            return {"done": True, "completion_code": session["completion_code"]}
        trial, stage, done, shown = pending
        if not shown:  # its first display: the response time runs from now (committed before the answer is)
            writer.submit(store.mark_shown_in, trial["id"], stage, clock())
        item = study.item(trial["item_id"])
        shows_advice = stage != "initial"
        own = store.own_answer(trial["id"]) if stage != "initial" and study.two_stage else None
        # A JSONResponse skips FastAPI's recursive jsonable_encoder: the explanation is plain JSON already
        return JSONResponse({
            "trial_id": trial["id"], "stage": stage, "position": done, "n_trials": len(study.items) * len(store.stages),
            # tables in the item's feature order; the first features_shown rows shown, the others folded (study.js)
            "item": {"id": item["id"], "input": study.shown_input(item["id"]), "features_shown": MAX_FEATURES},
            "choices": choices,
            "prediction": {"class": item["prediction"], "name": study.class_names[item["prediction"]],
                           "confidence": item["confidence"]} if shows_advice else None,
            "explanation": explanation(item["id"], trial["condition"]) if shows_advice else None,
            # two stages: the participant's own first answer, which a Reject keeps
            "own": None if own is None else {"class": own, "name": study.class_names[own]},
        })

    @app.post("/api/sessions/{session_id}/responses")
    async def respond(session_id: str, body: Answer, authorization: Optional[str] = Header(default=None)):
        now = clock()  # on arrival: the time a write waits in the queue is not the participant's
        session = store.authorise(session_id, _bearer(authorization))
        return await write(store.record_in, session["number"], body.trial_id, body.decision, body.confidence,
                           body.label, now)

    @app.get("/api/health")
    async def health():
        return {"ok": True}

    # ---------------------------------------------------------------- admin
    def is_admin(given: Optional[str]) -> bool:
        return bool(given) and secrets.compare_digest(given.encode(), admin_token.encode())

    def admin(request: Request, authorization: Optional[str]) -> None:
        if "token" in request.query_params:
            raise RequestRefused(401, "The admin token is not accepted in the address (addresses are written to "
                                      "access logs): log in on /admin, or send 'Authorization: Bearer <token>'.")
        if not (is_admin(_bearer(authorization)) or is_admin(request.cookies.get("admin_token"))):
            raise RequestRefused(401, "Admin pages need the admin token 'actclust study serve' printed: log in on "
                                      "/admin, or send 'Authorization: Bearer <token>'.")

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, authorization: Optional[str] = Header(default=None)):
        try:
            admin(request, authorization)
        except RequestRefused as e:
            return pages.TemplateResponse(request, "login.html.j2", {"message": str(e)}, status_code=401)
        return pages.TemplateResponse(request, "admin.html.j2", {
            "study": study, "progress": store.progress(), "places": store.places_held(clock()),
            "max_participants": max_participants})

    @app.post("/admin/login")
    async def login(request: Request):
        """The login form's POST: the token travels in the body, and comes back as an HttpOnly cookie."""
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        if not is_admin((form.get("token") or [""])[0]):
            return pages.TemplateResponse(request, "login.html.j2", {"message": "Wrong admin token."}, status_code=401)
        done = RedirectResponse("/admin", status_code=303)
        done.set_cookie("admin_token", admin_token, httponly=True, samesite="strict", path="/admin",
                        secure=request.url.scheme == "https")  # behind a TLS proxy: sent over HTTPS only
        return done

    @app.get("/admin/export.json")
    def export_json(request: Request, authorization: Optional[str] = Header(default=None)):
        admin(request, authorization)
        return {"study": {k: study.data.get(k) for k in ("design", "two_stage", "conditions", "class_names", "seed")},
                "responses": store.export()}

    @app.get("/admin/export.csv")
    def export_csv(request: Request, authorization: Optional[str] = Header(default=None)):
        admin(request, authorization)
        rows = store.export()
        out = io.StringIO()
        if rows:
            table = csv.DictWriter(out, fieldnames=list(rows[0]))
            table.writeheader()
            table.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        return PlainTextResponse(out.getvalue(), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="responses.csv"'})

    @app.get("/admin/analysis", response_class=HTMLResponse)
    def analysis(request: Request, authorization: Optional[str] = Header(default=None)):
        admin(request, authorization)
        from .analyze import analyze_rows, render_html

        return HTMLResponse(render_html(analyze_rows(study, store.export()), study))

    return app
