"""An HTTP server of a shard (or photo) directory with faults on chosen files: an error status, a connection dropped
mid-body, a body that stalls; a delay before every answer. Used in a thread by the reader tests and as a script inside
a node's namespace:
    python tests/shard_server.py DIR --bind ADDR --port P [--fail NAME=404] [--drop NAME] [--stall NAME] [--delay S]
prints "serving http://ADDR:PORT" once it accepts connections."""
import argparse
import sys
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterable, Tuple


class ShardHandler(BaseHTTPRequestHandler):
    def __init__(self, *args, root: Path, fail: Dict[str, int], drop: Iterable[str], stall: Iterable[str],
                 log: list, delay: float = 0.0, **kw):
        self.root, self.fail, self.drop, self.stall, self.requests = root, fail, set(drop), set(stall), log
        self.delay = delay
        super().__init__(*args, **kw)

    def do_GET(self):
        name = self.path.lstrip("/")
        self.requests.append(name)
        time.sleep(self.delay)
        path = self.root / name
        if name in self.fail:
            self.send_error(self.fail[name])
            return
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.drop or name in self.stall:
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if name in self.stall:
                time.sleep(3600)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(root: Path, bind: str = "127.0.0.1", port: int = 0, fail: Dict[str, int] = None, drop=(), stall=(),
          delay: float = 0.0) -> Tuple[ThreadingHTTPServer, list]:
    """A started server (daemon thread) and the list of file names requested from it."""
    requests: list = []
    handler = partial(ShardHandler, root=Path(root), fail=fail or {}, drop=drop, stall=stall, log=requests,
                      delay=delay)
    httpd = ThreadingHTTPServer((bind, port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail", action="append", default=[], help="NAME=STATUS")
    parser.add_argument("--drop", action="append", default=[])
    parser.add_argument("--stall", action="append", default=[])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    args = parser.parse_args()
    fail = {name: int(code) for name, code in (f.split("=") for f in args.fail)}
    httpd, _ = serve(Path(args.root), args.bind, args.port, fail, args.drop, args.stall, args.delay)
    print(f"serving http://{args.bind}:{httpd.server_address[1]}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
