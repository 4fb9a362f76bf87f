"""The web page: tasks with live progress bars, one task in detail, failures, workers, and a JSON API.

``litemultistep web DB`` serves it; :func:`app` gives the same as an ASGI application to mount in
your own (Starlette, FastAPI, or any ASGI server). Needs the ``web`` extra:
``pip install 'litemultistep[web]'``.

Pages are rendered on the server from the documents of the JSON API (the CLI's ``--json`` shapes,
docs/cli.md), every piece of user text escaped by the template engine. While a tab is visible its
script fetches the page again every ``refresh`` seconds and changes only the parts that differ; no
script builds HTML from data. Reading changes nothing in the database. Actions (retry, nuke) exist
only with ``allow_actions``: POST, with the page's CSRF token, from the page's own origin.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

try:
    import jinja2
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.templating import Jinja2Templates
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError(f"the web page needs the web extra: pip install 'litemultistep[web]' ({e})") from e

from .. import engine, views
from ..config import resolve_db
from ..errors import DatabaseUnusable, LiteMultiStepError, NoSuchJob, NoSuchMultiStepTask

__all__ = ["app", "LOOPBACK_HOSTS"]

#: Host header names a server bound to a loopback address answers to: a page of another site that
#: points its own name at 127.0.0.1 (DNS rebinding) is refused.
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]

#: tasks per page on the tasks page, failures per page on the failures page
TASKS_PAGE = 50
FAILURES_PAGE = 100
#: finished tasks shown under the active ones; running jobs shown on a task's page
FINISHED_SHOWN = 20
RUNNING_SHOWN = 20
#: minutes the tasks page's throughput chart spans
CHART_MINUTES = 60
#: on a task's page: failures a page, failure groups and scheduled retries shown
TASK_FAILURES_PAGE = 20
GROUPS_SHOWN = 20
SCHEDULED_SHOWN = 50
#: characters of a message, and of a traceback, a page shows (the rest: `failed --json`, the API)
MESSAGE_SHOWN = 4000
TRACEBACK_SHOWN = 40000

_SECURITY_HEADERS = {
    # nothing but this site's own script and style; no inline script at all
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class _Documents:
    """What pages and the API read, and the pages as rendered: each made at most once per ``ttl``
    seconds however many tabs ask, so twenty open tabs cost little more than one."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cache: dict[tuple[Any, ...], tuple[float, Any]] = {}

    def fresh(self, key: tuple[Any, ...]) -> Any:
        """The value kept for ``key`` if it is young enough, else None."""
        with self._lock:
            hit = self._cache.get(key)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self.ttl else None

    def get(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        hit = self.fresh(key)
        if hit is not None:
            return hit
        now = time.monotonic()
        value = make()
        with self._lock:
            if len(self._cache) > 256:  # many distinct pages asked once: forget them
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.ttl}
            self._cache[key] = (now, value)
        return value

    def forget(self) -> None:
        """After an action: the next read sees its effect."""
        with self._lock:
            self._cache.clear()


def _int(request: Request, name: str, default: int | None, least: int = 0, most: int = 10**9) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if not least <= value <= most:
        raise HTTPException(400, f"{name} must be a whole number from {least} to {most:,}, not {text!r}")
    return value


def _text(request: Request, name: str) -> str | None:
    return request.query_params.get(name) or None


def _exc_type(request: Request) -> str | None:
    exc_type = _text(request, "exc_type")
    if exc_type is not None and "\x00" in exc_type:  # PostgreSQL refuses it in any query
        raise HTTPException(400, "exc_type cannot hold a NUL character")
    return exc_type


def _task_url(base: str, task_id: str) -> str:
    return f"{base}/tasks/{quote(task_id, safe='')}"


def _failures_url(base: str, task_id: str | None = None, exc_type: str | None = None,
                  message: str | None = None) -> str:
    """The failures page, filtered: by task, exception type, and message (one group)."""
    query = {k: v for k, v in (("task", task_id), ("exc_type", exc_type), ("message", message)) if v is not None}
    return f"{base}/failures" + (f"?{urlencode(query)}" if query else "")


def _message(request: Request) -> str | None:
    message = request.query_params.get("message")  # an empty message is a message
    if message is not None and "\x00" in message:
        raise HTTPException(400, "message cannot hold a NUL character")
    return message


class _BasicAuth:
    """Every request needs the password (any user name): for a server others can reach."""

    def __init__(self, app: ASGIApp, password: str) -> None:
        self.app = app
        self.password = password.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            response = PlainTextResponse("This page needs its password.", status_code=401,
                                         headers={"WWW-Authenticate": 'Basic realm="litemultistep", charset="UTF-8"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, encoded = value.partition(b" ")
                if scheme.lower() != b"basic":
                    return False
                try:
                    _, _, given = base64.b64decode(encoded.strip(), validate=True).partition(b":")
                except (binascii.Error, ValueError):
                    return False
                return hmac.compare_digest(given, self.password)
        return False


def _host_name(header: str) -> str | None:
    """The host name of a Host header (``name``, ``name:port``, ``[v6 address]:port``), lowercased and
    without brackets; None when it is not of that form."""
    if header.startswith("["):  # an IPv6 address: its colons are not the port's
        name, bracket, port = header[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        port = port[1:]
    else:
        name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return name.lower()


class _TrustedHosts:
    """Answer only requests whose Host header names one of ``hosts`` (any port), ``[::1]`` included:
    a page of another site that points its own name at this address (DNS rebinding) is refused.
    (Starlette's TrustedHostMiddleware takes ``[::1]:8023`` for a host named ``[``.)"""

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in hosts
        self.hosts = {h.strip("[]").lower() for h in hosts}
        #: "*.example.com" names any subdomain of example.com, as in Starlette's middleware
        self.suffixes = tuple(h[1:].lower() for h in hosts if h.startswith("*."))

    def allows(self, name: str | None) -> bool:
        return self.any or name in self.hosts or (name is not None and name.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = next((v for k, v in scope.get("headers", []) if k == b"host"), b"")
            if not self.allows(_host_name(header.decode("latin-1"))):
                await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Headers:
    """The security headers on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def app(db: Any = None, *, allow_actions: bool = False, password: str | None = None, refresh: float = 1.0,
        allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The web page on ``db`` (a path, a URL, a :class:`~litemultistep.Database`, or the configured
    default) as an ASGI application.

    :param allow_actions: offer retry and nuke buttons (POST with a CSRF token, same origin only);
        without it the page only reads.
    :param password: if given, every request needs it (HTTP basic authentication, any user name).
    :param refresh: seconds between a visible page's updates.
    :param allowed_hosts: Host header names to answer to, any port (default: any); an IPv6 address
        with or without its brackets. ``litemultistep web`` on a loopback address passes
        :data:`LOOPBACK_HOSTS` and its ``--host``.
    """
    database = resolve_db(db)
    if refresh <= 0:
        raise ValueError(f"refresh must be a positive number of seconds, not {refresh!r}")
    documents = _Documents(ttl=min(refresh / 2, 1.0))
    csrf = secrets.token_urlsafe(32)
    env = jinja2.Environment(loader=jinja2.PackageLoader("litemultistep.web", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["duration"] = views.duration
    env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    env.filters["number"] = lambda n: f"{n:,}" if isinstance(n, int) else f"{n:g}"
    env.filters["arguments"] = _arguments
    env.filters["rate"] = _rate
    env.filters["clip"] = _clip
    env.globals.update(MESSAGE_SHOWN=MESSAGE_SHOWN, TRACEBACK_SHOWN=TRACEBACK_SHOWN)
    env.globals["task_url"] = _task_url
    templates = Jinja2Templates(env=env)

    def _failure_total() -> int | None:
        try:
            return documents.get(("failure-total",), lambda: views.failure_count(database))
        except LiteMultiStepError:  # the page says what went wrong; the count is left out
            return None

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        base = request.scope.get("root_path", "")
        context.update(base=base, database=database.path, allow_actions=allow_actions, csrf=csrf,
                       refresh_ms=int(refresh * 1000), now=time.time(), path=request.url.path,
                       failure_total=_failure_total(),
                       notice=_notice(request))
        return templates.TemplateResponse(request, name, context, status_code=status_code,
                                          headers={"Cache-Control": "no-store"})

    def shared(handler: Callable[[Request], Response]) -> Callable[[Request], Awaitable[Response]]:
        """The page as rendered for the first of the tabs asking within ``ttl``: rendering, not
        reading, is most of a page's cost, and every open tab asks once a ``refresh``. A page in
        hand is sent at once; only reading and rendering go to a thread."""
        async def serve(request: Request) -> Response:
            key = ("page", request.url.path, request.url.query)
            hit = documents.fresh(key)
            if hit is None:
                hit = await run_in_threadpool(documents.get, key, lambda: _rendered(handler(request)))
            status, body = hit
            return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

        return serve

    # -- pages ------------------------------------------------------------------------------------

    def tasks_page(request: Request) -> Response:
        number = _int(request, "page", 1, least=1) or 1
        active, finished = documents.get(("counts",), lambda: views.task_counts(database))
        last = max(1, -(-active // TASKS_PAGE))
        number = min(number, last)
        doc = documents.get(("tasks", number), lambda: views.status_doc(
            database, TASKS_PAGE, (number - 1) * TASKS_PAGE, FINISHED_SHOWN))
        chart = documents.get(("chart",), lambda: _chart(views.throughput(database, CHART_MINUTES)))
        orphans = documents.get(("orphans",), lambda: views.jobs_of_dead_workers(database))
        return page(request, "tasks.html", doc=doc, page_number=number, last_page=last, active_count=active,
                    finished_count=finished, first_index=(number - 1) * TASKS_PAGE, chart=chart, orphans=orphans)

    def task_page(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        number = _int(request, "page", 1, least=1) or 1
        # a page of the failures, their groups and the first scheduled retries: a bounded page, and
        # a bounded live update, however many jobs failed
        offset = (number - 1) * TASK_FAILURES_PAGE
        try:
            doc = documents.get(("task-page", task_id, number), lambda: views.task_doc(
                database, task_id, TASK_FAILURES_PAGE + 1, offset, SCHEDULED_SHOWN))
            groups = documents.get(("groups", task_id), lambda: views.failure_groups(
                database, task_id, limit=GROUPS_SHOWN + 1))
        except NoSuchMultiStepTask as e:
            return page(request, "missing.html", status_code=404, task_id=task_id, message=str(e))
        return page(request, "task.html", doc=doc, task_id=task_id, running_shown=RUNNING_SHOWN,
                    failures=doc["failures"][:TASK_FAILURES_PAGE], more=len(doc["failures"]) > TASK_FAILURES_PAGE,
                    page_number=number, first_index=offset, groups=groups[:GROUPS_SHOWN],
                    more_groups=len(groups) > GROUPS_SHOWN, scheduled_shown=SCHEDULED_SHOWN,
                    failures_url=_failures_url)

    def failures_page(request: Request) -> Response:
        task_id, exc_type, message = _text(request, "task"), _exc_type(request), _message(request)
        number = _int(request, "page", 1, least=1) or 1
        try:
            doc = documents.get(("failures", task_id, exc_type, message, number), lambda: views.failures_doc(
                database, task_id, exc_type, FAILURES_PAGE + 1, (number - 1) * FAILURES_PAGE, message))
            groups = documents.get(("groups", task_id, exc_type), lambda: views.failure_groups(
                database, task_id, exc_type, limit=GROUPS_SHOWN + 1))
        except NoSuchMultiStepTask as e:
            return page(request, "missing.html", status_code=404, task_id=task_id, message=str(e))
        if message is not None:
            groups = [g for g in groups if g.message == message]
        more = len(doc["failures"]) > FAILURES_PAGE
        kinds = documents.get(("kinds", task_id), lambda: views.failure_kinds(database, task_id))
        query = {k: v for k, v in (("task", task_id), ("exc_type", exc_type), ("message", message)) if v is not None}
        return page(request, "failures.html", failures=doc["failures"][:FAILURES_PAGE],
                    scheduled=doc["scheduled"][:SCHEDULED_SHOWN], scheduled_count=len(doc["scheduled"]),
                    kinds=kinds, task_id=task_id, exc_type=exc_type, message=message,
                    page_number=number, more=more, query=query, urlencode=urlencode,
                    first_index=(number - 1) * FAILURES_PAGE, groups=groups[:GROUPS_SHOWN],
                    more_groups=len(groups) > GROUPS_SHOWN, failures_url=_failures_url)

    def workers_page(request: Request) -> Response:
        doc = documents.get(("workers",), lambda: views.workers_doc(database))
        running = documents.get(("running",), lambda: {r.job_id: r for r in views.running_jobs(database)})

        def held(job_ids: list[int]) -> list[tuple[int, int, tuple[str, float | None] | None]]:
            # one run per batch: consecutive ids of one task, claimed together
            return views.id_runs([(j, (running[j].task_id, running[j].claimed_at) if j in running else None)
                                  for j in job_ids])

        return page(request, "workers.html", workers=doc["workers"],
                    held={w["id"]: held(w["running_job_ids"]) for w in doc["workers"]})

    # -- the JSON API (the CLI's --json documents) --------------------------------------------------

    def api_tasks(request: Request) -> Response:
        limit, offset = _int(request, "limit", None, least=1), _int(request, "offset", 0) or 0
        doc = documents.get(("api-tasks", limit, offset), lambda: views.status_doc(database, limit, offset))
        return _JSON(doc)

    def api_task(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        return _JSON(documents.get(("task", task_id), lambda: views.task_doc(database, task_id)))

    def api_failures(request: Request) -> Response:
        task_id, exc_type, message = _text(request, "task"), _exc_type(request), _message(request)
        limit, offset = _int(request, "limit", None, least=1), _int(request, "offset", 0) or 0
        if request.query_params.get("group"):
            return _JSON(documents.get(("api-groups", task_id, exc_type, limit, offset),
                                       lambda: views.groups_doc(database, task_id, exc_type, limit, offset)))
        return _JSON(documents.get(("api-failures", task_id, exc_type, limit, offset, message),
                                   lambda: views.failures_doc(database, task_id, exc_type, limit, offset, message)))

    def api_workers(request: Request) -> Response:
        return _JSON(documents.get(("workers",), lambda: views.workers_doc(database)))

    def metrics(request: Request) -> Response:
        """Prometheus text: read from the tasks' counters and the history, never from the job table."""
        return Response(documents.get(("metrics",), lambda: views.metrics(database)),
                        media_type="text/plain; version=0.0.4", headers={"Cache-Control": "no-store"})

    # -- actions ------------------------------------------------------------------------------------

    async def action(request: Request) -> Response:
        if not allow_actions:
            raise HTTPException(403, "actions are off: start the page with --allow-actions "
                                     "(or app(..., allow_actions=True)) to retry or remove from it")
        _same_origin(request)
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")), csrf):
            raise HTTPException(403, "this form's CSRF token is missing or stale: reload the page and try again")
        base = request.scope.get("root_path", "")
        what = request.path_params["what"]
        task_id = str(form.get("task_id", ""))
        if what == "retry-job":
            job = str(form.get("job_id", ""))
            if not (job.isascii() and job.isdigit()):
                raise HTTPException(400, f"a job id is a whole number, not {job!r}")
            ids = await run_in_threadpool(engine.retry_jobs, database, [views.parse_job_id(job)])
            done = {"done": "retried", "n": len(ids)}
        elif what == "retry-group":
            exc_type, message = form.get("exc_type"), form.get("message")
            if not isinstance(exc_type, str) or not isinstance(message, str) or "\x00" in exc_type + message:
                raise HTTPException(400, "a group is named by its exc_type and message")
            scope = task_id or None
            if scope is not None:
                views.check_task_id(database, scope)
            ids = await run_in_threadpool(engine.retry_group, database, exc_type, message, scope)
            done = {"done": "retried", "n": len(ids)}
        elif what == "retry-task":
            views.check_task_id(database, task_id)
            ids = await run_in_threadpool(engine.retry_task, database, task_id)
            done = {"done": "retried", "n": len(ids)}
        elif what == "nuke":
            views.check_task_id(database, task_id)
            running = await run_in_threadpool(engine.nuke, database, task_id)
            documents.forget()
            return RedirectResponse(f"{base}/?{urlencode({'done': 'nuked', 'task': task_id, 'n': running})}",
                                    status_code=303)
        else:
            raise HTTPException(404, f"no action {what!r}")
        documents.forget()
        back = str(form.get("back", ""))
        if not back.startswith(base + "/") or back.startswith("//") or "\\" in back:
            back = _task_url(base, task_id) if task_id else f"{base}/"
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{sep}{urlencode(done)}", status_code=303)

    # -- errors -------------------------------------------------------------------------------------

    def error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            status, message = exc.status_code, str(exc.detail)
        elif isinstance(exc, (NoSuchMultiStepTask, NoSuchJob)):
            status, message = 404, str(exc)
        elif isinstance(exc, DatabaseUnusable):
            status, message = 503, str(exc)
        else:  # an action that no longer applies: the job is not failed any more, say
            status, message = 409, str(exc)
        if request.url.path.startswith(request.scope.get("root_path", "") + "/api/"):
            return _JSON({"error": message}, status_code=status)
        return page(request, "error.html", status_code=status, message=message, status=status)

    routes = [
        Route("/", shared(tasks_page)),
        Route("/tasks/{task_id:path}", shared(task_page)),
        Route("/failures", shared(failures_page)),
        Route("/workers", shared(workers_page)),
        Route("/api/tasks", api_tasks),
        Route("/api/tasks/{task_id:path}", api_task),
        Route("/api/failures", api_failures),
        Route("/api/workers", api_workers),
        Route("/metrics", metrics),
        Route("/actions/{what}", action, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("litemultistep.web", "static")]), name="static"),
    ]
    middleware = [Middleware(_Headers)]
    if password:
        middleware.append(Middleware(_BasicAuth, password=password))
    if allowed_hosts is not None:
        middleware.append(Middleware(_TrustedHosts, hosts=list(allowed_hosts)))
    web = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: error, LiteMultiStepError: error})
    web.state.database = database
    return web


class _JSON(JSONResponse):
    """A JSON answer of the API, strict as ``--json`` is (:func:`views.to_json`): a non-finite number
    is null, never a 500."""

    def render(self, content: Any) -> bytes:
        return views.to_json(content).encode("utf-8")


def _rate(per_second: float | None) -> str:
    """Jobs a second for people: ``1,204/s``, ``3.5/s``, ``12/min``; a dash when not known."""
    if per_second is None:
        return "–"
    if per_second >= 100:
        return f"{per_second:,.0f}/s"
    if per_second >= 1:
        return f"{per_second:.1f}/s"
    return f"{per_second * 60:.2g}/min" if per_second * 60 >= 0.1 else "0/min"


#: the chart's drawing area, in SVG units
_CHART_W, _CHART_H = 600, 100


def _chart(history: views.Throughput) -> dict[str, Any]:
    """What the tasks page draws of the throughput history: one bar a minute, completed jobs below
    the failed attempts, on a scale rounded up to 1, 2 or 5 times a power of ten."""
    peak = max((c + f for c, f in zip(history.completed, history.failed, strict=True)), default=0)
    top = next(m * 10 ** e for e in range(24) for m in (1, 2, 5) if m * 10 ** e >= peak)
    n = len(history.completed)
    step = _CHART_W / max(n, 1)
    bars = []
    for i, (done, failed) in enumerate(zip(history.completed, history.failed, strict=True)):
        minute = history.end_minute - (n - 1 - i)
        h_done = _CHART_H * done / top
        h_failed = _CHART_H * failed / top
        bars.append({"x": round(i * step + 1, 2), "width": round(step - 2, 2),
                     "done_y": round(_CHART_H - h_done, 2), "done_h": round(h_done, 2),
                     "failed_y": round(_CHART_H - h_done - h_failed, 2), "failed_h": round(h_failed, 2),
                     "label": f"{time.strftime('%H:%M', time.localtime(minute * 60))}: {done:,} completed"
                              + (f", {failed:,} failed" if failed else "")})
    return {"bars": bars, "top": top, "width": _CHART_W, "height": _CHART_H, "minutes": n,
            "completed": sum(history.completed), "failed": sum(history.failed),
            "last_minute": history.completed[-1] if n else 0, "last_failed": history.failed[-1] if n else 0}


def _clip(text: str, limit: int) -> str:
    """At most ``limit`` characters of a text a page shows, saying how much is left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n... ({len(text) - limit:,} more characters: see `litemultistep failed --json`)"


def _rendered(response: Response) -> tuple[int, bytes]:
    return response.status_code, bytes(response.body)


def _arguments(stored: str) -> str:
    """A job's stored ``[args, kwargs]`` JSON as a call's argument list: ``("a", 2, key=true)``."""
    try:
        args, kwargs = json.loads(stored)
        parts = [json.dumps(a, ensure_ascii=False) for a in args]
        parts += [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in kwargs.items()]
    except (ValueError, TypeError, AttributeError):
        return stored
    return f"({', '.join(parts)})"


def _notice(request: Request) -> str | None:
    """What an action just did, for the page it went back to (from a fixed set of phrases)."""
    done = request.query_params.get("done")
    if done == "retried":
        n = request.query_params.get("n", "0")
        return "No failed jobs to retry." if n == "0" else f"Requeued {n} job{'s' if n != '1' else ''}."
    if done == "nuked":
        n = request.query_params.get("n", "0")
        stopping = "" if n in ("", "0") or not n.isdigit() else (
            f" Its {n} running job{'s' if n != '1' else ''} stop within about a second.")
        return f"Removed {request.query_params.get('task', 'the task')}.{stopping}"
    return None


def _same_origin(request: Request) -> None:
    """A browser names the page a POST comes from: it must be this site. (A client that names
    none, such as curl, still needs the token.)"""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != own and not origin.startswith(own + "/"):
        raise HTTPException(403, f"refused: this POST comes from {origin}, not from this page ({own})")


