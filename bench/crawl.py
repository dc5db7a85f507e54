"""This crawler side by side with img2dataset: the same real photos from a loopback HTTP server with per-request
latency, a cost per new connection and a share of failures (404s, timeouts, HTML pages, broken bytes), the same
processes, threads, size, quality, timeout and retries; images/s, successes by reason and bytes written, for both, and
for this crawler in 1, 2 and 4 parts; shard-folder images/s per process on the same photos. Writes
bench/results/crawl.json. img2dataset pins webdataset 0.2, so it runs from a venv of its own that this script makes
(bench/.venvs/img2dataset) unless --img2dataset names an executable."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from statistics import median
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.photos import make_web_photos  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402
from runtime.cli import HelpFormatter  # noqa: E402

IMG2DATASET = "img2dataset==1.47.0"
# share of URLs that fail, and how: a 404, an answer later than the client's timeout, an HTML page, broken bytes
FAILURES = {"http_404": 0.05, "timeout": 0.03, "html": 0.03, "broken": 0.02}


class PhotoServer(ThreadingHTTPServer):
    """HTTP/1.1 with keep-alive; every answer waits `latency` s (time to first byte), every new connection
    `connect_cost` s more (the round trips of a TCP and TLS handshake that loopback does not have)."""
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, photos: List[bytes], kinds: List[str], latency: float, connect_cost: float, hang: float):
        self.photos, self.kinds, self.latency, self.connect_cost, self.hang = photos, kinds, latency, connect_cost, hang
        self.connections = self.requests = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client that gave up
            super().handle_error(request, client_address)

    def count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.server.count("connections")
        time.sleep(self.server.connect_cost)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        server = self.server
        server.count("requests")
        time.sleep(server.latency)
        try:
            index = int(self.path.strip("/").split(".")[0])
            kind = server.kinds[index]
        except (ValueError, IndexError):
            return self._send(404, b"no such photo", "text/plain")
        if kind == "http_404":
            return self._send(404, b"not found", "text/plain")
        if kind == "timeout":
            time.sleep(server.hang)
        if kind == "html":
            return self._send(200, b"<!doctype html><html><body>sign in to see this photo</body></html>",
                              "text/html; charset=utf-8")
        body = server.photos[index]
        self._send(200, body[:len(body) // 3] if kind == "broken" else body, "image/jpeg")


def url_kinds(n: int, seed: int = 0) -> List[str]:
    rng = np.random.default_rng(seed)
    kinds = ["ok"] * n
    order = rng.permutation(n)
    start = 0
    for kind, share in FAILURES.items():
        for i in order[start:start + round(share * n)]:
            kinds[i] = kind
        start += round(share * n)
    return kinds


def img2dataset_executable(given: str) -> str:
    if given:
        return given
    venv = REPO / "bench" / ".venvs" / "img2dataset"
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"making {venv} with {IMG2DATASET} (it pins webdataset 0.2, so not in .venv)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", IMG2DATASET], check=True)
    return str(exe)


def run_ours(urls: Path, out: Path, procs: int, threads: int, args, parts: bool = False,
             detector: str = "none") -> float:
    common = [sys.executable, "-m", "data_tools", "crawl", str(urls), "--out", str(out), "--name", "bench",
              "--threads", str(threads), "--timeout", str(args.timeout), "--retries", "0", "--max-side",
              str(args.max_side), "--quality", str(args.quality), "--detector", detector, "--allow-private",
              "--shard-size", str(args.shard_size)]
    start = time.perf_counter()
    if parts:  # separate processes, one part each, as Slurm array tasks run them
        running = [subprocess.Popen(common + ["--workers", "1", "--part", f"{i}/{procs}"], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(procs)]
    else:
        running = [subprocess.Popen(common + ["--workers", str(procs)], cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)]
    for p in running:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"crawl exited {p.returncode}: {err.decode()[-2000:]}")
    return time.perf_counter() - start


def run_img2dataset(exe: str, urls: Path, out: Path, procs: int, threads: int, args) -> float:
    cmd = [exe, "--url_list", str(urls), "--input_format", "csv", "--url_col", "url", "--output_format",
           "webdataset", "--output_folder", str(out), "--processes_count", str(procs), "--thread_count",
           str(threads), "--image_size", str(args.max_side), "--resize_mode", "keep_ratio_largest",
           "--resize_only_if_bigger", "True", "--encode_quality", str(args.quality), "--number_sample_per_shard",
           str(args.shard_size), "--timeout", str(int(args.timeout)), "--retries", "0", "--distributor",
           "multiprocessing"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"img2dataset exited {done.returncode}: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def ours_counts(out: Path) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for stats in sorted(out.glob("[0-9]*_stats.json")):
        s = json.loads(stats.read_text())
        counts["success"] = counts.get("success", 0) + s["samples"]
        for reason, n in s["failures"].items():
            counts[reason] = counts.get(reason, 0) + n
    return counts


def img2dataset_reason(message: str) -> str:
    """img2dataset's error messages, in this crawler's reason names."""
    m = message.lower()
    for needle, reason in (("404", "http_404"), ("timed out", "timeout"), ("timeout", "timeout"),
                           ("decod", "decode_error")):
        if needle in m:
            return reason
    return message[:60]


def img2dataset_counts(out: Path) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for stats in sorted(out.glob("[0-9]*_stats.json")):
        for message, n in json.loads(stats.read_text())["status_dict"].items():
            reason = "success" if message == "success" else img2dataset_reason(message)
            counts[reason] = counts.get(reason, 0) + n
    return counts


def tar_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.tar"))


def measure(tool: str, fn, out: Path, n: int, server: PhotoServer) -> Dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    server.connections = server.requests = 0
    wall = fn(out)
    counts = ours_counts(out) if tool == "ours" else img2dataset_counts(out)
    return {"tool": tool, "wall_s": round(wall, 2), "images_per_s": round(counts.get("success", 0) / wall, 1),
            "rows_per_s": round(n / wall, 1), "counts": dict(sorted(counts.items())), "tar_bytes": tar_bytes(out),
            "connections": server.connections, "requests": server.requests}


def side_by_side(exe, urls, work, n, server, args, procs, threads, rounds) -> Dict:
    """Alternating runs (ours, img2dataset, ours, ...): the ratio of each pair, so the machine's drift cancels."""
    runs = {"ours": [], "img2dataset": []}
    for _ in range(rounds):
        runs["ours"].append(measure("ours", lambda o: run_ours(urls, o, procs, threads, args), work / "ours", n,
                                    server))
        runs["img2dataset"].append(measure("img2dataset", lambda o: run_img2dataset(exe, urls, o, procs, threads,
                                                                                    args), work / "i2d", n, server))
    ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["ours"], runs["img2dataset"])]
    point = {"processes": procs, "threads": threads, "ratio_images_per_s": [round(r, 2) for r in ratios],
             "ratio_median": round(median(ratios), 2), "runs": runs}
    print(f"  {procs} process(es) x {threads} threads: ours {[r['images_per_s'] for r in runs['ours']]} img/s, "
          f"img2dataset {[r['images_per_s'] for r in runs['img2dataset']]} img/s, ratio {point['ratio_median']}",
          flush=True)
    return point


def shard_folder_rates(photos: Path, work: Path, args) -> List[Dict]:
    """shard-folder on the same photos (as files), images/s per process: 1 and 2 processes, no detector and the
    default one."""
    rows = []
    for detector, limit in (("none", None), ("hog+face", args.detector_photos)):
        src = photos
        if limit:
            src = work / "subset"
            shutil.rmtree(src, ignore_errors=True)
            for f in sorted(photos.rglob("*.jpg"))[:limit]:
                (src / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, src / f.parent.name / f.name)
        count = len(list(src.rglob("*.jpg")))
        for workers in (1, 2):
            out = work / "folder_out"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "data_tools", "shard-folder", "bench", str(src), "--generic",
                            "--ratios", "1", "0", "0", "--out", str(out), "--workers", str(workers),
                            "--detector", detector, "--shard-size", str(args.shard_size), "--min-shards", "4"],
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            rows.append({"detector": detector, "processes": workers, "photos": count, "wall_s": round(wall, 2),
                         "images_per_s": round(count / wall, 1),
                         "images_per_s_per_process": round(count / wall / workers, 1)})
            print(f"  shard-folder, detector {detector}, {workers} process(es): {rows[-1]['images_per_s']} img/s",
                  flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--photos", type=int, default=2000, help="URLs (real photo crops, 400-640 x 300-427 px)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before each answer")
    parser.add_argument("--connect-cost", type=float, default=0.1, help="seconds more for a new connection")
    parser.add_argument("--timeout", type=float, default=2.0, help="client timeout (a 'timeout' URL answers later)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating pairs per point")
    parser.add_argument("--points", default="1x16,2x16,4x16,2x4,2x64", help="PROCESSESxTHREADS, side by side")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4], help="part counts of this crawler")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--shard-size", type=int, default=125)
    parser.add_argument("--detector-photos", type=int, default=200, help="photos for the rows with a detector")
    parser.add_argument("--img2dataset", default="", help="an img2dataset executable (default: make a venv)")
    parser.add_argument("--out", default="bench/results/crawl.json")
    args = parser.parse_args()
    exe = img2dataset_executable(args.img2dataset)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_web_photos(work / "photos", args.photos)
        files = sorted((work / "photos").rglob("*.jpg"), key=lambda p: p.name)
        photos = [f.read_bytes() for f in files]
        kinds = url_kinds(len(photos))
        server = PhotoServer(photos, kinds, args.latency, args.connect_cost, hang=args.timeout + 1.5)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        urls = work / "urls.csv"
        urls.write_text("url\n" + "".join(f"http://127.0.0.1:{server.server_port}/{i:05d}.jpg\n"
                                          for i in range(len(photos))))
        n = len(photos)
        expected = {k: kinds.count(k) for k in sorted(set(kinds))}
        print(f"{n} URLs: {expected}; latency {args.latency} s, new connection {args.connect_cost} s", flush=True)
        points = [side_by_side(exe, urls, work, n, server, args, *map(int, p.split("x")), args.rounds)
                  for p in args.points.split(",")]
        saved = server.connect_cost
        server.connect_cost = 0.0
        print("no cost per connection:", flush=True)
        free_connect = side_by_side(exe, urls, work, n, server, args, 2, 16, args.rounds)
        server.connect_cost = saved
        print("this crawler in parts (separate processes, 16 threads each):", flush=True)
        parts = []
        for count in args.parts:
            parts.append({"parts": count, **measure("ours", lambda o: run_ours(urls, o, count, 16, args, parts=True),
                                                    work / "ours", n, server)})
            print(f"  {count} part(s): {parts[-1]['images_per_s']} img/s", flush=True)
        detector = measure("ours", lambda o: run_ours(urls, o, 2, 16, args, detector="hog+face"), work / "ours", n,
                           server)
        print(f"this crawler with the default detector (hog+face), 2 x 16: {detector['images_per_s']} img/s",
              flush=True)
        server.shutdown()
        folder = shard_folder_rates(work / "photos", work, args)
    headline = points[[p["processes"] for p in points].index(2)] if any(p["processes"] == 2 for p in points) \
        else points[0]
    result = {"photos": n, "url_kinds": expected, "latency_s": args.latency, "connect_cost_s": args.connect_cost,
              "timeout_s": args.timeout, "retries": 0, "max_side": args.max_side, "quality": args.quality,
              "img2dataset": IMG2DATASET, "cpus": os.cpu_count(),
              "headline": {"processes": headline["processes"], "threads": headline["threads"],
                           "ratio_images_per_s": headline["ratio_median"],
                           "success_ours": [r["counts"].get("success", 0) for r in headline["runs"]["ours"]],
                           "success_img2dataset": [r["counts"].get("success", 0)
                                                   for r in headline["runs"]["img2dataset"]]},
              "side_by_side": points, "no_connect_cost": free_connect, "parts": parts,
              "ours_with_detector_hog_face": detector, "shard_folder": folder}
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
