"""A local HTTP file server for download tests: Range support, cut transfers, request log.

Usage::

    with FileServer({"/a/b.bin": data}) as server:
        server.cut_after["/a/b.bin"] = 100   # the next GET of that path stops after 100 bytes
        download_file(server.url("/a/b.bin"), dest)
        server.requests                      # [(path, range_header_or_None, status), ...]
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FileServer:
    """Serve in-memory files on 127.0.0.1 from a background thread."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection drops (once)
        self.ignore_range: set[str] = set()  # paths served whole even when a Range is asked
        self.requests: list[tuple[str, str | None, int]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        """Full URL of a served path."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def add(self, path: str, data: bytes) -> None:
        """Serve `data` at `path`."""
        self.files[path if path.startswith("/") else "/" + path] = data

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                data = server.files.get(path)
                if data is None:
                    self._log(path, rng, 404)
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if match and path not in server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self._log(path, rng, 416)
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self._log(path, rng, status)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                with server._lock:
                    cut = server.cut_after.pop(path, None)
                if cut is not None and cut < len(body):
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def _log(self, path: str, rng: str | None, status: int) -> None:
                with server._lock:
                    server.requests.append((path, rng, status))

        return Handler


def closed_port_url(path: str = "/file.bin") -> str:
    """A URL on 127.0.0.1 whose port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
