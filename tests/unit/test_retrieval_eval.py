"""Retrieval recall@k: by hand, against a numpy brute force over the full score matrix (with the scores
computed a chunk at a time, down to one query per chunk), and the `clipkit retrieval-eval` command against
CLIP_benchmark's command on the open_clip export of the same checkpoint and against a brute force over
open_clip's own embeddings."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from clipkit import cli
from clipkit.evaluation import (RetrievalDataError, embed_retrieval_set, evaluate_retrieval, load_retrieval_set,
                                retrieval_metrics)
from clipkit.models import create_model, create_transforms, get_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(trained_nano):
    return trained_nano


def brute_force(image_emb, text_emb, text_image, ks) -> dict:
    """recall@k from the whole score matrix: a query hits at k when fewer than k candidates outscore its
    best match."""
    scores = np.asarray(text_emb, dtype=np.float64) @ np.asarray(image_emb, dtype=np.float64).T
    text_image = np.asarray(text_image)
    n_texts, n_images = scores.shape
    own = scores[np.arange(n_texts), text_image]
    text_rank = (scores > own[:, None]).sum(axis=1)  # images above each text's own image
    image_rank = np.empty(n_images, dtype=int)
    for i in range(n_images):
        column = scores[:, i]
        image_rank[i] = min((column > column[t]).sum() for t in np.flatnonzero(text_image == i))
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((text_rank < k).mean())
        out[f"text_retrieval_recall@{k}"] = float((image_rank < k).mean())
    return out


def _unit(rows) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_recall_by_hand():
    images = _unit([[1, 0], [0, 1], [-1, 0]])
    texts = _unit([[0.9, 0.1], [0.1, 0.9], [-0.6, 0.8], [0.28, 0.96]])
    owner = torch.tensor([0, 0, 1, 2])
    # text queries rank their image 1st, 2nd (0.11 < 0.99), 1st, 3rd; image 0 ranks its text t0 first,
    # image 1 ranks t1 (image 0's), t3, then its t2; image 2 ranks t2, t1, then its t3
    expected = {"image_retrieval_recall@1": 2 / 4, "image_retrieval_recall@2": 3 / 4, "image_retrieval_recall@3": 1.0,
                "text_retrieval_recall@1": 1 / 3, "text_retrieval_recall@2": 1 / 3, "text_retrieval_recall@3": 1.0,
                "num_images": 3, "num_texts": 4}
    for chunk in (1, 5, 1 << 20):
        assert retrieval_metrics(images, texts, owner, k=(1, 2, 3), chunk_elements=chunk) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_top_k_equals_numpy_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n_images = 53
    counts = torch.randint(1, 5, (n_images,), generator=gen)  # 1 to 4 captions per image
    owner = torch.repeat_interleave(torch.arange(n_images), counts)
    images = torch.nn.functional.normalize(torch.randn(n_images, 8, generator=gen), dim=-1)
    # captions near their image, so recall is neither 0 nor 1 everywhere
    texts = torch.nn.functional.normalize(images[owner] + 0.9 * torch.randn(len(owner), 8, generator=gen), dim=-1)
    ks = (1, 5, 10, 100)  # 100 is above both counts: every candidate is in the top k
    expected = brute_force(images.numpy(), texts.numpy(), owner.numpy(), ks)
    assert 0 < expected["image_retrieval_recall@5"] < 1 and 0 < expected["text_retrieval_recall@5"] < 1
    for chunk in (1, 300, 1000, 1 << 24):  # one query per chunk, chunks cutting across captions, one chunk
        got = retrieval_metrics(images, texts, owner, k=ks, chunk_elements=chunk)
        assert {k: got[k] for k in expected} == expected
    assert got["num_texts"] == int(counts.sum()) and got["num_images"] == n_images


def _open_clip_embeddings(export: Path, shards: list[Path], several: bool):
    """Image and caption embeddings by open_clip alone, from the export and webdataset's reader."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    images, texts, owner = [], [], []
    for i, (image, text) in enumerate(wds.WebDataset([str(s) for s in shards], shardshuffle=False)
                                      .decode("pil").to_tuple("jpg", "txt")):
        captions = text.splitlines() if several else [text]
        images.append(preprocess(image))
        texts.extend(captions)
        owner.extend([i] * len(captions))
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack(images)), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    return img.numpy(), txt.numpy(), np.array(owner)


def _within_one_item(ours: dict, ref: dict, n_images: int, n_texts: int) -> None:
    for name, value in ref.items():
        step = 1 / n_texts if name.startswith("image_retrieval") else 1 / n_images
        assert abs(ours[name] - value) <= step + 1e-6, (name, ours[name], value)


def _clip_benchmark(monkeypatch, args: list[str]) -> dict:
    """CLIP_benchmark's command line, run in this process (its start-up costs seconds per run here)."""
    from clip_benchmark import cli as cb_cli

    out = Path(args[args.index("--output") + 1])
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", "--pretrained", "", "--no_amp", "--num_workers", "0",
                                      "--batch_size", "64", *args])
    cb_cli.main()
    return json.loads(out.read_text())


def test_command_matches_clip_benchmark_and_brute_force(trained, synth_small, tmp_path, monkeypatch):
    checkpoint, export = trained
    root = synth_small.retrieval_root
    out = tmp_path / "ours.json"
    assert cli.main(["retrieval-eval", "--checkpoint", str(checkpoint), "--data", str(root), "--out", str(out),
                     "--batch-size", "64", "--workers", "0"]) == 0
    ours = json.loads(out.read_text())
    assert ours["task"] == "zeroshot_retrieval" and ours["dataset"] == "retrieval"
    assert ours["metrics"]["num_images"] == 120 and ours["metrics"]["num_texts"] == 600
    ref = _clip_benchmark(monkeypatch, ["--model", f"local-dir:{export}", "--dataset", "wds/retrieval",
                                        "--dataset_root", str(root), "--task", "zeroshot_retrieval",
                                        "--recall_k", "1", "5", "10", "--output", str(tmp_path / "ref.json")])
    assert ref["task"] == ours["task"] and set(ref["metrics"]) < set(ours["metrics"])
    _within_one_item(ours["metrics"], ref["metrics"], 120, 600)
    emb = _open_clip_embeddings(export, sorted((root / "test").glob("*.tar")), several=True)
    _within_one_item(ours["metrics"], brute_force(*emb, (1, 5, 10)), 120, 600)
    # trained: far above chance (a caption paired with the wrong image would bring it down to ~10/120)
    assert ours["metrics"]["text_retrieval_recall@10"] > 0.2


def test_training_shards_hold_one_caption_per_sample(trained, synth_small, tmp_path):
    """Training shards (KEY.txt = one caption, line breaks and all), as a spec and as a folder."""
    from clipkit.models import load_model

    first = Path(sorted(Path(synth_small.train_spec).parent.glob("*.tar"))[0])
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with wds.TarWriter(str(shard)) as sink:  # the first shard, one caption broken over two lines
        for i, sample in enumerate(wds.WebDataset(str(first), shardshuffle=False)):
            text = sample["txt"].decode()
            sink.write({"__key__": sample["__key__"], "jpg": sample["jpg"],
                        "txt": text.replace(" ", "\n", 1) if i == 0 else text})
    loaded = load_model(trained[0])
    tok, transform = get_tokenizer(loaded.name), create_transforms(loaded.model)[1]
    for data in (str(shard), shard.parent):
        rs = load_retrieval_set(data)
        assert not rs.several_captions
        got = evaluate_retrieval(loaded.model, tok, transform, rs, batch_size=64, workers=0)
        assert got["num_images"] == got["num_texts"] == 150
    ref = brute_force(*_open_clip_embeddings(trained[1], [shard], several=False), (1, 5, 10))
    _within_one_item(got, ref, 150, 150)


def test_embeddings_keep_each_caption_with_its_image(synth_small):
    """Embedding in batches smaller than the set: the caption -> image index follows each sample's captions."""
    torch.manual_seed(0)
    model = create_model("clipkit-nano")
    model.train()
    rs = load_retrieval_set(synth_small.retrieval_root)
    emb = embed_retrieval_set(model, get_tokenizer("clipkit-nano"), create_transforms(model)[1], rs, batch_size=50,
                              workers=0)
    assert model.training  # restored after evaluating in eval mode
    members = {}
    for sample in wds.WebDataset(rs.shards, shardshuffle=False):
        members[sample["__key__"]] = sample["txt"].decode().splitlines()
    expected_owner = [i for i, key in enumerate(emb.keys) for _ in members[key]]
    assert emb.text_image.tolist() == expected_owner and len(emb.keys) == 120
    assert emb.images.shape == (120, 32) and emb.texts.shape == (600, 32)
    torch.testing.assert_close(emb.texts.norm(dim=-1), torch.ones(600))


def test_bad_inputs_give_one_line(synth_small, tmp_path, capsys):
    (tmp_path / "cls" / "test").mkdir(parents=True)
    (tmp_path / "cls" / "test" / "nshards.txt").write_text("1\n")
    (tmp_path / "cls" / "dataset_type.txt").write_text("classification\n")
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "not found"), (tmp_path / "cls", "not a retrieval set"),
             (tmp_path / "empty", "neither a CLIP_benchmark retrieval root")]
    for data, message in cases:
        with pytest.raises(RetrievalDataError, match=message):
            load_retrieval_set(data)
        assert cli.main(["retrieval-eval", "--checkpoint", str(tmp_path / "no-checkpoint"), "--data", str(data)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
    with pytest.raises(RetrievalDataError, match="k >= 1"):
        retrieval_metrics(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, dtype=torch.long), k=(0,))
