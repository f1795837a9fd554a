"""The explorer's HTTP layer on the standard library: static files from `static/` and JSON from `/api/*`.

Each request runs in its own thread (ThreadingHTTPServer); a MoelabError from a view becomes a 400 with
its one line, anything else a 500 with the exception's type and message, so the page can show it. The
server binds 127.0.0.1 unless told otherwise and serves nothing outside `static/`.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from moelab.config import MoelabError
from moelab.explore.app import Explorer

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
GET_VIEWS = {"/api/info": "info", "/api/docs": "docs", "/api/doc": "doc", "/api/expert": "expert",
             "/api/diff": "diff"}
MAX_BODY = 1 << 16


def make_handler(app: Explorer, quiet: bool = True) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "moelab-explore"

        def log_message(self, fmt, *args):  # the terminal shows the URL, not every request
            if not quiet:
                super().log_message(fmt, *args)

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path in GET_VIEWS:
                params = dict(parse_qsl(url.query))
                view = getattr(app, GET_VIEWS[url.path])
                return self._answer(lambda: view() if url.path == "/api/info" else view(params))
            name = "index.html" if url.path in ("/", "/index.html") else url.path.removeprefix("/static/")
            file = (STATIC / name).resolve()
            if file.parent != STATIC.resolve() or not file.is_file() or file.suffix not in TYPES:
                return self._send(HTTPStatus.NOT_FOUND, b"not found", TYPES[".txt"])
            self._send(HTTPStatus.OK, file.read_bytes(), TYPES[file.suffix])

        def do_POST(self):
            if urlsplit(self.path).path != "/api/live":
                return self._send(HTTPStatus.NOT_FOUND, b"not found", TYPES[".txt"])
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "prompt too long"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "the request body is not JSON"})
            self._answer(lambda: app.live(body if isinstance(body, dict) else {}))

        def _answer(self, compute):
            try:
                self._json(HTTPStatus.OK, compute())
            except MoelabError as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # the page shows it; the server keeps serving
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

        def _json(self, status, value):
            self._send(status, json.dumps(value, default=_jsonable).encode(), "application/json")

        def _send(self, status, data: bytes, ctype: str):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _jsonable(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def bind(app: Explorer, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> ThreadingHTTPServer:
    """A bound server (port 0 picks a free one); a port in use is one line, not a traceback."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(app, quiet))
    except OSError as e:
        raise MoelabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
