"""Image-text retrieval recall@k, with CLIP_benchmark's data layout, definitions and result schema.

    clipkit retrieval-eval --checkpoint CKPT --data ROOT_OR_SHARDS [--out JSON] [--batch-size N]

The data is a CLIP_benchmark retrieval root (SPLIT/nshards.txt, SPLIT/N.tar with KEY.jpg|png|webp +
KEY.txt holding one caption per line, dataset_type.txt = "retrieval"), a folder of training shards or a
shard spec (KEY.txt is then one caption).

recall@k as in CLIP-style papers (and CLIP_benchmark): a text query scores 1 when its image is among the
k images most similar to it, `image_retrieval_recall@k` averages that over texts; an image query scores
1 when at least one of its captions is among its k most similar texts, `text_retrieval_recall@k`
averages over images. k above the number of candidates counts every candidate.

Scores are computed a chunk of queries at a time, keeping only each chunk's top k, so the full
texts x images score matrix (40 GB for 100k x 100k) is never held.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.eval_loaders import build_captioned_loader
from ..errors import UserError
from ..models import eval_mode
from .zeroshot import write_result

DEFAULT_K = (1, 5, 10)
CHUNK_ELEMENTS = 1 << 24  # scores held per chunk: 64 MB of float32


class RetrievalDataError(UserError):
    pass


@dataclass
class RetrievalSet:
    shards: str  # shard spec of KEY.jpg + KEY.txt samples
    name: str
    several_captions: bool  # KEY.txt holds one caption per line (CLIP_benchmark) rather than one caption


@dataclass
class RetrievalEmbeddings:
    images: torch.Tensor  # [N_images, D], L2-normalised
    texts: torch.Tensor  # [N_texts, D], L2-normalised
    text_image: torch.Tensor  # [N_texts]: the index of each text's image
    keys: list[str]  # each image's sample key


def load_retrieval_set(data: str | Path, split: str = "test") -> RetrievalSet:
    """A CLIP_benchmark retrieval root, a folder of .tar shards, or a shard spec."""
    root = Path(data)
    if root.is_dir() and (root / split / "nshards.txt").is_file():
        return _benchmark_set(root, split)
    if root.is_dir():
        tars = sorted(root.glob("*.tar"))
        if not tars:
            raise RetrievalDataError(f"{root} is neither a CLIP_benchmark retrieval root ({split}/nshards.txt is "
                                     "missing) nor a folder of .tar shards")
        return RetrievalSet("::".join(map(str, tars)), root.name, several_captions=False)
    if not any(c in str(data) for c in "{:*") and not root.exists():
        raise RetrievalDataError(f"retrieval data not found: {data} (expected a CLIP_benchmark retrieval root, "
                                 "a folder of shards or a shard spec)")
    return RetrievalSet(str(data), Path(str(data).split("::")[0]).parent.name, several_captions=False)


def _benchmark_set(root: Path, split: str) -> RetrievalSet:
    kind_file = root / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else ""
    # CLIP_benchmark reads a root without dataset_type.txt as classification; its KEY.txt captions still
    # make it usable here, so only a set declared as something else is refused.
    if kind not in ("", "retrieval"):
        raise RetrievalDataError(f"{root} is a {kind} set (dataset_type.txt), not a retrieval set")
    text = (root / split / "nshards.txt").read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise RetrievalDataError(f"{root / split / 'nshards.txt'} should hold a positive shard count, not {text!r}")
    n = int(text)
    return RetrievalSet(str(root / split / (f"{{0..{n - 1}}}.tar" if n > 1 else "0.tar")), root.name, True)


@torch.no_grad()
def _encode_texts(model, tokenizer: Callable, texts: list[str], batch_size: int, device) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        out.append(F.normalize(model.encode_text(tokens), dim=-1).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_retrieval_set(model, tokenizer: Callable, transform: Callable, rs: RetrievalSet, batch_size: int = 256,
                        workers: int = 1, device: torch.device | str = "cpu") -> RetrievalEmbeddings:
    """Every image's and every caption's embedding (the model is put in eval mode and restored)."""
    with eval_mode(model):
        images, texts, text_image, keys = [], [], [], []
        for batch in build_captioned_loader(rs.shards, transform, batch_size, workers=workers,
                                            several_per_sample=rs.several_captions):
            images.append(F.normalize(model.encode_image(batch.images.to(device)), dim=-1).float().cpu())
            captions = [c for caps in batch.targets for c in caps]
            texts.append(_encode_texts(model, tokenizer, captions, batch_size, device))
            text_image.extend(len(keys) + i for i, caps in enumerate(batch.targets) for _ in caps)
            keys.extend(batch.keys)
        if not keys:
            raise RetrievalDataError(f"no readable image-caption samples in {rs.shards}")
        return RetrievalEmbeddings(torch.cat(images), torch.cat(texts), torch.tensor(text_image), keys)


def _hits(queries: torch.Tensor, candidates: torch.Tensor, is_match: Callable, ks: Sequence[int],
          chunk_elements: int) -> dict[int, int]:
    """For each k, how many queries have a match among their k best candidates, one chunk of queries at
    a time (torch.topk on whole rows, as CLIP_benchmark does, so ties break the same way)."""
    kmax = min(max(ks), len(candidates))
    rows_per_chunk = max(1, chunk_elements // len(candidates))
    found = {k: 0 for k in ks}
    for start in range(0, len(queries), rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, len(queries)), device=candidates.device)
        scores = queries[rows].to(candidates.device) @ candidates.T
        match = is_match(rows, scores.topk(kmax, dim=1).indices)  # [chunk, kmax] bool
        for k in ks:
            found[k] += int(match[:, :k].any(dim=1).sum())
    return found


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                      k: Sequence[int] = DEFAULT_K, chunk_elements: int = CHUNK_ELEMENTS,
                      device: torch.device | str | None = None) -> dict[str, float]:
    """recall@k both ways from L2-normalised embeddings; text_image[t] is text t's image index."""
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise RetrievalDataError("retrieval needs at least one image and one caption")
    if any(int(x) < 1 for x in k):
        raise RetrievalDataError(f"recall@k needs k >= 1, got {list(k)}")
    device = device or image_emb.device
    images, texts = image_emb.to(device), text_emb.to(device)
    owner = text_image.to(device)
    by_text = _hits(texts, images, lambda rows, top: top == owner[rows, None], k, chunk_elements)
    by_image = _hits(images, texts, lambda rows, top: owner[top] == rows[:, None], k, chunk_elements)
    metrics = {}
    for kk in k:
        metrics[f"image_retrieval_recall@{kk}"] = by_text[kk] / len(texts)
        metrics[f"text_retrieval_recall@{kk}"] = by_image[kk] / len(images)
    metrics["num_images"], metrics["num_texts"] = len(images), len(texts)
    return metrics


def evaluate_retrieval(model, tokenizer: Callable, transform: Callable, data: RetrievalSet | str | Path,
                       batch_size: int = 256, device: torch.device | str = "cpu", k: Sequence[int] = DEFAULT_K,
                       workers: int = 1) -> dict[str, float]:
    """image_retrieval_recall@k and text_retrieval_recall@k for each k, plus num_images and num_texts."""
    rs = data if isinstance(data, RetrievalSet) else load_retrieval_set(data)
    emb = embed_retrieval_set(model, tokenizer, transform, rs, batch_size, workers, device)
    return retrieval_metrics(emb.images, emb.texts, emb.text_image, k, device=device)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a checkpoint or run directory, a .safetensors weights file, an open_clip or transformers "
                        "CLIPModel directory, or an OpenCLIP epoch_N.pt / state dict with --model")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the architecture of a checkpoint that does not carry one (epoch_N.pt, a bare state dict)")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="CLIP_benchmark retrieval root, a folder of .tar shards, or a shard spec")
    p.add_argument("--out", default=None, metavar="FILE.json", help="result JSON (default: next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--split", default="test", help="split folder of a CLIP_benchmark root")
    p.add_argument("--recall-k", type=int, nargs="+", default=list(DEFAULT_K))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipkit retrieval-eval", description="image-text retrieval recall@k of a "
                                "checkpoint, in CLIP_benchmark's result schema")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..distributed import resolve_device
    from ..models import load_model

    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise RetrievalDataError(f"--batch-size must be positive, got {args.batch_size}")
    rs = load_retrieval_set(args.data, args.split)
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device=device, model_name=args.model)
    metrics = evaluate_retrieval(loaded.model, loaded.tokenizer, loaded.eval_transform, rs, args.batch_size,
                                 device, args.recall_k, args.workers)
    checkpoint = Path(args.checkpoint)
    out = args.out or checkpoint.with_suffix("").as_posix() + f"_retrieval_{rs.name}.json"
    result = write_result(out, metrics, rs.name, loaded.model_name, str(checkpoint), task="zeroshot_retrieval")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
