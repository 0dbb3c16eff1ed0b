"""`clipkit serve`: an HTTP retrieval service over an index, shaped like clip-retrieval's back end.

    clipkit serve --index IDX [--checkpoint CK [--model NAME]] [--host 127.0.0.1] [--port 8000]
                  [--data 'data/{00000..00009}.tar'] [--allowed-hosts NAMES] [--max-body-bytes N]
                  [--max-image-pixels N] [--max-decodes N]

    GET  /indices-list   ["NAME"]  (the index directory's name, or --name)
    POST /knn-service    {"text" | "image" (base64) | "embedding_input", "modality": "image"|"text",
                          "num_images": k, "indice_name": NAME}  ->  [{"id", "similarity", "key", "caption", ...}]
    POST /metadata       {"ids": [...], "indice_name": NAME}  ->  [{"id", "metadata": {...}}]
    GET  /thumbnail/ID   the row's image, read from the shards given with --data
    GET  /               a search page

clip-retrieval's other request fields (deduplicate, use_safety_model, use_violence_detector, use_mclip,
aesthetic_score, num_result_ids) are accepted and ignored: none of those models exist here. `image_url` is
refused: the service fetches nothing from the network. Every bad request gets a 4xx answer with
{"error": "<reason>"}; a fault of the service a 500 with {"error": ..., "id": ...}, its details in the log.

Every input is bounded before it costs memory: request bodies are counted as they arrive (413 past the
limit, chunked or not), query images are JPEG, PNG or WebP only, their pixel count is checked from the header
before decoding, and at most `max_decodes` are decoded at once. The Host header must name the service.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time, and the
# request models are local to create_app (they would not resolve from strings).
import argparse
import base64
import binascii
import html
import ipaddress
import json
import logging
import tarfile
import threading
import uuid
from contextlib import contextmanager
from typing import Literal

import numpy as np

from ..errors import UserError
from ..extras import require
from .search import MODEL_HELP, Searcher

MAX_BODY_BYTES = 32 * 1024 * 1024  # a base64 photo is a few MB; anything far larger is refused unread
MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# A query image only becomes one 224-ish pixel input: 16.7 megapixels (4096x4096) takes any phone photo, and
# decodes to 50 MB, against the 268 MB that Pillow's own limit (89 megapixels, training's) lets one image take.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_DECODES = 4  # query images decoded at once; the others wait up to DECODE_WAIT_S, then get a 503
DECODE_WAIT_S = 10.0
# Decoded in-process by Pillow; EPS (Ghostscript) and the other formats that run external programs never open.
QUERY_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # Host header names a loopback service answers to

log = logging.getLogger("clipkit.serve")


class ShardImages:
    """Where each sample's image lies in local uncompressed tar shards: key -> (file, offset, size, ext).

    Built from tar headers alone at start-up; serving a thumbnail is then one seek and one read."""

    def __init__(self, spec: str) -> None:
        from ..data.shards import expand_shards, is_remote

        self.places: dict[str, tuple[str, int, int, str]] = {}
        for url in expand_shards(spec):
            if is_remote(url):
                raise UserError(f"--data must name local tar files; {url} is remote")
            self._scan(url)

    def _scan(self, path: str) -> None:
        from ..data.tario import split_name

        try:
            with tarfile.open(path, mode="r:") as tar:  # "r:": offsets only mean something uncompressed
                for member in tar:
                    base, ext = split_name(member.name)
                    if base is not None and member.isfile() and ext in MEDIA_TYPES:
                        self.places.setdefault(base.rsplit("/", 1)[-1], (path, member.offset_data, member.size, ext))
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"--data: {path} is not a readable uncompressed tar file: {e}") from None

    def read(self, key: str) -> tuple[bytes, str] | None:
        place = self.places.get(key)
        if place is None:
            return None
        path, offset, size, ext = place
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size), MEDIA_TYPES[ext]


def _too_large(limit: int):
    from starlette.exceptions import HTTPException

    # Raised from `receive`: FastAPI's body reader passes HTTPExceptions on, so the route answers 413.
    return HTTPException(413, f"request body over the limit of {limit} bytes")


class LimitBody:
    """Pure ASGI middleware: a request body over `limit` bytes is refused with 413 on every route, at once when
    its Content-Length says so, else by counting the bytes as they arrive (a chunked body has no
    Content-Length): nothing past the limit is read. The 413 closes the connection, so the rest is not read
    either."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        received, tripped, started = 0, False, False

        async def counting_receive():
            nonlocal received, tripped
            if tripped:
                raise _too_large(self.limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    tripped = True
                    raise _too_large(self.limit)
            return message

        async def closing_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if tripped:  # the unread rest of the body must not be taken for a next request
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counting_receive, closing_send)
        except Exception as e:
            if started or not (tripped and getattr(e, "status_code", None) == 413):
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse({"error": f"request body over the limit of {self.limit} bytes"}, status_code=413,
                           headers={"connection": "close"})(scope, receive, send)


class QueryImages:
    """Query images -> RGB PIL images within bounds: JPEG, PNG or WebP only, at most `max_pixels` (read from
    the header, before any pixel is decoded), at most `slots` decoded (and encoded) at once; a query that
    finds no free slot within `wait` seconds gets a 503."""

    def __init__(self, max_pixels: int, slots: int, wait: float) -> None:
        self.max_pixels, self.slots, self.wait = max_pixels, slots, wait
        self.free = threading.BoundedSemaphore(slots)

    @contextmanager
    def slot(self):
        from starlette.exceptions import HTTPException

        if not self.free.acquire(timeout=self.wait):
            raise HTTPException(503, f"busy: {self.slots} query images are being decoded; retry shortly",
                                headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self.free.release()

    def decode(self, data: bytes):
        from PIL import UnidentifiedImageError
        from starlette.exceptions import HTTPException

        from ..data.decode import ImageTooLarge, open_image

        # Reasons name the problem only: Pillow's messages carry object reprs and internal detail.
        try:
            im = open_image(data, self.max_pixels, QUERY_IMAGE_FORMATS)
        except ImageTooLarge:
            raise HTTPException(413, f"image too large: more than the service's limit of {self.max_pixels} "
                                     "pixels") from None
        except UnidentifiedImageError:
            raise UserError("the image could not be decoded: not a JPEG, PNG or WebP image") from None
        except Exception as e:  # a damaged header: Pillow raises SyntaxError, OSError, ValueError, ...
            raise UserError(f"the image could not be decoded: damaged header ({type(e).__name__})") from None
        try:
            return im.convert("RGB")  # decodes the pixels: truncated data fails here
        except Exception as e:
            raise UserError(f"the image could not be decoded: truncated or damaged data ({type(e).__name__})") \
                from None


def host_names(host: str) -> str:
    """A host as the Host header carries it: IPv6 literals in brackets."""
    host = host.strip().lower()
    try:
        return f"[{host}]" if ipaddress.ip_address(host.strip("[]")).version == 6 else host
    except ValueError:
        return host


def allowed_hosts(bind: str, given: list[str]) -> list[str]:
    """The Host header values the service answers (DNS rebinding: a page on another site that resolves its
    name to 127.0.0.1 still sends its own name). A loopback bind: the loopback names, the bound host and any
    given; a wildcard bind (0.0.0.0, ::) listens on every interface and needs the names said (or '*')."""
    named = [host_names(h) for h in given if h.strip()]
    if "*" in named:
        return ["*"]
    bare = bind.strip("[]")
    if bare in ("", "0.0.0.0", "::"):
        if not named:
            raise UserError(f"--host {bind or '(empty)'} listens on every interface: name the host names clients "
                            "will use with --allowed-hosts (e.g. --allowed-hosts search.example.org,10.0.0.5), or "
                            "--allowed-hosts '*' to accept any Host header")
        return named
    try:
        loopback = bare == "localhost" or ipaddress.ip_address(bare).is_loopback
    except ValueError:
        loopback = False
    names = [*LOOPBACK_HOSTS] if loopback else []
    return list(dict.fromkeys([*names, host_names(bind), *named]))


def create_app(searcher: Searcher, name: str | None = None, shards: str | None = None, max_k: int = 1000,
               max_body: int = MAX_BODY_BYTES, max_image_pixels: int = MAX_IMAGE_PIXELS,
               max_decodes: int = MAX_DECODES, decode_wait: float = DECODE_WAIT_S,
               hosts: list[str] | tuple[str, ...] = LOOPBACK_HOSTS):
    """The FastAPI application serving one index. `hosts`: the Host header values answered (['*']: any)."""
    require("fastapi", "the retrieval service")
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    name = name or searcher.dir.resolve().name
    images = ShardImages(shards) if shards else None
    app = FastAPI(title="clipkit retrieval", docs_url=None, redoc_url=None)
    app.state.query_images = query_images = QueryImages(max_image_pixels, max_decodes, decode_wait)
    app.add_middleware(LimitBody, limit=max_body)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)  # outermost: first

    class KnnQuery(BaseModel):
        model_config = ConfigDict(extra="ignore")  # clip-retrieval's front end sends options we do not have
        text: str | None = None
        image: str | None = None
        image_url: str | None = None
        embedding_input: list[float] | None = None
        modality: Literal["image", "text"] = "image"
        num_images: int = 10
        indice_name: str | None = None

    class MetadataQuery(BaseModel):
        model_config = ConfigDict(extra="ignore")
        ids: list[int]
        indice_name: str | None = None

    def error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status, headers=headers)

    @app.exception_handler(UserError)
    async def bad_query(request: Request, exc: UserError):
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        reasons = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return error(422, "; ".join(reasons))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        # A fault of ours, not of the query: its message may name files and objects of this machine, so the
        # answer carries only an id, and the log the details under the same id.
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error (id {error_id}; the details are in the service's log)",
                             "id": error_id}, status_code=500)

    def check_indice(indice_name: str | None) -> None:
        if indice_name not in (None, name):
            raise UserError(f"unknown indice_name {indice_name!r}: this service has [{name!r}]")

    def thumbnail(row: dict) -> dict:
        return {"thumbnail": f"/thumbnail/{row['id']}"} if images and row.get("key") in images.places else {}

    @app.get("/indices-list")
    def indices_list() -> list[str]:
        return [name]

    @app.post("/knn-service")
    def knn_service(query: KnnQuery) -> list[dict]:
        check_indice(query.indice_name)
        if not 1 <= query.num_images <= max_k:
            raise UserError(f"num_images must be between 1 and {max_k}, got {query.num_images}")
        vectors = query_vectors(query)
        results = searcher.search_vectors(vectors, query.num_images, query.modality)[0]
        return [{"id": r["id"], "similarity": r["score"], **{c: v for c, v in r.items() if c not in ("id", "score")},
                 **thumbnail(r)} for r in results]

    def query_vectors(query: KnnQuery) -> np.ndarray:
        if query.image_url:
            raise UserError("image_url is not supported: this service fetches nothing from the network; send the "
                            "image itself, base64-encoded, in 'image'")
        given = [f for f in ("image", "embedding_input") if getattr(query, f) is not None]
        if query.text is not None and (query.text.strip() or not given):  # an empty text beside an image is unset
            given.append("text")
        if len(given) != 1:
            raise UserError(f"give exactly one query among text, image and embedding_input (got {given or 'none'})")
        if given == ["text"]:
            return searcher.encode_text([query.text])
        if given == ["image"]:
            data = decode_base64(query.image)
            with query_images.slot():  # the decoded image and its encoding are what the slots bound
                return searcher.encode_image([query_images.decode(data)])
        vector = np.asarray(query.embedding_input, dtype=np.float32)
        norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else 0.0
        if vector.shape != (searcher.dim,) or norm == 0:
            raise UserError(f"embedding_input must be a non-zero vector of {searcher.dim} finite numbers")
        return (vector / norm)[None]

    @app.post("/metadata")
    def metadata(query: MetadataQuery) -> list[dict]:
        check_indice(query.indice_name)
        if len(query.ids) > max_k:
            raise UserError(f"at most {max_k} ids a request, got {len(query.ids)}")
        rows = searcher.rows(query.ids)
        return [{"id": i, "metadata": row} for i, row in zip(query.ids, rows)]

    @app.get("/thumbnail/{row_id}")
    def thumbnail_image(row_id: int):
        if not 0 <= row_id < searcher.count:
            raise HTTPException(404, f"no row {row_id}: the index holds rows 0 to {searcher.count - 1}")
        key = searcher.rows([row_id])[0].get("key")
        found = images.read(str(key)) if images and key is not None else None
        if found is None:
            why = "the service was started without --data" if images is None else f"key {key!r} is in no shard"
            raise HTTPException(404, f"no image for row {row_id}: {why}")
        return Response(found[0], media_type=found[1])

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        # The name goes into markup escaped, and into the script as a JSON string that cannot close the tag.
        return (SEARCH_PAGE.replace("{{NAME}}", html.escape(name)).replace("{{MAX_K}}", str(max_k))
                .replace("{{NAME_JSON}}", json.dumps(name).replace("<", "\\u003c"))
                .replace("{{MODALITIES}}", "".join(f"<option>{m}</option>" for m in searcher.modalities)))

    return app


def decode_base64(data: str) -> bytes:
    if data.startswith("data:"):  # a data URL, as a browser's FileReader produces
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("image is not valid base64") from None


# Results are drawn with textContent/attributes only: captions from the metadata never become markup.
SEARCH_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>clipkit search: {{NAME}}</title>
<style>
body{font-family:sans-serif;margin:1.5em}#results{display:flex;flex-wrap:wrap;gap:12px;margin-top:1em}
figure{width:180px;margin:0}figure img{width:180px;height:180px;object-fit:contain;background:#eee}
figcaption{font-size:12px}#error{color:#b00}
</style></head>
<body><h2>{{NAME}}</h2>
<form id="f"><input id="text" size="50" placeholder="describe an image"> or
<input id="image" type="file" accept="image/*"> search <select id="modality">{{MODALITIES}}</select>
k <input id="k" type="number" value="20" min="1" max="{{MAX_K}}"> <button>search</button></form>
<div id="error"></div><div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
function readFile(file) {
  return new Promise((ok, fail) => { const r = new FileReader(); r.onload = () => ok(r.result);
                                     r.onerror = fail; r.readAsDataURL(file); });
}
$("f").onsubmit = async (ev) => {
  ev.preventDefault(); $("error").textContent = ""; $("results").replaceChildren();
  const body = {modality: $("modality").value, num_images: Number($("k").value), indice_name: {{NAME_JSON}}};
  if ($("image").files.length) body.image = await readFile($("image").files[0]); else body.text = $("text").value;
  const res = await fetch("/knn-service", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body)});
  const data = await res.json();
  if (!res.ok) { $("error").textContent = data.error; return; }
  for (const r of data) {
    const fig = document.createElement("figure");
    const src = r.thumbnail || (typeof r.url === "string" && /^https?:/.test(r.url) ? r.url : null);
    if (src) { const img = document.createElement("img"); img.src = src; img.alt = r.caption || ""; fig.append(img); }
    const cap = document.createElement("figcaption");
    cap.textContent = `${r.similarity.toFixed(3)}  ${r.key ?? r.id}: ${r.caption ?? ""}`;
    fig.append(cap); $("results").append(fig);
  }
};
</script></body></html>
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cliargs import renamed

    p.add_argument("--index", required=True, metavar="DIR", help="index directory written by `clipkit index`")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="encode queries with this checkpoint instead of the one recorded in the index (its "
                        "weights must be the ones the embeddings were made with)")
    p.add_argument("--model", default=None, metavar="NAME", help=MODEL_HELP)
    p.add_argument("--allow-other-weights", action="store_true", help="serve even with weights whose sha256 "
                   "differs from the one recorded with the embeddings (results may be meaningless)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    renamed(p, "--data", "--shards", default=None, metavar="DATA",
            help="local shard spec the embeddings came from, for thumbnails")
    p.add_argument("--name", default=None, help="indice name (default: the index directory's name)")
    p.add_argument("--max-k", type=int, default=1000, help="most results a query may ask for (default 1000)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (overrides index_info.json)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (overrides index_info.json)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host header names to answer besides the bound host (loopback binds also "
                        "answer localhost, 127.0.0.1, [::1]): the names a reverse proxy or clients use; required "
                        "with --host 0.0.0.0 or ::; '*' answers any")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"largest request body, counted as it arrives (default {MAX_BODY_BYTES})")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"largest query image, width x height, checked before decoding (default {MAX_IMAGE_PIXELS}"
                        "; training's data.max_image_pixels is separate)")
    p.add_argument("--max-decodes", type=int, default=MAX_DECODES,
                   help=f"query images decoded at once (default {MAX_DECODES})")
    p.add_argument("--decode-wait", type=float, default=DECODE_WAIT_S,
                   help=f"seconds an image query waits for a decode slot before a 503 (default {DECODE_WAIT_S:g})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit serve", description="an HTTP retrieval service over an index "
                                "(clip-retrieval back end's /knn-service, /indices-list, /metadata)")
    add_arguments(p)
    args = p.parse_args(argv)
    for flag in ("max_body_bytes", "max_image_pixels", "max_decodes"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.decode_wait < 0:
        p.error("--decode-wait must be >= 0")
    hosts = allowed_hosts(args.host, args.allowed_hosts.split(","))  # a wildcard bind without names fails here
    uvicorn = require("uvicorn", "the retrieval service")

    params = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search)) if v is not None}
    searcher = Searcher(args.index, args.checkpoint, params, allow_other_weights=args.allow_other_weights,
                        model_name=args.model)
    if searcher.checkpoint:
        searcher.load_model()  # a missing checkpoint or other weights than the vectors' fail now, not on a query
    else:
        print("clipkit serve: no checkpoint recorded in the index and none given: only embedding_input queries "
              "will be answered")
    app = create_app(searcher, args.name, args.data, args.max_k, max_body=args.max_body_bytes,
                     max_image_pixels=args.max_image_pixels, max_decodes=args.max_decodes,
                     decode_wait=args.decode_wait, hosts=hosts)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
