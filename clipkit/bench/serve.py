"""The retrieval service under a bounded load on loopback: `clipkit serve` in its own process, text and image
queries from 1, 8 and 32 concurrent clients, then the same with hostile requests mixed in.

    clipkit bench serve [--model clipkit-tiny] [--clients 1,8,32] [--queries 300] [--bad-fraction 0.1]
                        [--bad-body-mb 200] [--samples 1000] [--out bench_serve.json]

Setup (cached, self-contained): the built-in synthetic dataset (`--samples` 64-pixel images with captions),
`--model` with seed-0 random weights (as `clipkit bench embed` makes it: the service's cost does not depend on
what the weights learned), `clipkit embed` and `clipkit index` over it (an exact index).

Each run sends `--queries` good queries (text and image alternating; image queries are the dataset's JPEGs,
base64 in JSON as the search page sends them) from N clients, each a keep-alive HTTP/1.1 connection to
127.0.0.1, one request at a time. Reported per run: p50/p99 latency of the good queries, good queries/s, their
errors (any answer but 200), and the server's peak RSS during the run (the kernel's high-water mark, reset
before each run, and 20 ms samples of VmRSS, from /proc; psutil's RSS where /proc is missing).

The mixed runs add bad requests, `--bad-fraction` of all requests (at least one of each kind), in turn:
`chunked` (a body of `--bad-body-mb` MB with no Content-Length; the client sends until the server answers),
`bomb` (a 10.9 KB PNG that decodes to 9000x9900 pixels), `eps` (PostScript, which Pillow would hand to
Ghostscript) and `garbage` (random bytes as an image). Each must be refused with its status (413, 413, 400,
400), good queries must see no error, and the server's RSS must stay flat. The mixed runs are made twice:
the RSS after the second pass must be within `--rss-tolerance-mb` of the RSS after the first (a cost that
stays behind with each bad request would grow it), and their peak no higher than the good runs' peak plus
what the limits allow: an oversize body is read up to the service's body limit (32 MB) before its 413, so each
one in flight may hold that much (the client counts them), plus the tolerance.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from .bad_inputs import eps, png_bomb
from ..cliargs import renamed
from .harness import CACHE, BenchError, bench_main, command_line, machine_facts, proc_status_bytes

BAD_KINDS = {"chunked": 413, "bomb": 413, "eps": 400, "garbage": 400}  # kind -> the status it must get
CHUNK = 1 << 16


# ------------------------------------------------------------------------------------------------- setup

def setup(model: str, samples: int, folder: Path) -> tuple[Path, list[Path]]:
    """(IDX, its shards): the synthetic dataset's training split embedded with `model` (seed-0 weights) and
    indexed exactly; cached in `folder`."""
    from ..data import write_synth_dataset
    from ..retrieval.embed import embed_shards
    from ..retrieval.index import build_index
    from .embed import model_file

    data, idx = folder / f"synth-{samples}", folder / f"index-{model}-{samples}"
    if not (data / "manifest.json").is_file():
        write_synth_dataset(data, train_samples=samples, eval_samples=100, samples_per_shard=max(samples // 4, 1),
                            image_size=64, seed=0, workers=1, downstream_train_samples=10,
                            downstream_test_samples=10)
    shards = sorted((data / "train").glob("*.tar"))
    if not (idx / "index_info.json").is_file():
        weights = model_file(model, folder)
        embeddings = folder / f"emb-{model}-{samples}"
        embed_shards(str(weights), [str(s) for s in shards], embeddings, batch_size=128, workers=0, progress=False)
        build_index(embeddings, idx, exact_below=10 ** 9)
    return idx, shards


def query_material(index_dir: Path, shard: Path, count: int = 64) -> tuple[list[str], list[bytes]]:
    """Captions (from the index's metadata) and JPEGs (from a shard) to query with."""
    import pyarrow.parquet as pq

    captions = pq.read_table(index_dir / "metadata.parquet", columns=["caption"]).column("caption").to_pylist()
    with tarfile.open(shard) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:count]
    return captions[:count], jpgs


# --------------------------------------------------------------------------------------- the HTTP client

class Client:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port, one request at a time (reopened after the
    server closes it, as it does after refusing a body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader = self.writer = None

    async def _open(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of a GET (no body) or a POST of `body`; (0, b"") when no answer came."""
        await self._open()
        method = "GET" if body is None else "POST"
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n" \
               f"Content-Length: {len(body or b'')}\r\n\r\n"
        try:
            self.writer.write(head.encode() + (body or b""))
            await self.writer.drain()
            status, content, close = await asyncio.wait_for(self._response(), 120)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
            self._close()
            return 0, b""
        if close:
            self._close()
        return status, content

    async def _response(self) -> tuple[int, bytes, bool]:
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return status, content, headers.get("connection", "").lower() == "close"


def post_chunked(port: int, path: str, total: int) -> int:
    """POST `total` body bytes with Transfer-Encoding: chunked (no Content-Length) on a new connection, until
    the server answers and closes; the answer's status (0: none). A plain blocking socket: what the server
    sent before closing stays readable after the send fails (asyncio's streams drop it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        piece, sent = b"%x\r\n" % CHUNK + b"a" * CHUNK + b"\r\n", 0
        try:
            while sent < total:
                sock.sendall(piece)
                sent += CHUNK
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed: the answer is read below
        answer = b""
        try:
            while b"\r\n" not in answer and (data := sock.recv(4096)):
                answer += data
        except (ConnectionResetError, socket.timeout):
            pass
    try:
        return int(answer.split(b"\r\n", 1)[0].split()[1])
    except (IndexError, ValueError):
        return 0


# ------------------------------------------------------------------------------------------- the server

class Server:
    """`clipkit serve` in its own process on a free loopback port, and its resident memory."""

    def __init__(self, index_dir: Path, log: Path) -> None:
        with socket.socket() as s:  # a port free a moment ago; the server binds it right after
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(log, "w")
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "clipkit", "serve", "--index", str(index_dir),
                                      "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._peak_sampled = 0
        self._sampling = threading.Event()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"clipkit serve exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if asyncio.run(Client(self.port).request("/indices-list"))[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise BenchError(f"clipkit serve did not answer within {timeout:.0f} s: see {self.log.name}")

    def rss(self) -> int:
        value = proc_status_bytes("VmRSS", self.proc.pid)
        if value is None:
            import psutil  # where there is no /proc

            value = psutil.Process(self.proc.pid).memory_info().rss
        return value

    def reset_peak(self) -> None:
        """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        self._peak_sampled = self.rss()
        self._sampling.set()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self._sampling.is_set():
            self._peak_sampled = max(self._peak_sampled, self.rss())
            time.sleep(0.02)

    def peak(self) -> int:
        """The peak since reset_peak(): the kernel's high-water mark where it has one, else the samples."""
        self._sampling.clear()
        hwm = proc_status_bytes("VmHWM", self.proc.pid)
        return max(hwm, self._peak_sampled) if hwm is not None else self._peak_sampled

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------------------------------- the runs

def make_jobs(queries: int, bad_fraction: float, seed: int) -> list[tuple[str, int]]:
    """(kind, n) in a fixed shuffled order: `queries` good ones (text and image alternating) and, with
    bad_fraction > 0, bad ones making that fraction of all requests (at least one of each kind)."""
    jobs = [("text" if i % 2 == 0 else "image", i) for i in range(queries)]
    if bad_fraction > 0:
        bad = max(math.ceil(queries * bad_fraction / (1 - bad_fraction)), len(BAD_KINDS))
        kinds = list(BAD_KINDS)
        jobs += [(kinds[i % len(kinds)], i) for i in range(bad)]
    random.Random(seed).shuffle(jobs)
    return jobs


class Payloads:
    def __init__(self, captions: list[str], jpgs: list[bytes], bad_body_bytes: int, seed: int = 0) -> None:
        def knn(**query) -> bytes:
            return json.dumps({"num_images": 10, "modality": "image", **query}).encode()

        self.text = [knn(text=c) for c in captions]
        self.image = [knn(image=base64.b64encode(j).decode()) for j in jpgs]
        rng = random.Random(seed)
        self.bad = {"bomb": knn(image=base64.b64encode(png_bomb(9000, 9900)).decode()),
                    "eps": knn(image=base64.b64encode(eps()).decode()),
                    "garbage": knn(image=base64.b64encode(rng.randbytes(4096)).decode())}
        self.bad_body_bytes = bad_body_bytes
        self.oversize_in_flight = self.oversize_in_flight_max = 0  # the bodies the server may be holding at once
        self._lock = threading.Lock()

    def _oversize(self, port: int) -> int:
        with self._lock:
            self.oversize_in_flight += 1
            self.oversize_in_flight_max = max(self.oversize_in_flight_max, self.oversize_in_flight)
        try:
            return post_chunked(port, "/knn-service", self.bad_body_bytes)
        finally:
            with self._lock:
                self.oversize_in_flight -= 1

    async def send(self, client: Client, kind: str, n: int) -> tuple[int, bytes]:
        if kind == "chunked":
            return await asyncio.to_thread(self._oversize, client.port), b""
        body = {"text": self.text, "image": self.image}.get(kind)
        return await client.request("/knn-service", body[n % len(body)] if body else self.bad[kind])


async def _load(port: int, clients: int, jobs: list[tuple[str, int]], payloads: Payloads) -> list[tuple]:
    """Every job sent by `clients` concurrent connections; (kind, status, seconds, results) per job."""
    queue = list(reversed(jobs))
    records = []

    async def one_client():
        client = Client(port)
        while queue:
            kind, n = queue.pop()
            started = time.perf_counter()
            try:
                status, content = await payloads.send(client, kind, n)
            except (OSError, ValueError, IndexError):
                client._close()
                status, content = 0, b""
            elapsed = time.perf_counter() - started
            results = len(json.loads(content)) if status == 200 else 0
            records.append((kind, status, elapsed, results))
        client._close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return records


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # nearest rank


def summarise(records: list[tuple], seconds: float) -> dict:
    good = [r for r in records if r[0] in ("text", "image")]
    ok = [r for r in good if r[1] == 200 and r[3] > 0]

    def latency(rows):
        ms = [r[2] * 1000 for r in rows]
        return {"count": len(rows), "p50_ms": _percentile(ms, 0.5), "p99_ms": _percentile(ms, 0.99),
                "mean_ms": statistics.fmean(ms) if ms else None}

    by_kind = {}
    for kind, expected in BAD_KINDS.items():
        statuses = [r[1] for r in records if r[0] == kind]
        if statuses:
            counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
            by_kind[kind] = {"expected": expected, "statuses": counts, "count": len(statuses),
                             "refused_as_expected": all(s == expected for s in statuses)}
    return {
        "seconds": seconds,
        "good": {**latency(good), "errors": len(good) - len(ok), "queries_per_s": len(ok) / seconds,
                 "text": latency([r for r in good if r[0] == "text"]),
                 "image": latency([r for r in good if r[0] == "image"])},
        "bad": {"count": sum(k["count"] for k in by_kind.values()), "by_kind": by_kind,
                "refused_as_expected": all(k["refused_as_expected"] for k in by_kind.values())},
    }


def run_one(server: Server, clients: int, jobs: list, payloads: Payloads) -> dict:
    server.reset_peak()
    payloads.oversize_in_flight_max = 0
    started = time.perf_counter()
    records = asyncio.run(_load(server.port, clients, jobs, payloads))
    seconds = time.perf_counter() - started
    peak = server.peak()
    return {"clients": clients, **summarise(records, seconds), "server_rss_peak_mb": peak / 2 ** 20,
            "server_rss_end_mb": server.rss() / 2 ** 20, "oversize_bodies_in_flight_max": payloads.oversize_in_flight_max}


# ---------------------------------------------------------------------------------------------- driver

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clipkit-tiny", help="architecture (seed-0 random weights)")
    p.add_argument("--samples", type=int, default=1000, help="rows in the index (synthetic dataset)")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients, one run each (default 1,8,32)")
    p.add_argument("--queries", type=int, default=300, help="good queries a run")
    p.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad requests in the mixed runs")
    p.add_argument("--bad-body-mb", type=float, default=200, help="size of the chunked oversize body")
    p.add_argument("--rss-tolerance-mb", type=float, default=64,
                   help="RSS growth allowed from one pass of mixed runs to the next, and peak beyond what the "
                        "oversize bodies in flight may hold (default 64)")
    renamed(p, "--cache", "--folder", default=None, metavar="DIR",
            help="where the dataset, weights and index are kept (default: a folder under ~/.cache/clipkit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE.json", default="bench_serve.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipkit bench serve", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients: comma-separated integers, got {args.clients!r}")
    if min(args.clients) < 1 or args.queries < 1 or args.samples < 4:
        p.error("--clients and --queries must be at least 1, --samples at least 4")
    if not 0 <= args.bad_fraction < 1:
        p.error("--bad-fraction must be in [0, 1)")
    return args


def drive(args: argparse.Namespace, argv: list[str]) -> dict:
    folder = Path(args.cache) if args.cache else CACHE / "bench_serve"
    folder.mkdir(parents=True, exist_ok=True)
    index_dir, shards = setup(args.model, args.samples, folder)
    captions, jpgs = query_material(index_dir, shards[0])
    payloads = Payloads(captions, jpgs, int(args.bad_body_mb * 2 ** 20), args.seed)
    load_before = os.getloadavg()
    server = Server(index_dir, folder / "serve.log")
    try:
        server.wait_ready()
        rss_ready = server.rss()
        run_one(server, 1, make_jobs(20, 0, args.seed), payloads)  # warm-up: the first queries allocate
        runs = []
        # The mixed runs twice: a cost that stays behind with each bad request would show as growth between them.
        for mix, fraction in (("good", 0.0), ("mixed", args.bad_fraction), ("mixed-again", args.bad_fraction)):
            for clients in args.clients:
                jobs = make_jobs(args.queries, fraction, args.seed + clients)
                runs.append({"mix": mix, **run_one(server, clients, jobs, payloads)})
                r = runs[-1]
                print(f"{mix:11s} {clients:3d} clients: {r['good']['queries_per_s']:7.1f} q/s  p50 "
                      f"{r['good']['p50_ms']:6.1f} ms  p99 {r['good']['p99_ms']:6.1f} ms  errors "
                      f"{r['good']['errors']}  bad {r['bad']['count']} refused as expected: "
                      f"{r['bad']['refused_as_expected']}  server peak RSS {r['server_rss_peak_mb']:.0f} MB",
                      flush=True)
        rss_end = server.rss()
    finally:
        server.stop()
    return report(args, argv, runs, rss_ready, rss_end, load_before)


def report(args, argv, runs: list[dict], rss_ready: int, rss_end: int, load_before) -> dict:
    from ..retrieval.serve import MAX_BODY_BYTES

    good = [r for r in runs if r["mix"] == "good"]
    mixed = [r for r in runs if r["mix"].startswith("mixed")]
    good_peak, mixed_peak = max(r["server_rss_peak_mb"] for r in good), max(r["server_rss_peak_mb"] for r in mixed)
    # Flat: the mixed runs' peak within what the limits allow (each oversize body in flight is read up to the body
    # limit before its 413) plus the tolerance, and no growth from one pass of mixed runs to the next.
    body_limit_mb = MAX_BODY_BYTES / 2 ** 20
    in_flight = max(r["oversize_bodies_in_flight_max"] for r in mixed)
    first, second = (max(r["server_rss_end_mb"] for r in runs if r["mix"] == m) for m in ("mixed", "mixed-again"))
    checks = {"good_query_errors": sum(r["good"]["errors"] for r in runs),
              "bad_refused_as_expected": all(r["bad"]["refused_as_expected"] for r in mixed),
              "rss_good_peak_mb": good_peak, "rss_mixed_peak_mb": mixed_peak,
              "rss_peak_growth_mb": mixed_peak - good_peak,
              "rss_peak_allowed_growth_mb": in_flight * body_limit_mb + args.rss_tolerance_mb,
              "oversize_bodies_in_flight_max": in_flight, "body_limit_mb": body_limit_mb,
              "rss_after_good_mb": good[-1]["server_rss_end_mb"], "rss_after_mixed_mb": first,
              "rss_after_mixed_again_mb": second, "rss_growth_between_mixed_passes_mb": second - first,
              "rss_tolerance_mb": args.rss_tolerance_mb}
    checks["rss_flat"] = checks["rss_growth_between_mixed_passes_mb"] <= args.rss_tolerance_mb and \
        checks["rss_peak_growth_mb"] <= checks["rss_peak_allowed_growth_mb"]
    checks["met"] = checks["good_query_errors"] == 0 and checks["bad_refused_as_expected"] and checks["rss_flat"]
    return {
        "benchmark": "clipkit serve under a bounded load on loopback: good queries, then with bad requests mixed in",
        "command": command_line("serve", argv),
        "config": {"model": args.model, "samples": args.samples, "clients": args.clients, "queries": args.queries,
                   "bad_fraction": args.bad_fraction, "bad_body_mb": args.bad_body_mb,
                   "bad_kinds": BAD_KINDS, "seed": args.seed},
        "machine": machine_facts(loadavg_before=list(load_before), loadavg_after=list(os.getloadavg())),
        "server": {"rss_ready_mb": rss_ready / 2 ** 20, "rss_end_mb": rss_end / 2 ** 20},
        "runs": runs,
        "checks": checks,
    }


def _show(result: dict) -> None:
    c = result["checks"]
    print(f"good-query errors {c['good_query_errors']}, bad requests refused as expected: "
          f"{c['bad_refused_as_expected']}, server peak RSS {c['rss_good_peak_mb']:.0f} MB (good) -> "
          f"{c['rss_mixed_peak_mb']:.0f} MB (mixed; at most {c['oversize_bodies_in_flight_max']} oversize bodies "
          f"in flight), {c['rss_growth_between_mixed_passes_mb']:+.0f} MB from one mixed pass to the next: "
          f"{'flat' if c['rss_flat'] else 'NOT flat'}")


def main(argv: list[str] | None = None) -> int:
    return bench_main("serve", argv, parse_args, drive, _show)


if __name__ == "__main__":
    sys.exit(main())
