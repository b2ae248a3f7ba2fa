"""The labeling page: a Starlette app, served by uvicorn.

GET  /             the page (its per-server token in a meta tag)
GET  /assets/...   the page's script and style (shipped in the package: the page works offline)
GET  /api/state    guidelines (HTML rendered from Markdown, raw HTML escaped), progress, default labeler
POST /api/next     {client, labeler} -> the item this page holds or a new one, or why there is none
POST /api/label    {pair, choice: A|B|tie|skip, comment, label_id} -> saved once the row is fsynced
POST /api/undo     {client, labeler} -> the labeler's last label removed, its item shown again
POST /api/release  {client} -> the page's item given back (the tab is closing)

Every POST needs the header `X-Label-Token` with the server's token; a bad request gets a 4xx and a JSON
`{"error": message}` and changes nothing. Model text only ever travels as JSON strings, which the page
puts into the document as text; a Content-Security-Policy allows no inline script at all.
"""

from __future__ import annotations

import html
import json
import re
import secrets
from pathlib import Path

from tunelab.label import LabelError
from tunelab.label.session import LabelSession, RequestError

ASSETS = Path(__file__).parent / "assets"
TOKEN_HEADER = "x-label-token"
MAX_BODY = 64 * 1024
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def render_guidelines(markdown: str) -> str:
    """Markdown to HTML with raw HTML shown as text and unsafe links (javascript: and such) refused."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)


def default_guidelines() -> str:
    return (ASSETS / "guidelines.md").read_text(encoding="utf-8")


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def host_name(header: str) -> str:
    """The host of a Host header, without its port (`[::1]:8765` -> `::1`)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(session: LabelSession, guidelines_markdown: str, token: str | None = None, title: str = "tunelab label",
               allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES):
    """The app; `app.state.token` holds the token state-changing requests must carry.

    `allowed_hosts`: the names a request's Host header may give (None: any). Served on a loopback address, only
    loopback names are answered, so a web page whose own name was pointed at 127.0.0.1 (DNS rebinding) cannot
    read the page and its token.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    token = token or secrets.token_urlsafe(24)
    guidelines_html = render_guidelines(guidelines_markdown)
    page = (ASSETS / "index.html").read_text(encoding="utf-8")
    page = page.replace("{{TOKEN}}", html.escape(token, quote=True)).replace("{{TITLE}}", html.escape(title))

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def body_of(request: Request, fields: dict[str, tuple[type, bool]]) -> dict:
        """The JSON body, checked: `fields` maps a name to (type, required); other fields are refused."""
        supplied = request.headers.get(TOKEN_HEADER, "")
        if not supplied or not secrets.compare_digest(supplied.encode(), token.encode()):
            raise RequestError(403, "missing or wrong token: reload the page (requests must carry the "
                               "X-Label-Token header of this server)")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "malformed request: the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise RequestError(400, "malformed request: the body must be a JSON object")
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise RequestError(400, f"malformed request: unknown field {unknown[0]!r:.40}")
        for name, (kind, required) in fields.items():
            if body.get(name) is None:
                if required:
                    raise RequestError(400, f"malformed request: missing field '{name}'")
                continue
            if not isinstance(body[name], kind):
                raise RequestError(400, f"malformed request: field '{name}' must be a {kind.__name__}")
        for name in ("client", "pair", "label_id"):
            if isinstance(body.get(name), str) and not _ID.match(body[name]):
                raise RequestError(400 if name != "pair" else 404,
                                   f"malformed request: field '{name}' must be 1 to 64 letters, digits, - or _"
                                   if name != "pair" else f"unknown item {body[name]!r:.40}")
        return body

    def handler(fields: dict[str, tuple[type, bool]], action):
        async def endpoint(request: Request) -> JSONResponse:
            try:
                body = await body_of(request, fields)
                answer = await run_in_threadpool(action, body)  # file writes and fsyncs off the event loop
            except RequestError as exc:
                return error(exc.status, str(exc))
            except (LabelError, OSError) as exc:  # the labels file could not be written: nothing acknowledged
                return error(500, f"the labels file could not be written: {exc}")
            return JSONResponse(answer)
        return endpoint

    who = {"client": (str, True), "labeler": (str, False)}

    def next_item(body: dict) -> dict:
        labeler = session.labeler_name(body.get("labeler"))
        return {**session.next(body["client"], labeler), "progress": session.progress(labeler)}

    def label(body: dict) -> dict:
        labeler = session.labeler_name(body.get("labeler"))  # checked before anything is written
        answer = session.label(body["pair"], body["choice"], body.get("comment") or "", body.get("label_id"))
        return {**answer, "progress": session.progress(labeler)}

    def undo(body: dict) -> dict:
        labeler = session.labeler_name(body.get("labeler"))
        return {**session.undo(body["client"], labeler), "progress": session.progress(labeler)}

    def release(body: dict) -> dict:
        session.release(body["client"])
        return {"status": "released"}

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def state(request: Request) -> JSONResponse:
        return JSONResponse({"guidelines_html": guidelines_html, "labeler": session.default_labeler,
                             "progress": session.progress(), "title": title})

    class Guard:
        """Refuses unexpected Host headers and adds the security headers to every response (pure ASGI)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            if allowed_hosts is not None:
                host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
                if host_name(host).lower() not in allowed_hosts:
                    return await error(400, f"unexpected Host header {host!r:.60}: open the page at the address "
                                       "tunelab label printed")(scope, receive, send_with_headers_for(send))
            await self.app(scope, receive, send_with_headers_for(send))

    def send_with_headers_for(send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()
                    if name.encode() not in present]
            await send(message)
        return send_with_headers

    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/api/next", handler(who, next_item), methods=["POST"]),
        Route("/api/label", handler({"pair": (str, True), "choice": (str, True), "comment": (str, False),
                                     "label_id": (str, False), "labeler": (str, False), "client": (str, False)},
                                    label), methods=["POST"]),
        Route("/api/undo", handler(who, undo), methods=["POST"]),
        Route("/api/release", handler({"client": (str, True)}, release), methods=["POST"]),
        Mount("/assets", StaticFiles(directory=str(ASSETS)), name="assets"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)])
    app.state.token = token
    return app


def serve(app, host: str, port: int, on_ready=None) -> None:
    """Serve until Ctrl-C (or SIGTERM). The socket is bound first, so port 0 picks a free port; `on_ready`
    gets the URL once the server accepts connections."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LabelError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port (0: any free one)")
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        if on_ready is not None:
            on_ready(f"http://{shown}:{bound}/")

    server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
