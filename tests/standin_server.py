"""A local download server for the OpenWrt stand-in: stdlib http.server with Range support,
run in a thread, with faults the download tests ask for (drop the connection, truncate for
good, serve corrupted bytes). Every request is recorded so tests can see what was asked."""

from __future__ import annotations

import http.server
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class Faults:
    drop_once_after: int | None = None  # first GET of a file: close after this many bytes
    truncate_after: int | None = None  # every GET: close after this many bytes of the file
    corrupt: bool = False  # flip one byte in the middle
    dropped: set[str] = field(default_factory=set)


@dataclass
class Request:
    path: str
    range: str | None
    status: int


class StandinServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults = Faults()
        self.requests: list[Request] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # http.server calls it by this name
                server._serve(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandinServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/" + name)]

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = (self.root / handler.path.lstrip("/")).resolve()
        asked = handler.headers.get("Range")
        if not path.is_file():
            self.requests.append(Request(handler.path, asked, 404))
            handler.send_error(404)
            return
        data = bytearray(path.read_bytes())
        if self.faults.corrupt:
            data[len(data) // 2] ^= 0xFF
        start = 0
        status = 200
        if asked and (m := _RANGE.match(asked)):
            start = int(m[1])
            if start >= len(data):
                self.requests.append(Request(handler.path, asked, 416))
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.end_headers()
                return
            status = 206
        self.requests.append(Request(handler.path, asked, status))
        body = bytes(data[start:])
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        limit = len(body)
        faults = self.faults
        if faults.truncate_after is not None:
            limit = max(0, min(limit, faults.truncate_after - start))
        elif faults.drop_once_after is not None and handler.path not in faults.dropped:
            faults.dropped.add(handler.path)
            limit = min(limit, faults.drop_once_after)
        handler.wfile.write(body[:limit])
        if limit < len(body):
            handler.close_connection = True
            handler.wfile.flush()
            handler.connection.shutdown(2)  # the client sees the stream end early
