"""Shared by the `tunelab label` tests: candidates files, the server in a thread or a subprocess, an HTTP client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import write_jsonl
from tunelab.demo import world

ROOT = Path(__file__).resolve().parent.parent


def review_candidates(n: int, seed: int = 0) -> list[dict]:
    """Rows {prompt, responses, sources}: a positive and a negative review of a film per prompt."""
    import random

    rng = random.Random(seed)
    return [{"prompt": world.review_instruction(title) + "\n",
             "responses": [world.make_review(title, True, rng), world.make_review(title, False, rng)],
             "sources": ["warm", "cold"]} for title in world.make_titles(n, seed)]


def write_candidates(path: Path, n: int = 5, seed: int = 0, rows: list[dict] | None = None) -> Path:
    return write_jsonl(path, rows if rows is not None else review_candidates(n, seed))


def read_labels(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Client:
    """One page (a browser tab) talking to the server over real HTTP."""

    def __init__(self, url: str, labeler: str = "alice", client: str | None = None, token: str | None = None):
        self.url = url.rstrip("/")
        self.labeler = labeler
        self.client = client or f"tab-{labeler}-{id(self)}"
        self.token = token if token is not None else page_token(self.url)

    def post(self, path: str, body, token: str | None = "default", raw: bytes | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        token = self.token if token == "default" else token
        if token is not None:
            headers["X-Label-Token"] = token
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def next(self) -> dict:
        status, answer = self.post("/api/next", {"client": self.client, "labeler": self.labeler})
        assert status == 200, answer
        return answer

    def next_pair(self, timeout: float = 60.0) -> dict:
        """The next pair, waiting while it is prepared."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.next()
            if answer["status"] == "item":
                return answer["pair"]
            assert answer["status"] == "preparing", answer
            assert time.monotonic() < deadline, "no pair prepared in time"
            time.sleep(0.1)

    def label(self, pair_id: str, choice: str, comment: str = "", label_id: str | None = None) -> tuple[int, dict]:
        body = {"pair": pair_id, "choice": choice, "comment": comment, "labeler": self.labeler, "client": self.client}
        if label_id is not None:
            body["label_id"] = label_id
        return self.post("/api/label", body)

    def undo(self) -> tuple[int, dict]:
        return self.post("/api/undo", {"client": self.client, "labeler": self.labeler})


def page_token(url: str) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/", timeout=30) as response:
        page = response.read().decode()
    return re.search(r'<meta name="label-token" content="([^"]+)"', page).group(1)


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class ThreadServer:
    """The app served by uvicorn in a thread of the test process, on a free port."""

    def __init__(self, session, guidelines: str = "# Guidelines\n\nPick the better one."):
        import uvicorn

        from tunelab.label.server import create_app

        self.session = session
        self.app = create_app(session, guidelines)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        self.session.close()


def candidate_session(candidates: Path, output: Path, overlap: int = 0, labeler: str = "alice", **kwargs):
    from tunelab.label.items import load_candidates
    from tunelab.label.session import LabelSession
    from tunelab.label.store import LabelFile

    items, pairs = load_candidates(str(candidates))
    return LabelSession(items, LabelFile(output), pairs=pairs, overlap=overlap, default_labeler=labeler, **kwargs)


class CliServer:
    """`python -m tunelab label ... --port 0` in a subprocess; the URL read from its stdout."""

    def __init__(self, args: list[str], timeout: float = 120.0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "tunelab", "label", *args, "--port", "0"], cwd=ROOT,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr_lines: list[str] = []
        self.drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self.drain.start()
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait(timeout=10)
                raise AssertionError(f"server exited ({self.process.returncode}): {''.join(self.stderr_lines)}")
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if found:
                self.url = found.group(1)
            assert time.monotonic() < deadline, "server printed no URL in time"

    def _drain_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown code runs
        self.process.wait(timeout=30)
        self.drain.join(timeout=10)

    def stop(self) -> int:
        """Ctrl-C, as a labeler stops it; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        self.drain.join(timeout=10)
        return code
