"""A loopback HTTP file server for download tests (train.get_coco, train.pretrained).

    with LoopbackServer({"/zips/a.zip": data}, cuts={"/zips/a.zip": [1000]}) as srv: urlopen(srv.url + "/zips/a.zip")

Serves bytes from memory on 127.0.0.1 (an ephemeral port) in a thread. It honours
`Range: bytes=N-` with 206 + Content-Range unless ranges=False (then it answers 200 with the
whole file, as servers without range support do). cuts[path] lists byte counts: each GET of that
path takes the next one, sends that much of the body after promising all of it, and closes the
connection (a dropped transfer). `log` records (path, Range header or None) per GET.
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    def __init__(self, files: dict[str, bytes], ranges: bool = True, cuts: dict[str, list[int]] | None = None) -> None:
        self.files, self.ranges = files, ranges
        self.cuts = {k: list(v) for k, v in (cuts or {}).items()}
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:   # quiet
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.log.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if server.ranges and m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                body = data[start:]
                cut = server.cuts.get(self.path)
                if cut:
                    self.wfile.write(body[:cut.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of `path`, in order (None: no Range)."""
        return [r for p, r in self.log if p == path]

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def closed_port_url() -> str:
    """http://127.0.0.1:PORT with nothing listening on PORT (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
