"""`clipkit serve` over real HTTP on loopback: answers compared with numpy brute force over the export's
stored rows (queries encoded by the model itself), thumbnails with the shard bytes, and bad queries
answered 4xx with a JSON reason."""
import base64
import socket
import subprocess
import sys
import time

import faiss
import httpx
import numpy as np
import pytest
from PIL import Image

from clipkit.retrieval.search import Searcher
from clipkit.retrieval.serve import create_app
from helpers import serving
from index_reference import QUERIES, assert_matches_brute_force

faiss.omp_set_num_threads(1)  # shared cores: see test_index_search
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def export(nano_index):
    return nano_index


@pytest.fixture(scope="module")
def url(export):
    """A uvicorn server in a thread, on a port the kernel picks on 127.0.0.1."""
    index_dir, _, synth = export
    app = create_app(Searcher(index_dir), shards=synth.train_spec, max_k=100, max_body=MAX_BODY)
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


def as_search_results(answer: list[dict]) -> list[dict]:
    """clip-retrieval's "similarity" is the score the brute-force comparison checks."""
    return [{**r, "score": r["similarity"]} for r in answer]


def knn(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/knn-service", json={"indice_name": "synth-index", **body}, timeout=60)


def test_knn_service_answers_equal_brute_force(url, export):
    _, ref, _ = export
    stored = {"image": ref.img, "text": ref.txt}
    for text, vector in zip(QUERIES, ref.encode_texts(QUERIES)):
        for modality in ("image", "text"):
            res = knn(url, text=text, image=None, image_url=None, modality=modality, num_images=8,
                      deduplicate=True, use_safety_model=True, use_violence_detector=True, use_mclip=False)
            assert res.status_code == 200, res.text
            assert_matches_brute_force(as_search_results(res.json()), ref, stored[modality], vector, 8)
    image = ref.encode_images([Image.open(__import__("io").BytesIO(ref.jpgs[11]))])[0]
    for encoded in (base64.b64encode(ref.jpgs[11]).decode(), "data:image/jpeg;base64," +
                    base64.b64encode(ref.jpgs[11]).decode()):
        res = knn(url, text="", image=encoded, modality="image", num_images=5)  # empty text beside an image: unset
        assert res.status_code == 200, res.text
        assert_matches_brute_force(as_search_results(res.json()), ref, ref.img, image, 5)
        assert res.json()[0]["key"] == ref.keys[11]
    vector = ref.txt[250].astype(np.float32)
    res = knn(url, embedding_input=vector.tolist(), modality="text", num_images=4)
    assert_matches_brute_force(as_search_results(res.json()), ref, ref.txt, vector / np.linalg.norm(vector), 4)


def test_indices_list_metadata_thumbnails_and_page(url, export):
    _, ref, _ = export
    assert httpx.get(f"{url}/indices-list").json() == ["synth-index"]
    res = httpx.post(f"{url}/metadata", json={"ids": [0, 599, 150], "indice_name": "synth-index"})
    assert [(m["id"], m["metadata"]["key"], m["metadata"]["caption"]) for m in res.json()] == \
        [(i, ref.keys[i], ref.captions[i]) for i in (0, 599, 150)]
    hit = knn(url, text=QUERIES[0], modality="image", num_images=3).json()[0]
    assert hit["thumbnail"] == f"/thumbnail/{hit['id']}"
    image = httpx.get(url + hit["thumbnail"])
    assert image.headers["content-type"] == "image/jpeg" and image.content == ref.jpgs[hit["id"]]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "/knn-service" in page.text and "<option>text</option>" in page.text


BAD = [  # (path, JSON body or raw bytes, status, words in the reason)
    ("/knn-service", {"text": "   "}, 400, "text query is empty"),
    ("/knn-service", {"text": None}, 400, "give exactly one query"),
    ("/knn-service", {"text": "a red circle", "image": "aGk="}, 400, "give exactly one query"),
    ("/knn-service", {"image": "%%% not base64 %%%"}, 400, "not valid base64"),
    ("/knn-service", {"image": base64.b64encode(b"GIF89a broken").decode()}, 400, "could not be decoded"),
    ("/knn-service", {"image_url": "http://example.com/a.jpg"}, 400, "fetches nothing from the network"),
    ("/knn-service", {"text": "x", "num_images": 0}, 400, "num_images must be between 1 and 100"),
    ("/knn-service", {"text": "x", "num_images": 101}, 400, "num_images must be between 1 and 100"),
    ("/knn-service", {"text": "x", "num_images": "ten"}, 422, "num_images"),
    ("/knn-service", {"text": "x", "indice_name": "laion5B"}, 400, "unknown indice_name 'laion5B'"),
    ("/knn-service", {"text": "x", "modality": "audio"}, 422, "modality"),
    ("/knn-service", {"embedding_input": [1.0, 2.0]}, 400, "embedding_input must be a non-zero vector of 32"),
    ("/knn-service", b"{not json", 422, "JSON"),
    ("/knn-service", b"x" * (MAX_BODY + 1), 413, "request body over the limit"),
    ("/metadata", {"ids": [3, 600]}, 400, "ids out of range [0, 600)"),
    ("/metadata", {"ids": "all"}, 422, "ids"),
]


@pytest.mark.parametrize("path,body,status,reason", BAD, ids=[f"{b[0]}-{b[2]}-{b[3][:20]}" for b in BAD])
def test_bad_queries_get_4xx_with_a_reason(url, path, body, status, reason):
    if isinstance(body, bytes):
        res = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        res = httpx.post(url + path, json={"indice_name": "synth-index", **body}, timeout=60)
    assert res.status_code == status, res.text
    assert reason in res.json()["error"], res.json()


def test_unknown_routes_and_rows_are_404_with_a_reason(url):
    for path, reason in [("/thumbnail/600", "no row 600"), ("/nothing-here", "Not Found")]:
        res = httpx.get(url + path)
        assert res.status_code == 404 and reason in res.json()["error"]


def test_clipkit_serve_command(export):
    """The command itself, in its own process: it loads the recorded checkpoint and answers on loopback."""
    index_dir, ref, _ = export
    with socket.socket() as s:  # a port free a moment ago; the server binds it right after
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "clipkit", "serve", "--index", str(index_dir), "--port", str(port),
                             "--name", "shapes"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/indices-list", timeout=2).json() == ["shapes"]:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
        res = httpx.post(f"{url}/knn-service", json={"text": QUERIES[2], "modality": "text", "num_images": 6,
                                                     "indice_name": "shapes"}, timeout=60)
        assert res.status_code == 200, res.text
        assert_matches_brute_force(as_search_results(res.json()), ref, ref.txt, ref.encode_texts([QUERIES[2]])[0], 6)
        assert "thumbnail" not in res.json()[0]  # no --data: no image to show, and none claimed
    finally:
        proc.terminate()
        proc.wait(30)
