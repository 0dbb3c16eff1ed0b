"""The retrieval service under hostile input, on real uvicorn servers on 127.0.0.1: bodies counted as they
arrive (chunked bodies included), decompression bombs and formats that run external programs refused before
decoding, image decodes capped, 500s that name no file, a Host check against DNS rebinding; and the image
decoder that never touches Pillow's process-wide limit."""
import base64
import io
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from clipkit.bench.bad_inputs import eps, png_bomb
from clipkit.data import ShardStream
from clipkit.data.decode import ImageTooLarge, open_image
from clipkit.errors import UserError
from clipkit.retrieval.search import Searcher
from clipkit.retrieval.serve import LimitBody, allowed_hosts, create_app
from data_shards import good_samples, samples_shard
from helpers import serving
from index_reference import QUERIES


@pytest.fixture(scope="module")
def export(nano_index):
    return nano_index

LIMIT = 1 << 20  # body bytes


@pytest.fixture(scope="module")
def searcher(export):
    return Searcher(export[0])


@pytest.fixture(scope="module")
def port(searcher):
    with serving(create_app(searcher, max_body=LIMIT, max_image_pixels=1 << 20)) as p:
        yield p


def knn(port: int, **body) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/knn-service", json=body, timeout=60)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(size=(48, 40), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Item 2: a body is counted as it arrives


def send_chunked(port: int, path: str, total: int, chunk: int = 1 << 16) -> tuple[int, bytes]:
    """POST `total` bytes with Transfer-Encoding: chunked (no Content-Length) over a raw socket, until the
    server answers or stops reading; returns (body bytes the client managed to send, the response)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    sent, piece = 0, b"%x\r\n" % chunk + b"x" * chunk + b"\r\n"
    sock.settimeout(60)
    try:
        while sent < total:
            sock.sendall(piece)
            sent += chunk
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: what it did not read was never sent
    response = b""
    try:
        while data := sock.recv(65536):
            response += data
    except ConnectionResetError:
        pass
    sock.close()
    return sent, response


@pytest.mark.parametrize("path", ["/knn-service", "/metadata"])
def test_chunked_body_over_the_limit_is_refused_as_it_arrives(port, path):
    total = 200 << 20
    sent, response = send_chunked(port, path, total)
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"request body over the limit of 1048576 bytes" in response
    # the server stopped reading and closed: the client could not push the 200 MB (kernel buffers hold a few MB)
    assert sent < LIMIT + (48 << 20), sent


def test_the_app_never_receives_more_than_the_limit():
    """LimitBody in front of an app that reads every byte it is given, under uvicorn: chunked and
    Content-Length bodies over the limit get 413, and the app saw at most the limit."""
    seen = []

    async def reader(scope, receive, send):
        if scope["type"] != "http":
            return
        got, more = 0, True
        try:
            while more:
                message = await receive()
                got += len(message.get("body", b""))
                more = message.get("more_body", False)
        finally:
            seen.append(got)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % got})

    with serving(LimitBody(reader, LIMIT)) as p:
        url = f"http://127.0.0.1:{p}/"
        ok = httpx.post(url, content=iter([b"y" * 4096] * 16), timeout=60)  # chunked, under the limit
        assert ok.status_code == 200 and ok.text == str(4096 * 16)
        sent, response = send_chunked(p, "/", 50 << 20, chunk=1 << 15)
        assert response.startswith(b"HTTP/1.1 413") and seen[-1] <= LIMIT, (response[:200], seen)
        before = len(seen)
        res = httpx.post(url, content=b"z" * (LIMIT + 1), timeout=60)  # Content-Length says it: refused unread
        assert res.status_code == 413 and len(seen) == before


# ---------------------------------------------------------------------------------------------------------
# Item 3: query images within bounds


def test_decompression_bomb_is_refused_from_its_header(port):
    bomb = png_bomb(9000, 9900)  # 10.9 KB, 89 megapixels: under Pillow's own limit, over the service's
    assert len(bomb) < 12_000 and Image.open(io.BytesIO(bomb)).size == (9000, 9900)
    started = time.perf_counter()
    res = knn(port, image=b64(bomb), num_images=3)
    assert res.status_code == 413, res.text
    assert "image too large" in res.json()["error"] and "1048576 pixels" in res.json()["error"]
    assert time.perf_counter() - started < 5  # refused, not decoded (a full decode and encode takes longer)
    ok = knn(port, image=b64(png((1024, 1024))), num_images=3)  # at the limit: answered
    assert ok.status_code == 200 and len(ok.json()) == 3, ok.text


@pytest.mark.parametrize("data", [eps(), png(fmt="GIF"), png(fmt="BMP"), png(fmt="TIFF")],
                         ids=["eps", "gif", "bmp", "tiff"])
def test_only_jpeg_png_and_webp_are_opened(port, data):
    res = knn(port, image=b64(data), num_images=3)
    assert res.status_code == 400 and "not a JPEG, PNG or WebP image" in res.json()["error"], res.text


def test_webp_and_jpeg_queries_are_answered(port):
    for fmt in ("WEBP", "JPEG"):
        res = knn(port, image=b64(png(fmt=fmt)), num_images=4)
        assert res.status_code == 200 and len(res.json()) == 4, (fmt, res.text)


def test_decodes_are_capped_the_rest_wait_or_get_503(searcher):
    app = create_app(searcher, max_decodes=1, decode_wait=1.0)
    slots = app.state.query_images
    with serving(app) as p:
        with slots.slot():  # the one slot is taken for longer than a query waits
            started = time.perf_counter()
            busy = knn(p, image=b64(png()), num_images=2)
            assert busy.status_code == 503 and "busy" in busy.json()["error"], busy.text
            assert busy.headers["retry-after"] == "1" and time.perf_counter() - started >= 1.0
        answers = []
        with slots.slot():  # taken for less than the wait: the query waits, then is answered
            worker = threading.Thread(target=lambda: answers.append(knn(p, image=b64(png()), num_images=2)))
            worker.start()
            time.sleep(0.4)
            assert not answers  # still waiting for the slot
        worker.join(60)
        assert answers[0].status_code == 200, answers[0].text
        assert knn(p, text=QUERIES[0], num_images=2).status_code == 200  # text queries take no slot


# ---------------------------------------------------------------------------------------------------------
# Item 7: errors name no file and no object


def test_server_errors_carry_an_id_and_no_path(export, tmp_path, caplog):
    index_dir, _, synth = export
    shards = tmp_path / "shards"
    shutil.copytree(Path(synth.train_spec).parent, shards)
    first = sorted(shards.glob("*.tar"))[0]
    app = create_app(Searcher(index_dir), shards=synth.train_spec.replace(str(Path(synth.train_spec).parent),
                                                                          str(shards)))
    first.unlink()  # a shard gone after start-up: reading a thumbnail from it fails inside the service
    with caplog.at_level(logging.ERROR, logger="clipkit.serve"), serving(app) as p:
        res = httpx.get(f"http://127.0.0.1:{p}/thumbnail/0", timeout=60)
    assert res.status_code == 500, res.text
    body = res.json()
    assert str(shards) not in res.text and first.name not in res.text and "FileNotFoundError" not in res.text
    assert len(body["id"]) == 12 and body["id"] in body["error"]
    logged = [r for r in caplog.records if r.name == "clipkit.serve" and body["id"] in r.getMessage()]
    assert logged and first.name in str(logged[0].exc_info[1])  # the details are in the log, under the id


@pytest.mark.parametrize("data", [b"\x00garbage bytes, no image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40],
                         ids=["garbage", "bad-png-header"])
def test_bad_image_reasons_carry_no_object_repr(port, data):
    res = knn(port, image=b64(data), num_images=3)
    assert res.status_code == 400, res.text
    reason = res.json()["error"]
    assert reason.startswith("the image could not be decoded") and "0x" not in reason and "<" not in reason


# ---------------------------------------------------------------------------------------------------------
# Item 8: the Host header must name the service


def test_host_header_must_name_a_loopback_service(port):
    url = f"http://127.0.0.1:{port}/indices-list"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(url, headers={"host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):
        res = httpx.get(url, headers={"host": host})
        assert res.status_code == 400 and "Invalid host header" in res.text, host
    res = httpx.post(f"http://127.0.0.1:{port}/knn-service", json={"text": QUERIES[0]},
                     headers={"host": "rebound.example"})
    assert res.status_code == 400  # a rebound page cannot query either


def test_allowed_hosts_follow_the_bind():
    assert allowed_hosts("127.0.0.1", [""]) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("::1", ["proxy.internal"]) == ["localhost", "127.0.0.1", "[::1]", "proxy.internal"]
    assert allowed_hosts("10.0.0.5", []) == ["10.0.0.5"]
    assert allowed_hosts("0.0.0.0", ["search.example.org", "fe80::1"]) == ["search.example.org", "[fe80::1]"]
    assert allowed_hosts("::", ["*"]) == ["*"]
    for wildcard in ("0.0.0.0", "::", ""):
        with pytest.raises(UserError, match="--allowed-hosts"):
            allowed_hosts(wildcard, [""])


def test_serve_on_every_interface_needs_allowed_hosts(export):
    proc = subprocess.run([sys.executable, "-m", "clipkit", "serve", "--index", str(export[0]), "--host", "0.0.0.0",
                           "--port", "9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "listens on every interface" in lines[0] and "--allowed-hosts" in lines[0]


# ---------------------------------------------------------------------------------------------------------
# Item 9: Pillow's process-wide limit is never touched


def test_pillow_global_limit_is_never_changed_under_threads():
    default = Image.MAX_IMAGE_PIXELS
    images = [png((20 + i, 20)) for i in range(16)]
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    def decode(n):
        for i in range(300):
            assert open_image(images[(n + i) % 16], 1 << 20).size == (20 + (n + i) % 16, 20)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads interleave inside each open
    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        decoders = [threading.Thread(target=decode, args=(n,)) for n in range(6)]
        for t in decoders:
            t.start()
        for t in decoders:
            t.join()
        stop.set()
        watcher.join()
    finally:
        sys.setswitchinterval(interval)
    assert seen == {default} and Image.MAX_IMAGE_PIXELS == default


def test_over_pillows_ceiling_is_too_large_even_without_a_limit_of_ours():
    bomb = png_bomb(14000, 14000, truncate=True)  # 196 megapixels: over twice Pillow's limit
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_PIXELS"):
        open_image(bomb, None)
    with pytest.raises(ImageTooLarge, match="9000x9900 pixels is above the limit of 1000000"):
        open_image(png_bomb(9000, 9900), 1_000_000)
    assert open_image(png_bomb(9000, 9900), None).size == (9000, 9900)  # header only: nothing decoded yet


def test_pipeline_counts_a_bomb_as_too_large(tmp_path, parts):
    """Training's own limit unset (None): Pillow's ceiling still refuses the bomb, and the stream counts it
    as a bad sample like any image over data.max_image_pixels."""
    good = good_samples("g", 4)
    path = samples_shard(tmp_path / "s.tar", good[:2] + [("bomb", png_bomb(14000, 14000, truncate=True), b"a bomb")]
                  + good[2:])
    stream = ShardStream([path], parts[0], parts[1], batch_size=4, shuffle=False, epochs=1, max_image_pixels=None)
    keys, skipped = [], {}
    for batch in stream:
        keys += batch.keys
        for reason, n in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert keys == [k for k, _, _ in good] and skipped == {"image_too_large": 1}
