"""The explorer's HTTP layer on the standard library: static files from `static/` and JSON from `/api/*`.

Each request runs in its own thread (ThreadingHTTPServer); a MoelabError from a view becomes a 400 with
its one line, anything else a 500 with the exception's type and message, so the page can show it. The
server binds 127.0.0.1 unless told otherwise and serves nothing outside `static/`.

Trust boundary: any web page the user visits can make the browser talk to this port. So a request whose
Host is not this server's own name is refused (DNS rebinding would otherwise read /api/info's paths), a POST
must be JSON from this origin (a cross-site form or text/plain fetch cannot run the model), every body is
bounded before it is read, and the CSP lets the page run only its own scripts.
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
             "/api/diff": "diff", "/api/load": "load", "/api/token": "token"}
MAX_BODY = 1 << 16
BACKLOG = 128  # the stdlib's 5 reset a third of 300 parallel requests
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                      "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'"}
ANY_HOST = ("0.0.0.0", "::", "")


class Server(ThreadingHTTPServer):
    request_queue_size = BACKLOG
    daemon_threads = True
    allowed_hosts: frozenset[str] | None = None  # None: bound to every interface, any Host answered


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    if host in ANY_HOST:
        return None
    names = {host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {host}
    return frozenset(f"[{n}]:{port}" if ":" in n else f"{n.lower()}:{port}" for n in names)


def make_handler(app: Explorer, quiet: bool = True) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "moelab-explore"

        def log_message(self, fmt, *args):  # the terminal shows the URL, not every request
            if not quiet:
                super().log_message(fmt, *args)

        def _host_ok(self) -> bool:
            allowed = getattr(self.server, "allowed_hosts", None)
            if allowed is None or (self.headers.get("Host") or "").lower() in allowed:
                return True
            self.close_connection = True
            self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "unknown Host header: this server answers "
                                                               "only to its own address"})
            return False

        def do_GET(self):
            if not self._host_ok():
                return
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
            # The body is never read unless every check passes, so a refused request costs no memory;
            # the connection closes after a refusal because its unread body would be parsed as a request.
            if not self._host_ok():
                return
            problem = self._post_problem()
            if problem is not None:
                self.close_connection = True
                return self._json(problem[0], {"error": problem[1]})
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "the request body is not JSON"})
            if not isinstance(body, dict):
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "the request body is not a JSON object"})
            self._answer(lambda: app.live(body))

        def _post_problem(self) -> tuple[HTTPStatus, str] | None:
            if urlsplit(self.path).path != "/api/live":
                return HTTPStatus.NOT_FOUND, "not found"
            if self.headers.get("Transfer-Encoding"):
                return HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not accepted: send a Content-Length"
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) != 1 or not lengths[0].strip().isdigit() or not lengths[0].strip().isascii():
                return HTTPStatus.BAD_REQUEST, "a POST needs one non-negative integer Content-Length"
            if int(lengths[0]) > MAX_BODY:
                return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY} bytes"
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "a POST must be application/json"
            if self.headers.get("Origin") != f"http://{self.headers.get('Host')}":
                return HTTPStatus.FORBIDDEN, "a POST must come from the explorer's own page (Origin)"
            return None

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
            for k, v in HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _jsonable(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def bind(app: Explorer | None, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> ThreadingHTTPServer:
    """A bound server (port 0 picks a free one); a port in use is one line, not a traceback."""
    try:
        server = Server((host, port), make_handler(app, quiet))
    except (OSError, OverflowError) as e:
        raise MoelabError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    server.allowed_hosts = allowed_hosts(host, server.server_address[1])
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
