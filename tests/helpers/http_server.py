"""A real HTTP file server on 127.0.0.1 with Range support that misbehaves on request (download-stage tests)."""
from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves ``files`` (name -> bytes) with Range support, and misbehaves on request.

    ``fail_5xx[name] = n``: answer 500 n times first. ``drop_once``: announce the full Content-Length, send half the
    bytes, close. ``ignore_range``: answer Range requests with the whole body (200). ``requests`` logs every request
    (path, Range header, status, bytes the server managed to send).
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.fail_5xx: dict[str, int] = {}
        self.drop_once: set[str] = set()
        self.ignore_range: set[str] = set()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def requests_for(self, name: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def setup(self):
        super().setup()
        # A small send buffer, so "bytes sent" is close to what the client really asked for.
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)

    def log_message(self, *args):
        pass

    def do_GET(self):
        state: FileServer = self.server.state  # type: ignore[attr-defined]
        name = self.path.lstrip("/")
        record = {"path": name, "range": self.headers.get("Range"), "status": None, "sent": 0}
        with state.lock:
            state.requests.append(record)
            failing = state.fail_5xx.get(name, 0)
            if failing:
                state.fail_5xx[name] = failing - 1
            drop = name in state.drop_once
            state.drop_once.discard(name)
        if failing:
            record["status"] = 500
            self.send_error(500, "Internal Server Error")
            return
        if name not in state.files:
            record["status"] = 404
            self.send_error(404, "Not Found")
            return
        data = state.files[name]
        start, status = 0, 200
        m = re.match(r"^bytes=(\d+)-$", record["range"] or "")
        if m and name not in state.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        record["status"] = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if drop:
            body = body[: len(body) // 2]
            self.close_connection = True
        try:
            for i in range(0, len(body), 16 * 1024):
                chunk = body[i:i + 16 * 1024]
                self.wfile.write(chunk)
                record["sent"] += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
