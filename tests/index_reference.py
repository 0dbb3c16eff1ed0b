"""The reference export: what `clipkit embed` writes, produced independently of it (plain tarfile reads of the
shards, the model's own encoders), and numpy brute-force search over its float16 rows. Shared by the index,
search and serve tests."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from clipkit.models import create_transforms, get_tokenizer, load_model
from clipkit.models.digest import weights_sha256

def shard_samples(shard: Path) -> list[dict]:
    """{key, jpg, txt, json} per sample, with plain tarfile."""
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"key": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


class Reference:
    """The export's rows as written: keys, captions, float16 embeddings, and the model that made them."""

    def __init__(self, checkpoint: Path) -> None:
        loaded = load_model(checkpoint)
        self.model = loaded.model.eval()
        self.tokenizer = get_tokenizer(loaded.name)
        self.transform = create_transforms(self.model)[1]
        self.keys, self.captions, self.img, self.txt, self.jpgs = [], [], [], [], []

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        with torch.no_grad():
            x = self.model.encode_image(torch.stack([self.transform(im.convert("RGB")) for im in images])).numpy()
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            x = self.model.encode_text(self.tokenizer(texts)).numpy()
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_export(synth, checkpoint: Path, out: Path) -> Reference:
    """clip-retrieval's layout, one part per training shard, plus clipkit_embed.json."""
    ref = Reference(checkpoint)
    for folder in ("img_emb", "text_emb", "metadata"):
        (out / folder).mkdir(parents=True)
    for n, shard in enumerate(sorted(Path(synth.train_spec).parent.glob("*.tar"))):
        samples = shard_samples(shard)
        captions = [s["txt"].decode() for s in samples]
        img = ref.encode_images([Image.open(io.BytesIO(s["jpg"])) for s in samples]).astype(np.float16)
        txt = ref.encode_texts(captions).astype(np.float16)
        np.save(out / "img_emb" / f"img_emb_{n:04d}.npy", img)
        np.save(out / "text_emb" / f"text_emb_{n:04d}.npy", txt)
        fields = [{k: v for k, v in json.loads(s["json"]).items() if k not in ("key", "caption")} for s in samples]
        rows = [{"key": s["key"], "caption": c, **f} for s, c, f in zip(samples, captions, fields)]
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, out / "metadata" / f"metadata_{n:04d}.parquet")
        ref.keys += [s["key"] for s in samples]
        ref.captions += captions
        ref.jpgs += [s["jpg"] for s in samples]
        ref.img.append(img)
        ref.txt.append(txt)
    ref.img, ref.txt = np.concatenate(ref.img), np.concatenate(ref.txt)
    (out / "clipkit_embed.json").write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()),
                                                        "weights_sha256": weights_sha256(ref.model),
                                                        "model_name": "clipkit-nano", "dim": ref.img.shape[1],
                                                        "count": len(ref.keys)}))
    return ref


def brute_force(stored: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by inner product over the float16 rows as stored (ties by row), and all scores."""
    scores = stored.astype(np.float32) @ query.astype(np.float32)
    return np.lexsort((np.arange(len(scores)), -scores))[:k], scores


def assert_matches_brute_force(results: list[dict], ref: Reference, stored: np.ndarray, query: np.ndarray, k: int):
    want, scores = brute_force(stored, query, k)
    got = [r["id"] for r in results]
    assert len(got) == len(set(got)) == len(want)
    # metadata follows the rows: each result carries its own row's key and caption
    assert [(r["key"], r["caption"]) for r in results] == [(ref.keys[i], ref.captions[i]) for i in got]
    np.testing.assert_allclose([r["score"] for r in results], scores[want], atol=1e-3)
    # the same keys in the same order; only rows whose scores tie exactly (duplicate captions) may swap
    for g, w in zip(got, want):
        assert g == w or abs(scores[g] - scores[w]) < 1e-6, (ref.keys[g], ref.keys[w], scores[g], scores[w])


QUERIES = ["a red circle on a white background", "two blue stars at the top", "an image of three green crosses"]
