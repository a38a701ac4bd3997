"""The explorer as an ASGI app (FastAPI, as the study's server): read-only pages over an :class:`Explorer`.

Pages (GET only, HTML)::

    /                          the run: fidelity and weight per layer, where the surrogate and the DNN disagree
    /inputs?show=&sort=&page=  test inputs, filtered (all, right, wrong, flagged, disagree) and sorted
    /input/{i}                 one test input: prediction, path, votes, similar samples, trust signals
    /layer/{layer}?sort=       a layer's clusters as concept cards, and a 2-D map of its vectors
    /cluster/{layer}/{c}?page= a cluster: its training members page by page, the test inputs in it

Every page needs the token ``actclust view`` printed, as the study's admin pages do: ``?token=`` once
(it is then kept in a cookie for this site's pages), or an ``Authorization: Bearer`` header. Pages
hold no script; images are inline. A page of something the run does not have is a 404 page with a
link back. Each page is computed once and cached (:class:`~.data.PageCache`).
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Optional
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..render import MAX_FEATURES, MAX_TABLE
from .data import (FILTERS, INPUT_SORTS, MEMBERS_PER_PAGE, PAGE_SIZE, SMALL_ROWS, SORTS, Explorer, NotFound, PageCache,
                   number)

__all__ = ["make_app", "TOKEN_COOKIE", "cookie_name"]

TOKEN_COOKIE = "actclust_view_token"


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


#: The methods every address of the explorer answers.
METHODS = ("GET", "HEAD")


def cookie_name(port: Optional[int]) -> str:
    """The token's cookie of the explorer at ``port``: browsers keep cookies per host, not per port, so two explorers
    open at once (two runs compared) overwrote each other's under one name and logged each other out."""
    return TOKEN_COOKIE if port is None else f"{TOKEN_COOKIE}_{port}"


def _bearer(authorization: Optional[str]) -> Optional[str]:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def make_app(explorer: Explorer, token: str, *, cache_size: int = 512) -> FastAPI:
    """The explorer's app over ``explorer``; every page needs ``token``."""
    from ..templating import environment

    env = environment()
    cache = PageCache(cache_size)
    # no redirect to add or drop a trailing slash: Starlette's kept ?token= in its Location, built from the Host header
    # (an outside check); such an address is a 404 page like any other the explorer does not answer
    app = FastAPI(title="actclust view", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.explorer, app.state.cache = explorer, cache
    ex = explorer

    def render(template: str, status: int = 200, **values) -> HTMLResponse:
        html = env.get_template(template).render(ex=ex, title=ex.title, names=ex.shown_names, quote=quote, **values)
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(NotFound)
    async def not_found(request, exc: NotFound):
        return render("explorer_error.html.j2", 404, heading="Not found", message=str(exc), back=exc.back,
                    back_text=exc.back_text)

    @app.exception_handler(_Refused)
    async def refused(request, exc: _Refused):
        # bare: nothing of the run (its name, layers and sizes were in the page around the message: an outside check)
        response = render("explorer_error.html.j2", exc.status, heading="Token needed", message=str(exc), back=None,
                        back_text="", bare=True)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request, exc: StarletteHTTPException):
        """An address no page answers (FastAPI's own JSON before): a page saying so, bare (no token was asked)."""
        if exc.status_code == 404:
            return render("explorer_error.html.j2", 404, heading="Not found", bare=True, back="/",
                          back_text="the run", message=f"No page of the explorer at {request.url.path!r}.")
        page = render("explorer_error.html.j2", exc.status_code, heading=str(exc.detail), bare=True, back="/",
                      back_text="the run", message="")
        if exc.status_code == 405:
            page.headers["Allow"] = ", ".join(METHODS)  # as HTTP asks of a 405
        return page

    @app.middleware("http")
    async def headers(request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - start) * 1000:.2f}"
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                                       "form-action 'self'; frame-ancestors 'none'")
        return response

    def authorise(request: Request, authorization: Optional[str]) -> None:
        given = (request.query_params.get("token") or _bearer(authorization)
                 or request.cookies.get(cookie_name(request.url.port)))
        if not given:
            raise _Refused(401, "The explorer's pages need the token 'actclust view' printed: open the address it "
                                "printed, or add ?token=<token> to this one.")
        if not secrets.compare_digest(given.encode(), token.encode()):  # said apart from none (an outside check)
            raise _Refused(401, "That token is not this explorer's: open the address 'actclust view' printed (each "
                                "start prints a new token, unless --token set one).")

    def cached(request: Request, authorization: Optional[str], key, build):
        authorise(request, authorization)
        if request.query_params.get("token"):
            # the token goes to a cookie, and the address drops it (it stayed in the address bar, then in history,
            # bookmarks and screenshots: an outside check); later links carry no token
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            path = request.scope.get("raw_path", b"").decode("latin-1") or quote(request.url.path)  # as sent, encoded
            # one slash, defensively: "//host/..." in Location is another site (no route answers such a path today)
            path = "/" + path.lstrip("/")
            moved = RedirectResponse(path + (f"?{query}" if query else ""), status_code=303)
            moved.set_cookie(cookie_name(request.url.port), token, httponly=True, samesite="strict", path="/")
            return moved

        def built():
            response = build()
            return response.status_code, response.body
        status, body = cache.get(key, built)
        return HTMLResponse(body, status_code=status)

    def page(path: str):
        """A page at ``path``, for GET and HEAD (its headers alone: link checkers, ``curl -I``; it was a 405)."""
        return app.api_route(path, methods=list(METHODS), response_class=HTMLResponse)

    # ---------------------------------------------------------------- pages
    @page("/")
    def run_page(request: Request, authorization: Optional[str] = Header(default=None)):
        def build():
            st = ex.state
            per_layer = [{"name": l, "weight": float(st.weights[j]), "clusters": st.clusterings[l].n_clusters,
                          "fidelity": ex.scores["per_layer"][l]["fidelity"],
                          "accuracy": ex.scores["per_layer"][l]["accuracy"],
                          "train_fidelity": (st.train_score or {}).get("per_layer", {}).get(l, {}).get("fidelity")}
                         for j, l in enumerate(st.layers)]
            flags = {}
            if ex.trust is not None and ex.thresholds:
                flags = {k: int((ex.trust[k] < t).sum()) for k, t in ex.thresholds["signals"].items() if k in ex.trust}
            return render("explorer_run.html.j2", per_layer=per_layer, s=ex.scores, pairs=ex.disagreement()[:20],
                        flags=flags, n_flagged=int((ex.flagged > 0).sum()), model=ex.ac.provenance()["model_class"])
        return cached(request, authorization, ("run",), build)

    @page("/inputs")
    def inputs_page(request: Request, show: str = "all", sort: str = "index", page: str = "1",
                    dnn: Optional[str] = None, surrogate: Optional[str] = None,
                    authorization: Optional[str] = Header(default=None)):
        page_no = page

        def build():
            if show not in FILTERS:
                raise NotFound(f"show must be one of {', '.join(FILTERS)}; got {show!r}.", "/inputs", "all test inputs")
            if sort not in INPUT_SORTS:
                raise NotFound(f"sort must be one of {', '.join(INPUT_SORTS)}; got {sort!r}.", "/inputs",
                               "all test inputs")
            classes = {}
            for name, value in (("dnn", dnn), ("surrogate", surrogate)):
                if value is not None:
                    classes[name] = number(value, len(ex.names))
                    if classes[name] is None:
                        raise NotFound(f"{name} must be a class number from 0 to {len(ex.names) - 1}; got {value!r}.",
                                       "/inputs", "all test inputs")
            chosen = ex.select(show, sort, classes.get("dnn"), classes.get("surrogate"))
            n_pages = max(1, math.ceil(len(chosen) / PAGE_SIZE))
            p = _page_number(page_no, n_pages, "/inputs?" + urlencode({"show": show, "sort": sort}))
            rows = chosen[(p - 1) * PAGE_SIZE:p * PAGE_SIZE]
            drawn = ex.test_inputs(rows)
            q = ex.q
            items = [{"i": int(i), "drawn": d, "label": None if q.labels is None else int(q.labels[i]),
                      "dnn": int(q.dnn_pred[i]), "confidence": float(q.dnn_proba[i, q.dnn_pred[i]]),
                      "surrogate": int(ex.sur_pred[i]), "flags": int(ex.flagged[i]),
                      "main": _main_trust(ex, int(i))} for i, d in zip(rows, drawn)]
            base = {"show": show, "sort": sort, **({"dnn": dnn} if dnn is not None else {}),
                    **({"surrogate": surrogate} if surrogate is not None else {})}
            return render("explorer_inputs.html.j2", items=items, show=show, sort=sort, total=len(chosen), pg=p,
                        n_pages=n_pages, link=lambda **change: "/inputs?" + urlencode({**base, **change}),
                        urlencode=urlencode, filters=FILTERS, sorts=INPUT_SORTS,
                        classes=classes, has_labels=q.labels is not None)
        key = ("inputs", show, sort, page_no, dnn, surrogate)
        return cached(request, authorization, key, build)

    @page("/input/{index}")
    def input_page(index: str, request: Request, authorization: Optional[str] = Header(default=None)):
        def build():
            i = ex.check_input(index)
            st, q = ex.state, ex.q
            pred = int(q.dnn_pred[i])
            x_drawn = ex.test_inputs([i], rest=MAX_TABLE - MAX_FEATURES)[0]  # the input's page: all its features, folded
            from ...capture.data import rows as input_rows

            x = input_rows(ex.X, [i], label_key=ex.ac.label_key)[0]
            order = ex.input_order(i, x)
            n_ex, rows = (2, SMALL_ROWS) if order is not None else (4, 12)  # tables take more room than pictures
            prior = st.target_prior()
            w = st.weights / st.weights.sum()
            layers = []
            for j, l in enumerate(st.layers):
                c = int(ex.paths[i, j])
                mix = ex.layer_mix[j, i]
                members = ex.layers[l].members(c)
                layers.append({"name": l, "cluster": c, "weight": float(w[j]), "mix": mix.tolist(),
                               "vote": float(w[j] * (mix[pred] - prior[pred])),
                               "distance": float(q.distances[l][i, c] / st.clusterings[l].scale_),
                               "size": len(members), "purity": float(st.posteriors[l][c].max()),
                               "exemplars": ex.train_samples(members[:n_ex], order, rows)})
            vmax = max([abs(lay["vote"]) for lay in layers] + [1e-6])
            similar = {p: [(*ex.train_samples([t], order, rows)[0], d) for t, d in found]
                       for p, found in ex._similar(i).items()}
            trust = None if ex.trust is None else {k: float(v[i]) for k, v in ex.trust.items()}
            return render("explorer_input.html.j2", i=i, x=x_drawn, label=None if q.labels is None else int(q.labels[i]),
                        pred=pred, confidence=float(q.dnn_proba[i, pred]), proba=ex.proba[i].tolist(),
                        sur=int(ex.sur_pred[i]), layers=layers, vmax=vmax, similar=similar, trust=trust,
                        thresholds=ex.thresholds, notes=ex.trust_notes, n_test=ex.n_test,
                        order_note=ex.order.note if ex.order is not None and x_drawn["kind"] == "table" else "")
        return cached(request, authorization, ("input", index), build)

    @page("/layer/{layer:path}")
    def layer_page(layer: str, request: Request, sort: str = "size",
                   authorization: Optional[str] = Header(default=None)):
        def build():
            ex.check_layer(layer)
            if sort not in SORTS:
                raise NotFound(f"sort must be one of {', '.join(SORTS)}; got {sort!r}.", f"/layer/{quote(layer)}",
                               f"layer {layer}")
            st = ex.state
            k = st.clusterings[layer].n_clusters
            tabular = ex.order is not None
            n_ex, n_edge = (3, 1) if tabular else (6, 3)
            cards = [ex.concept(layer, c, n_ex, n_edge) for c in range(k)]
            key = {"size": lambda c: (-c["size"], c["cluster"]), "purity": lambda c: (-c["purity"], c["cluster"]),
                   "cluster": lambda c: c["cluster"]}[sort]
            cards.sort(key=key)
            for c in cards:
                order = ex.cluster_order(layer, c["cluster"])
                c["exemplars_drawn"] = ex.train_samples(c["exemplars"], order, SMALL_ROWS)
                c["edge_drawn"] = ex.train_samples(c["edge"], order, SMALL_ROWS)
            j = st.layers.index(layer)
            return render("explorer_layer.html.j2", layer=layer, cards=cards, sort=sort, sorts=SORTS,
                        map=ex.layer_map(layer), weight=float(st.weights[j]), k=k, tabular=tabular,
                        fidelity=ex.scores["per_layer"][layer]["fidelity"])
        return cached(request, authorization, ("layer", layer, sort), build)

    @page("/cluster/{layer:path}/{cluster}")
    def cluster_page(layer: str, cluster: str, request: Request, page: str = "1",
                     authorization: Optional[str] = Header(default=None)):
        page_no = page

        def build():
            c = ex.check_cluster(layer, cluster)
            st = ex.state
            concept = ex.concept(layer, c, 0, 0)
            members = ex.layers[layer].members(c)
            n_pages = max(1, math.ceil(len(members) / MEMBERS_PER_PAGE))
            p = _page_number(page_no, n_pages, f"/cluster/{quote(layer)}/{c}")
            shown = members[(p - 1) * MEMBERS_PER_PAGE:p * MEMBERS_PER_PAGE]
            order = ex.cluster_order(layer, c)
            drawn = ex.train_samples(shown, order, SMALL_ROWS)
            dist = ex.layers[layer].dist[shown] / st.clusterings[layer].scale_
            j = st.layers.index(layer)
            tests = [int(t) for t in (ex.paths[:, j] == c).nonzero()[0]]
            test_shown = tests[:PAGE_SIZE]
            q = ex.q
            test_items = [{"i": t, "drawn": d, "dnn": int(q.dnn_pred[t]),
                           "wrong": q.labels is not None and q.labels[t] != q.dnn_pred[t]}
                          for t, d in zip(test_shown, ex.test_inputs(test_shown, [order] * len(test_shown)))]
            return render("explorer_cluster.html.j2", layer=layer, c=c, concept=concept, members=list(zip(drawn, dist.tolist(), shown.tolist())),
                        pg=p, n_pages=n_pages, tests=test_items, n_tests=len(tests), posterior=st.posteriors[layer][c].tolist(),
                        first=(p - 1) * MEMBERS_PER_PAGE)
        return cached(request, authorization, ("cluster", layer, cluster, page_no), build)

    @app.api_route("/health", methods=list(METHODS))
    def health():
        return JSONResponse({"ok": True})

    return app


def _page_number(text: str, n_pages: int, back: str) -> int:
    page = number(text, n_pages + 1, at_least=1)
    if page is None:
        raise NotFound(f"page must be a number from 1 to {n_pages}; got {text!r}.", back, "the first page")
    return page


def _main_trust(ex: Explorer, i: int):
    if ex.trust is None:
        return None
    name = "stacked_trust" if "stacked_trust" in ex.trust else "credibility"
    value = float(ex.trust[name][i])
    t = (ex.thresholds or {}).get("signals", {}).get(name)
    return {"name": name, "value": value, "low": t is not None and value < t}
