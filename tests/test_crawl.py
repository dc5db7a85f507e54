"""The crawler against a real HTTP server on 127.0.0.1: images, errors, slow and flaky answers, reruns."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from data_tools.address_guard import AddressPolicy
from data_tools.crawl import DownloadError, crawl, fetch, read_annotations
from data_tools.samples import ImageOptions
from data_tools.verify import verify

from image_data import jpeg_bytes, photo_crop

NO_DETECT = ImageOptions(detector="none")
LOOPBACK = AddressPolicy(allow_private=True)  # the opt-in every test that crawls the 127.0.0.1 server passes


class Handler(BaseHTTPRequestHandler):
    hits: dict = {}
    redirect_to = "/img/1.jpg"

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", ctype="image/jpeg"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path.startswith("/img/"):
            n = int(self.path.split("/")[-1].split(".")[0])
            self._send(200, jpeg_bytes(photo_crop(n, 48)))
        elif self.path == "/missing.jpg":
            self._send(404, b"not found", "text/plain")
        elif self.path == "/page.jpg":
            self._send(200, b"<html><body>a login page</body></html>", "text/html; charset=utf-8")
        elif self.path == "/slow.jpg":
            time.sleep(1.5)
            self._send(200, jpeg_bytes(photo_crop(1, 48)))
        elif self.path == "/flaky.jpg":  # fails once, then works: a retry must recover it
            if Handler.hits[self.path] == 1:
                self._send(503, b"busy", "text/plain")
            else:
                self._send(200, jpeg_bytes(photo_crop(2, 48)))
        elif self.path == "/big.jpg":
            self._send(200, b"\xff" * 300_000)
        elif self.path == "/endless.jpg":  # no length, never ends
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\xff" * 65536)
            except OSError:
                pass
        elif self.path == "/trickle.jpg":  # one byte a second
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                pass
        elif self.path == "/redirect.jpg":
            self.send_response(302)
            self.send_header("Location", Handler.redirect_to)
            self.end_headers()
        elif self.path == "/loop.jpg":
            self.send_response(302)
            self.send_header("Location", "/loop.jpg")
            self.end_headers()
        elif self.path in ("/to_file.jpg", "/to_ftp.jpg"):
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd" if self.path == "/to_file.jpg" else "ftp://x/y.jpg")
            self.end_headers()
        elif self.path == "/huge.jpg":  # declares a petabyte
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10 ** 15))
            self.end_headers()
            self.wfile.write(b"\xff" * 1000)
        elif self.path == "/bytes.jpg":  # image bytes with a wrong content type: still accepted after decoding
            self._send(200, jpeg_bytes(photo_crop(3, 48)), "application/octet-stream")
        else:
            self._send(404, b"", "text/plain")


@pytest.fixture
def server():
    Handler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_errors(server):
    assert fetch(f"{server}/img/1.jpg", policy=LOOPBACK)[:2] == b"\xff\xd8"
    cases = {f"{server}/missing.jpg": "http_404", f"{server}/page.jpg": "not_an_image",
             f"{server}/big.jpg": "too_large", "file:///etc/passwd": "bad_scheme", "ftp://x/y.jpg": "bad_scheme",
             "http://127.0.0.1:9/nothing.jpg": "connection_error"}
    for url, reason in cases.items():
        with pytest.raises(DownloadError) as e:
            fetch(url, timeout=2, retries=0, max_bytes=200_000, policy=LOOPBACK)
        assert e.value.reason == reason, url
    with pytest.raises(DownloadError) as e:
        fetch(f"{server}/slow.jpg", timeout=0.3, retries=1, policy=LOOPBACK)
    assert e.value.reason == "timeout"
    assert Handler.hits["/slow.jpg"] == 2  # the timeout was retried once
    assert fetch(f"{server}/flaky.jpg", retries=1, policy=LOOPBACK)[:2] == b"\xff\xd8" and Handler.hits["/flaky.jpg"] == 2


def test_crawl_csv_status_table_and_rerun(server, tmp_path):
    rows = [{"url": f"{server}/img/{n}.jpg", "label": ["joy", "fear"][n % 2], "caption": f"photo {n}"}
            for n in range(6)]
    rows += [{"url": f"{server}/missing.jpg", "label": "joy", "caption": ""},
             {"url": f"{server}/page.jpg", "label": "joy", "caption": ""},
             {"url": f"{server}/slow.jpg", "label": "fear", "caption": ""},
             {"url": f"{server}/flaky.jpg", "label": "fear", "caption": "flaky"},
             {"url": f"{server}/bytes.jpg", "label": "joy", "caption": ""},
             {"url": "", "label": "joy", "caption": ""},
             {"url": "file:///etc/hostname", "label": "joy", "caption": ""}]
    csv = tmp_path / "urls.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = tmp_path / "web"
    summary = crawl(str(csv), str(out), shard_size=5, threads=4, timeout=0.5, retries=1, options=NO_DETECT,
                    allow_private=True)
    assert summary["samples"] == 8 and summary["failed"] == 5 and summary["shards"] == 3
    assert summary["failures"] == {"http_404": 1, "not_an_image": 1, "timeout": 1, "missing_url": 1,
                                   "bad_scheme": 1}
    status = [json.loads(line) for p in sorted(out.glob("*_status.jsonl")) for line in p.read_text().splitlines()]
    assert len(status) == len(rows)
    by_source = {r["source"]: r for r in status}
    assert by_source[f"{server}/missing.jpg"]["reason"] == "http_404"
    assert "HTTP 404" in by_source[f"{server}/missing.jpg"]["error"]
    assert by_source[f"{server}/flaky.jpg"]["status"] == "ok"
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["fear", "joy"]
    report = verify(str(out))
    assert report["problems"] == [] and report["counts"]["train"] == {"fear": 4, "joy": 4}
    # a caption becomes the sample's text; a row without one gets the emotion sentence
    records = {}
    import tarfile
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    r = json.loads(tar.extractfile(m).read())
                    records[r["source"]] = r
    assert records[f"{server}/img/0.jpg"]["text"] == "photo 0"
    assert records[f"{server}/bytes.jpg"]["text"] == "The overall emotion conveyed is joy."
    # a rerun downloads nothing again; losing one shard's marker re-fetches only that shard
    hits = dict(Handler.hits)
    crawl(str(csv), str(out), shard_size=5, threads=4, timeout=0.5, retries=1, options=NO_DETECT,
          allow_private=True)
    assert Handler.hits == hits
    (out / "00000_stats.json").unlink()
    crawl(str(csv), str(out), shard_size=5, threads=4, timeout=0.5, retries=1, options=NO_DETECT,
          allow_private=True)
    assert Handler.hits["/img/0.jpg"] == 2 and Handler.hits["/img/5.jpg"] == 1


def test_findingemo_format(server, tmp_path):
    """FindingEmo's annotation CSV (image_path, emotion, valence, arousal) plus its URL map, several URLs a path."""
    ann = tmp_path / "annotations_single.ann"
    ann.write_text("index,user,image_path,tags,age,valence,arousal,emotion,dec_factors,ambiguity,datetime\n"
                   "0,u1,/Run_2/kids/a.jpg,Undefined,Children,2,4,Joy,FacialExpression,0,2023-09-01\n"
                   "5,u1,/Run_2/office/b.jpg,Undefined,Adults,-1,3,Anger,\"BodyLanguage,Staging\",0,2023-09-01\n"
                   "6,u2,/Run_1/gone/c.jpg,Undefined,Adults,0,1,Trust,BodyLanguage,3,2023-09-01\n")
    url_map = tmp_path / "dataset_urls_exploded.json"
    url_map.write_text(json.dumps([
        {"rel_path": "/Run_2/kids/a.jpg", "idx_url": 2, "url": f"{server}/img/10.jpg"},
        {"rel_path": "/Run_2/kids/a.jpg", "idx_url": 1, "url": f"{server}/missing.jpg"},  # tried first, 404s
        {"rel_path": "/Run_2/office/b.jpg", "idx_url": 1, "url": f"{server}/img/11.jpg"},
    ]))
    items = read_annotations(str(ann), url_map=str(url_map))
    assert items[0]["urls"] == [f"{server}/missing.jpg", f"{server}/img/10.jpg"]
    assert items[1]["valence"] == -1.0 and items[1]["arousal"] == 3.0 and items[2]["urls"] == []
    summary = crawl(str(ann), str(tmp_path / "fe"), name="FindingEmo", url_map=str(url_map), threads=2,
                    options=NO_DETECT, allow_private=True)
    assert summary["samples"] == 2 and summary["failures"] == {"missing_url": 1}
    import tarfile
    with tarfile.open(tmp_path / "fe" / "00000.tar") as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    joy = next(r for r in records if r["emotion"] == "Joy")
    assert (joy["valence"], joy["arousal"], joy["source"]) == (2.0, 4.0, f"{server}/img/10.jpg")


def test_annotation_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("link,label\nhttp://x/1.jpg,joy\n")
    with pytest.raises(ValueError, match="no URL column .*columns: link, label"):
        read_annotations(str(bad))
    with pytest.raises(ValueError, match="annotation file not found"):
        read_annotations(str(tmp_path / "none.csv"))
    assert read_annotations(str(bad), url_column="link")[0]["urls"] == ["http://x/1.jpg"]


def test_hostile_servers_are_bounded_and_recorded(server, tmp_path):
    """An endless body, a 1-byte-a-second answer, a redirect loop, redirects to file:// and ftp://, a petabyte
    Content-Length: each ends within the crawler's limits with its reason in the status table, and the shard is
    written with the good rows."""
    bad = {"endless": "too_large", "trickle": "too_slow", "loop": "redirect_loop", "to_file": "bad_redirect",
           "to_ftp": "bad_redirect", "huge": "too_large"}
    rows = [{"url": f"{server}/{name}.jpg", "label": "a"} for name in bad]
    rows += [{"url": f"{server}/img/{i}.jpg", "label": "b"} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "urls.csv", index=False)
    start = time.time()
    summary = crawl(str(tmp_path / "urls.csv"), str(tmp_path / "out"), shard_size=100, threads=4, timeout=2,
                    retries=0, max_bytes=1_000_000, max_seconds=3, options=NO_DETECT, allow_private=True)
    elapsed = time.time() - start
    assert elapsed < 30, elapsed
    assert summary["samples"] == 3 and summary["failed"] == len(bad)
    status = [json.loads(line) for line in (tmp_path / "out" / "00000_status.jsonl").read_text().splitlines()]
    reasons = {row["source"].rsplit("/", 1)[1][:-4]: row["reason"] for row in status if row["status"] == "failed"}
    assert reasons == bad, reasons
    assert not verify(str(tmp_path / "out"))["problems"]


def test_without_the_opt_in_loopback_and_a_redirect_to_it_are_refused_before_any_connection(server, tmp_path,
                                                                                           monkeypatch):
    import socket as socket_module
    from data_tools.address_guard import AddressPolicy
    # a listener on another loopback address that counts the connections it gets
    trap = socket_module.socket()
    trap.bind(("127.0.0.2", 0))
    trap.listen(8)
    trap.settimeout(0.5)
    trap_url = f"http://127.0.0.2:{trap.getsockname()[1]}/img/1.jpg"
    with pytest.raises(DownloadError, match="blocked_address: .*127.0.0.1 .*loopback"):
        fetch(f"{server}/img/1.jpg", retries=0)  # the default policy
    assert Handler.hits == {}
    with pytest.raises(DownloadError, match="blocked_address: .*169.254.169.254 .*link-local"):
        fetch("http://169.254.169.254/latest/meta-data/", retries=0, timeout=1)
    # the server is allowed (its /32), the loopback address it redirects to is not: refused at the redirect
    only_server = AddressPolicy.from_args(cidrs=["127.0.0.1/32"])
    Handler.redirect_to = trap_url
    with pytest.raises(DownloadError, match="blocked_address: .*127.0.0.2 .*loopback"):
        fetch(f"{server}/redirect.jpg", retries=0, policy=only_server)
    assert Handler.hits == {"/redirect.jpg": 1}
    with pytest.raises(socket_module.timeout):
        trap.accept()  # nothing ever connected to it
    trap.close()
    # a name is judged by the address it resolves to, resolved once, at the connect
    real = socket_module.getaddrinfo
    answers = []

    def rebinding(host, *args, **kwargs):
        if host == "images.example":
            answers.append(host)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket_module, "getaddrinfo", rebinding)
    port = server.rsplit(":", 1)[1]
    with pytest.raises(DownloadError, match="blocked_address: .*: images.example resolves to 127.0.0.1"):
        fetch(f"http://images.example:{port}/img/2.jpg", retries=0, policy=only_server.__class__())
    assert answers == ["images.example"] and "/img/2.jpg" not in Handler.hits
    assert fetch(f"http://images.example:{port}/img/2.jpg", policy=only_server)[:2] == b"\xff\xd8"
    assert answers == ["images.example"] * 2  # one resolution per connection: the address checked is the one used
    # in a crawl the refusals are status rows with their own reason
    pd.DataFrame({"url": [f"{server}/img/{i}.jpg" for i in range(3)]}).to_csv(tmp_path / "urls.csv", index=False)
    summary = crawl(str(tmp_path / "urls.csv"), str(tmp_path / "out"), threads=2, retries=0, options=NO_DETECT)
    assert summary["samples"] == 0 and summary["failures"] == {"blocked_address": 3}
    rows = [json.loads(line) for line in open(next((tmp_path / "out").glob("*_status.jsonl")))]
    assert {r["reason"] for r in rows} == {"blocked_address"} and "loopback" in rows[0]["error"]
    with pytest.raises(ValueError, match="--allow-cidr 'ten' is not a network"):
        AddressPolicy.from_args(cidrs=["ten"])


def test_a_crawl_in_two_parts_gives_the_shards_of_one_crawl(server, tmp_path):
    from data_tools.writer import Part
    rows = [{"url": f"{server}/img/{i}.jpg"} for i in range(6)] + [{"url": f"{server}/missing.jpg"}]
    pd.DataFrame(rows).to_csv(tmp_path / "urls.csv", index=False)
    kw = dict(shard_size=2, threads=2, retries=0, options=NO_DETECT, allow_private=True)
    whole = crawl(str(tmp_path / "urls.csv"), str(tmp_path / "whole"), **kw)
    assert crawl(str(tmp_path / "urls.csv"), str(tmp_path / "parts"), part=Part(0, 2), **kw) is None
    assert crawl(str(tmp_path / "urls.csv"), str(tmp_path / "parts"), part=Part(1, 2), **kw) == whole
    written = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "parts").iterdir()) and "plan.json" in written
    for name in written:
        if name != "info.json":
            assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


class KeepAliveHandler(Handler):
    """HTTP/1.1: a connection stays open for the next request; counts the connections opened to it."""
    protocol_version = "HTTP/1.1"
    connections = 0
    lock = threading.Lock()

    def setup(self):
        super().setup()
        with KeepAliveHandler.lock:
            KeepAliveHandler.connections += 1


def test_a_download_thread_keeps_its_connection_to_a_host_open(tmp_path):
    KeepAliveHandler.connections = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        rows = [{"url": f"{base}/img/{i}.jpg"} for i in range(24)] + [{"url": f"{base}/missing.jpg"}]
        pd.DataFrame(rows).to_csv(tmp_path / "urls.csv", index=False)
        summary = crawl(str(tmp_path / "urls.csv"), str(tmp_path / "out"), shard_size=13, threads=2, retries=0,
                        options=NO_DETECT, allow_private=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert summary["samples"] == 24 and summary["failures"] == {"http_404": 1}
    # 2 shards x 2 threads: one connection per thread and shard (a 404 with its body unread costs one more),
    # not one per image
    assert KeepAliveHandler.connections <= 5, KeepAliveHandler.connections


def test_download_threads_run_ahead_into_the_next_shard_while_one_item_is_slow(tmp_path):
    """A download that hangs at the end of a shard does not idle the other threads: the next shard's items start
    while it is pending (with a pool per shard they could not, and the slow item's wait would fail it)."""
    from data_tools.samples import SampleBuilder
    from data_tools.writer import ShardTask, write_shards
    next_shard_started = threading.Event()
    builder = SampleBuilder("toy", ["a"], NO_DETECT)
    photo = jpeg_bytes(photo_crop(0, 32))

    def make(item):
        if item == "slow" and not next_shard_started.wait(20):
            raise DownloadError("timeout", "the next shard's items did not start while this one was pending")
        if item == "b0":
            next_shard_started.set()
        return builder.build(photo, split="train", source=item, label=0)

    tasks = [ShardTask(str(tmp_path), "train", 0, ["a0", "a1", "slow"]), ShardTask(str(tmp_path), "train", 1,
                                                                                  ["b0", "b1"])]
    stats = write_shards(tasks, make, threads=2)
    assert [(s["samples"], s["failed"]) for s in stats] == [(3, 0), (2, 0)]
    keys = [json.loads(line)["source"] for line in (tmp_path / "00000_status.jsonl").read_text().splitlines()]
    assert keys == ["a0", "a1", "slow"]  # written in item order all the same
