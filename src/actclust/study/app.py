"""The study as an ASGI app (FastAPI): participant pages, the JSON API they use, admin pages.

Reads only the study folder; imports neither torch nor the model. See ``make_app``.

API (the participant's pages use it too)::

    POST /api/sessions                       {"external_id": str?} -> {"session_id", "token", "n_trials"}
    GET  /api/sessions/{id}/next             Bearer token -> a trial, or {"done": true, "completion_code"}
    POST /api/sessions/{id}/responses        Bearer token, {"trial_id", "decision", "confidence", "label"?}
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Optional

from fastapi import FastAPI, Header, Request
from jinja2 import Environment, FileSystemLoader
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from .db import RequestRefused, Store
from .folder import Study, load_study

__all__ = ["make_app", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 16 * 1024  # a response is ~100 bytes; anything much larger is not one
_HERE = Path(__file__).parent


class NewSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    external_id: Optional[str] = Field(default=None, max_length=200)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trial_id: int
    decision: Optional[Literal["accept", "reject"]] = None
    confidence: int = Field(ge=1, le=4)
    label: Optional[int] = None


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


def _bearer(authorization: Optional[str]) -> Optional[str]:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def make_app(study, admin_token: str, *, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The study app for a study folder (path or :class:`~actclust.study.folder.Study`).

    ``admin_token`` guards every ``/admin`` page and export: give it as ``?token=``, as a Bearer
    header, or through the cookie the admin page sets.
    """
    study = study if isinstance(study, Study) else load_study(study)
    store = Store(study)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actclust-study-writer")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        writer.shutdown(wait=True)  # the answers being written are committed before the server exits

    app = FastAPI(title="actclust study", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=max_body)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    # autoescape every template: Starlette's default escapes only *.html, and ours end in .j2
    pages = Jinja2Templates(env=Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True))
    app.state.store, app.state.study = store, study
    choices = [{"class": c, "name": n} for c, n in enumerate(study.class_names)]
    explanation = functools.lru_cache(maxsize=None)(study.explanation)  # composed once per item and condition

    @app.exception_handler(RequestRefused)
    async def refused(request, exc: RequestRefused):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def headers(request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - start) * 1000:.2f}"
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self' 'unsafe-inline'; script-src 'self'")
        return response

    # ---------------------------------------------------------------- participant pages
    @app.get("/", response_class=HTMLResponse)
    def consent(request: Request):
        return pages.TemplateResponse(request, "consent.html.j2", {"study": study})

    @app.get("/study", response_class=HTMLResponse)
    def trials_page(request: Request):
        return pages.TemplateResponse(request, "study.html.j2", {"study": study})

    # ---------------------------------------------------------------- JSON API
    # Reads (well under a millisecond) run on the event loop; writes, which wait for an fsync, in
    # one writer thread, so that a slow disk never stalls the loop. Sync handlers in Starlette's
    # pool of 40 threads fought the loop for the GIL: p50 ~0.4 s for 100 simultaneous sessions.
    async def write(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(writer, fn, *args)

    @app.post("/api/sessions")
    async def new_session(body: Optional[NewSession] = None):
        return await write(store.create_session, None if body is None else body.external_id)

    @app.get("/api/sessions/{session_id}/next")
    async def next_trial(session_id: str, authorization: Optional[str] = Header(default=None)):
        session = store.authorise(session_id, _bearer(authorization))
        pending = store.next_trial(session)
        if pending is None:
            return {"done": True, "completion_code": session["completion_code"]}
        trial, stage, done = pending
        item = study.item(trial["item_id"])
        shows_advice = stage != "initial"
        # A JSONResponse skips FastAPI's recursive jsonable_encoder: the explanation is plain JSON already
        return JSONResponse({
            "trial_id": trial["id"], "stage": stage, "position": done, "n_trials": len(study.items) * len(store.stages),
            "item": {"id": item["id"], "input": item["input"]}, "choices": choices,
            "prediction": {"class": item["prediction"], "name": study.class_names[item["prediction"]],
                           "confidence": item["confidence"]} if shows_advice else None,
            "explanation": explanation(item["id"], trial["condition"]) if shows_advice else None,
        })

    @app.post("/api/sessions/{session_id}/responses")
    async def respond(session_id: str, body: Answer, authorization: Optional[str] = Header(default=None)):
        session = store.authorise(session_id, _bearer(authorization))
        return await write(store.record, session, body.trial_id, body.decision, body.confidence, body.label)

    @app.get("/api/health")
    async def health():
        return {"ok": True}

    # ---------------------------------------------------------------- admin
    def admin(request: Request, authorization: Optional[str]) -> None:
        given = request.query_params.get("token") or _bearer(authorization) or request.cookies.get("admin_token")
        if not given or not secrets.compare_digest(given.encode(), admin_token.encode()):
            raise RequestRefused(401, "Admin pages need the admin token 'actclust study serve' printed: "
                                      "add ?token=<token> to the address.")

    def with_cookie(request: Request, response: Response) -> Response:
        if request.query_params.get("token"):  # later admin links carry no token in their address
            response.set_cookie("admin_token", admin_token, httponly=True, samesite="strict", path="/admin")
        return response

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, authorization: Optional[str] = Header(default=None)):
        admin(request, authorization)
        page = pages.TemplateResponse(request, "admin.html.j2", {"study": study, "progress": store.progress()})
        return with_cookie(request, page)

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
