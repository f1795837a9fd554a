"""The explorer's trust boundary (issue 24.2-24.7): request bodies bounded before they are read, only its
own Host answered, POSTs only as JSON from its own page, strict query numbers, a deep backlog, file names
read literally, and a busy port or Ctrl-C leaving in one line with the right status."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moelab.explore.commands import build_explorer
from moelab.explore.server import MAX_BODY, bind, serve_in_thread

SRC = str(Path(__file__).resolve().parents[2] / "src")


class FakeLive:
    """Records what the model was asked to route: a refused POST must never reach it."""

    vocab_size = 1000

    def __init__(self):
        self.calls = []

    def route(self, text):
        self.calls.append(text)
        return {"tokens": []}


@pytest.fixture(scope="module")
def served(traces):
    app = build_explorer([str(p) for p in traces])
    app.live_model = FakeLive()
    server = bind(app, "127.0.0.1", 0)
    serve_in_thread(server)
    yield server, app
    server.shutdown()
    server.server_close()


def request(server, method, path, body=b"", headers=None, raw_headers=None):
    """One request on a fresh connection; raw_headers go out byte for byte (for lengths http.client refuses)."""
    port = server.server_address[1]
    head = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()] + (raw_headers or [])
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, resp.getheaders(), resp.read()


def post(server, body, **extra):
    port = server.server_address[1]
    headers = {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}",
               "Content-Length": str(len(body)), **extra}
    return request(server, "POST", "/api/live", body, {k: v for k, v in headers.items() if v is not None})


def test_post_lengths_are_checked_before_the_body_is_read(served):
    server, app = served
    app.live_model.calls.clear()
    for length in ("-1", "abc", "", "1e3", "+5", " ٣", "99999999999999999999"):
        status, _, body = post(server, b'{"text": "x"}', **{"Content-Length": length})
        assert status in (400, 413), (length, status)
        assert "Content-Length" in json.loads(body)["error"] or status == 413
    status, _, _ = post(server, b'{"text": "x"}', **{"Content-Length": None})  # missing
    assert status == 400
    status, _, body = post(server, b"", **{"Content-Length": str(MAX_BODY + 1)})  # no body sent: never read
    assert status == 413 and "bytes" in json.loads(body)["error"]
    status, _, _ = post(server, b'{"text": "x"}', **{"Transfer-Encoding": "chunked"})
    assert status == 400
    assert app.live_model.calls == []
    assert post(server, b'{"text": "ok"}')[0] == 200 and app.live_model.calls == ["ok"]


def test_foreign_host_cross_site_and_non_json_posts_are_refused(served):
    server, app = served
    port = server.server_address[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}"):
        status, _, body = request(server, "GET", "/api/info", headers={"Host": host})
        assert status == 421 and b"path" not in body.lower() and str(SRC).encode() not in body, host
    assert request(server, "GET", "/api/info", headers={"Host": f"localhost:{port}"})[0] == 200
    app.live_model.calls.clear()
    assert post(server, b'{"text": "x"}', **{"Content-Type": "text/plain"})[0] == 415
    assert post(server, b'{"text": "x"}', **{"Origin": "http://evil.example"})[0] == 403
    assert post(server, b'{"text": "x"}', **{"Origin": None})[0] == 403
    assert post(server, b'{"text": "x"}', **{"Origin": "null"})[0] == 403
    assert app.live_model.calls == []


def test_every_answer_carries_nosniff_and_a_script_policy(served):
    server, _ = served
    for path in ("/", "/static/app.js", "/api/info", "/api/doc?doc=x", "/nothing"):
        _, headers, _ = request(server, "GET", path)
        h = {k.lower(): v for k, v in headers}
        assert h["x-content-type-options"] == "nosniff", path
        policy = dict(part.strip().split(" ", 1) for part in h["content-security-policy"].split(";"))
        assert policy["script-src"] == "'self'" and policy["default-src"] == "'none'", path


def test_malformed_queries_are_one_line_400s(served):
    server, app = served
    app.live_model.calls.clear()
    cases = ["/api/docs?offset=-5", "/api/docs?offset=5x", "/api/docs?offset=%D9%A3", "/api/docs?offset=1_0",
             "/api/docs?offset=99999999999", "/api/docs?q=%23" + "9" * 5000, "/api/docs?q=%23", "/api/doc?doc=-1",
             "/api/expert?layer=-1&expert=0", "/api/docs?trace=-1", "/api/docs?q=" + "x" * 2000]
    for path in cases:
        status, _, body = request(server, "GET", path)
        error = json.loads(body)["error"]
        assert status == 400 and "\n" not in error and len(error) < 200, (path[:40], status, error[:300])
    for text in (None, {"a": 1}, 5, ["x"]):
        status, _, body = post(server, json.dumps({"text": text}).encode())
        assert status == 400 and "string" in json.loads(body)["error"], text
    for body in (b"[1]", b"nul", b"\xff\xfe", b"[" * 50_000):
        assert post(server, body)[0] == 400, body[:10]
    assert app.live_model.calls == []
    # the reference: offset=0 lists from the first document
    status, _, body = request(server, "GET", "/api/docs?offset=0")
    assert status == 200 and json.loads(body)["docs"][0]["doc"] == 0


def test_three_hundred_parallel_requests_are_all_answered(served):
    server, _ = served
    answers, lock = [], threading.Lock()

    def one():
        try:
            status = request(server, "GET", "/api/info")[0]
        except OSError as e:
            status = type(e).__name__
        with lock:
            answers.append(status)

    threads = [threading.Thread(target=one) for _ in range(300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count(200) == 300, {a: answers.count(a) for a in set(answers)}


def test_a_file_name_with_glob_characters_is_read_literally(tmp_path, traces):
    t = pq.read_table(traces[0])
    pq.write_table(t, tmp_path / "a*.parquet")
    pq.write_table(t, tmp_path / "ab.parquet")  # what 'a*' would also match
    pq.write_table(t, tmp_path / "c[1].parquet")
    app = build_explorer([str(tmp_path / "a*.parquet"), str(tmp_path / "c[1].parquet")])
    cur = app.db.cursor()
    for s in app.sources:
        assert cur.execute(f"SELECT count(*) FROM {s.sql}").fetchone()[0] == t.num_rows


def cli(*args):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "moelab", "explore", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_busy_port_is_one_line_exit_2_without_abort(traces):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out, err = cli(traces[0], "--port", s.getsockname()[1]).communicate(timeout=120)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot listen" in lines[0], err


def test_ctrl_c_right_after_start_exits_130_cleanly(traces):
    p = cli(traces[0], traces[1], "--port", 0)
    line = p.stdout.readline()  # the serving line: the summary passes have just started
    assert "serving" in line, p.stderr.read()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "terminate" not in err and "Traceback" not in err, err


def test_host_0000_warns(traces):
    p = cli(traces[0], "--port", 0, "--host", "0.0.0.0")
    line = p.stdout.readline()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert "serving" in line and "warning" in err and "every machine" in err, err
