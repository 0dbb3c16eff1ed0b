"""`clipkit serve`: an HTTP retrieval service over an index, shaped like clip-retrieval's back end.

    clipkit serve --index IDX [--checkpoint CK] [--host 127.0.0.1] [--port 8000] [--shards 'data/{00000..00009}.tar']

    GET  /indices-list   ["NAME"]  (the index directory's name, or --name)
    POST /knn-service    {"text" | "image" (base64) | "embedding_input", "modality": "image"|"text",
                          "num_images": k, "indice_name": NAME}  ->  [{"id", "similarity", "key", "caption", ...}]
    POST /metadata       {"ids": [...], "indice_name": NAME}  ->  [{"id", "metadata": {...}}]
    GET  /thumbnail/ID   the row's image, read from the shards given with --shards
    GET  /               a search page

clip-retrieval's other request fields (deduplicate, use_safety_model, use_violence_detector, use_mclip,
aesthetic_score, num_result_ids) are accepted and ignored: none of those models exist here. `image_url` is
refused: the service fetches nothing from the network. Every bad request gets a 4xx answer with
{"error": "<reason>"}.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time, and the
# request models are local to create_app (they would not resolve from strings).
import argparse
import base64
import binascii
import html
import json
import tarfile
from typing import Literal

import numpy as np

from ..errors import UserError
from .search import Searcher

MAX_BODY_BYTES = 32 * 1024 * 1024  # a base64 photo is a few MB; anything far larger is refused unread
MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class ShardImages:
    """Where each sample's image lies in local uncompressed tar shards: key -> (file, offset, size, ext).

    Built from tar headers alone at start-up; serving a thumbnail is then one seek and one read."""

    def __init__(self, spec: str) -> None:
        from ..data.shards import expand_shards, is_remote

        self.places: dict[str, tuple[str, int, int, str]] = {}
        for url in expand_shards(spec):
            if is_remote(url):
                raise UserError(f"--shards must name local tar files; {url} is remote")
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
            raise UserError(f"--shards: {path} is not a readable uncompressed tar file: {e}") from None

    def read(self, key: str) -> tuple[bytes, str] | None:
        place = self.places.get(key)
        if place is None:
            return None
        path, offset, size, ext = place
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size), MEDIA_TYPES[ext]


def create_app(searcher: Searcher, name: str | None = None, shards: str | None = None, max_k: int = 1000,
               max_body: int = MAX_BODY_BYTES):
    """The FastAPI application serving one index."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException

    name = name or searcher.dir.resolve().name
    images = ShardImages(shards) if shards else None
    app = FastAPI(title="clipkit retrieval", docs_url=None, redoc_url=None)

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

    def error(status: int, reason: str) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status)

    @app.exception_handler(UserError)
    async def bad_query(request: Request, exc: UserError):
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        reasons = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return error(422, "; ".join(reasons))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        # A fault of ours, not of the query: still answered as JSON, with the exception named.
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > max_body:
            return error(413, f"request body over the limit of {max_body} bytes")
        return await call_next(request)

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
            return searcher.encode_image([decode_base64(query.image)])
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
            why = "the service was started without --shards" if images is None else f"key {key!r} is in no shard"
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clipkit serve", description="an HTTP retrieval service over an index "
                                "(clip-retrieval back end's /knn-service, /indices-list, /metadata)")
    p.add_argument("--index", required=True, help="index directory written by `clipkit index`")
    p.add_argument("--checkpoint", default=None, help="encode queries with this checkpoint instead of the one "
                   "recorded in the index (its weights must be the ones the embeddings were made with)")
    p.add_argument("--allow-other-weights", action="store_true", help="serve even with weights whose sha256 "
                   "differs from the one recorded with the embeddings (results may be meaningless)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--shards", default=None, help="local shard spec the embeddings came from, for thumbnails")
    p.add_argument("--name", default=None, help="indice name (default: the index directory's name)")
    p.add_argument("--max-k", type=int, default=1000, help="most results a query may ask for (default 1000)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (overrides index_info.json)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (overrides index_info.json)")
    args = p.parse_args(argv)
    import uvicorn

    params = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search)) if v is not None}
    searcher = Searcher(args.index, args.checkpoint, params, allow_other_weights=args.allow_other_weights)
    if searcher.checkpoint:
        searcher.load_model()  # a missing checkpoint or other weights than the vectors' fail now, not on a query
    else:
        print("clipkit serve: no checkpoint recorded in the index and none given: only embedding_input queries "
              "will be answered")
    app = create_app(searcher, args.name, args.shards, args.max_k)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
