"""A noisy version of the built-in dataset with planted truth, for measuring curation (`clipkit curate`).

The training shards use synth's layout (KEY.jpg, KEY.txt, KEY.json in train/00000.tar, ...), the evaluation
set synth's zero-shot layout (eval/test/N.tar, its images exactly synth's eval split for the seed and style), and
OUT/planted.jsonl says, for every training key, what was planted there: {"key", "kind", "original" (the key
of the clean training sample it copies, "eval:KEY" for an evaluation image, else null), "variant" (how a
near duplicate was made, the caption's language, ...), "image_class" (the colour and shape drawn, null for
a copy of an eval image: see the eval set's KEY.cls)}. The sample's own json holds no hint of its kind.

Kinds, as fractions of the samples (each rounded down; clean takes the rest), assigned to keys by a seeded
shuffle:
- clean (about 0.60): a scene and its caption, as synth draws them, except that the class (colour and shape)
  is head-heavy: half of the clean scenes take one of HEAD_CLASSES_N classes drawn for the seed, so each head
  class is about 0.5 / 3 + 0.5 / 30 = 18% of clean captions instead of 3.3% (MetaCLIP balancing has
  something to flatten);
- mismatched 0.06: the image of one scene, the caption of a scene of another colour and another shape;
- exact_dup 0.05: the same jpg bytes and caption as a clean sample;
- near_dup 0.08: a clean sample's image re-encoded at JPEG quality 60 ("jpeg_quality"), cropped by 2-5% on
  each side (at least a pixel) and resized back ("crop_resize", the box in the record's "crop"), or
  mirrored left-right ("flip"), in turn; same caption;
- eval_leak 0.04: an evaluation image decoded and re-encoded at quality 85, with a caption of its scene;
- filename_caption 0.05: a caption that is a camera file name ("IMG_0423.JPG", "DSC01234.jpg",
  "photo_2019_05_12.png");
- foreign_language 0.05: the scene's caption in German, French or Spanish, in turn;
- small_image 0.04: the scene drawn at a quarter of the image size (at least 8 pixels);
- extreme_aspect 0.03: the scene squeezed to 5:1 (width 5x height).
Originals of duplicates are distinct clean samples where there are enough, and so are leaked eval images.

Scenes are drawn in synth's "photo" style by default (a 1/f textured background, clutter, uneven light:
clipkit.data.synth._photo_background): on the plain "flat" scenes unrelated pictures share perceptual hashes,
so a hash stage's precision measured on them says more about the pictures than about the stage.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageOps

from ..atomic import atomic_write_text
from .synth import (COLOURS, SHAPES, STYLES, SceneSpec, _jpeg, _sample, _sample_rng, _ShardJob, _write_shard,
                    caption, class_names, render, sample_scene, ZEROSHOT_TEMPLATES)

FORMAT = "clipkit-noisy-v2"  # v1 drew flat scenes only (style "flat"); v2 draws "photo" scenes by default
PROPORTIONS = {  # of the training samples; clean takes the rest
    "mismatched": 0.06,
    "exact_dup": 0.05,
    "near_dup": 0.08,
    "eval_leak": 0.04,
    "filename_caption": 0.05,
    "foreign_language": 0.05,
    "small_image": 0.04,
    "extreme_aspect": 0.03,
}
KINDS = ["clean", *PROPORTIONS]
NEAR_DUP_VARIANTS = ["jpeg_quality", "crop_resize", "flip"]
HEAD_CLASSES_N = 3
HEAD_SHARE = 0.5  # of clean scenes drawn from the head classes
LANGUAGES = ["german", "french", "spanish"]

_WORDS = {
    "german": {"red": "roten", "green": "grünen", "blue": "blauen", "yellow": "gelben", "purple": "violetten",
               "orange": "orangen", "circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck",
               "star": "Stern", "cross": "Kreuz", "white": "weißen", "black": "schwarzen", "grey": "grauen",
               "striped": "gestreiften", "speckled": "gesprenkelten"},
    "french": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
               "orange": "orange", "circle": "cercle", "square": "carré", "triangle": "triangle",
               "star": "étoile", "cross": "croix", "white": "blanc", "black": "noir", "grey": "gris",
               "striped": "rayé", "speckled": "moucheté"},
    "spanish": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
                "orange": "naranja", "circle": "círculo", "square": "cuadrado", "triangle": "triángulo",
                "star": "estrella", "cross": "cruz", "white": "blanco", "black": "negro", "grey": "gris",
                "striped": "rayado", "speckled": "moteado"},
}
_FOREIGN_TEMPLATES = {
    "german": "Auf diesem Bild sieht man eine Form: einen {colour} {shape} vor einem {bg} Hintergrund, "
              "und sonst nichts",
    "french": "Sur cette image, il y a une forme : un {shape} de couleur {colour} sur un fond {bg}, "
              "et rien d'autre",
    "spanish": "En esta imagen se ve una forma: un {shape} de color {colour} sobre un fondo {bg}, "
               "y nada más",
}


def foreign_caption(scene: SceneSpec, language: str) -> str:
    w = _WORDS[language]
    return _FOREIGN_TEMPLATES[language].format(colour=w[scene.colour], shape=w[scene.shape], bg=w[scene.background])


def filename_caption(rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"IMG_{rng.randrange(10000):04d}.JPG"
    if style == 1:
        return f"DSC{rng.randrange(100000):05d}.jpg"
    return f"photo_{rng.randint(2005, 2024)}_{rng.randint(1, 12):02d}_{rng.randint(1, 28):02d}.png"


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class _Planner:
    """Which kind goes where, and what each copy copies: all drawn from the seed."""

    def __init__(self, samples: int, eval_samples: int, seed: int) -> None:
        self.seed = seed
        rng = random.Random(f"clipkit-noisy/{seed}/plan")
        counts = {k: int(p * samples) for k, p in PROPORTIONS.items()}
        kinds = [k for k, c in counts.items() for _ in range(c)]
        kinds = ["clean"] * (samples - len(kinds)) + kinds
        rng.shuffle(kinds)
        self.kinds = kinds
        clean = [i for i, k in enumerate(kinds) if k == "clean"]
        copies = [i for i, k in enumerate(kinds) if k in ("exact_dup", "near_dup")]
        if not clean and copies:
            raise ValueError("noisy dataset: too few samples for a clean one to copy")
        originals = rng.sample(clean, len(copies)) if len(copies) <= len(clean) else \
            [rng.choice(clean) for _ in copies]
        self.original = dict(zip(copies, originals))
        leaks = [i for i, k in enumerate(kinds) if k == "eval_leak"]
        pool = list(range(eval_samples))
        sources = rng.sample(pool, len(leaks)) if len(leaks) <= len(pool) else [rng.choice(pool) for _ in leaks]
        self.leak_source = dict(zip(leaks, sources))
        classes = [(c, s) for c in COLOURS for s in SHAPES]
        self.head = rng.sample(classes, HEAD_CLASSES_N)
        order = {}  # the n-th sample of a kind: for variants taken in turn
        self.nth = []
        for k in kinds:
            self.nth.append(order.get(k, 0))
            order[k] = order.get(k, 0) + 1


def _scene(planner: _Planner, index: int, rng: random.Random, head_heavy: bool) -> SceneSpec:
    scene = sample_scene(rng, "train")
    if head_heavy and rng.random() < HEAD_SHARE:
        colour, shape = rng.choice(planner.head)
        scene = replace(scene, colour=colour, shape=shape)
    return scene


def _clean(planner: _Planner, index: int, image_size: int, style: str) -> tuple[bytes, str, SceneSpec, random.Random]:
    rng = _sample_rng(planner.seed, "noisy-train", index)
    scene = _scene(planner, index, rng, head_heavy=True)
    img = render(scene, image_size, rng, style=style)
    return _jpeg(img), caption(scene), scene, rng


def _make(planner: _Planner, index: int, image_size: int, eval_job: _ShardJob, classes: list[str],
          style: str) -> tuple[dict, dict]:
    kind = planner.kinds[index]
    key = f"{index:09d}"
    record = {"key": key, "kind": kind, "original": None, "variant": None, "image_class": None}
    rng = _sample_rng(planner.seed, "noisy-train", index)
    if kind in ("exact_dup", "near_dup"):
        src = planner.original[index]
        jpg, text, scene, _ = _clean(planner, src, image_size, style)
        record["original"] = f"{src:09d}"
        if kind == "near_dup":
            variant = NEAR_DUP_VARIANTS[planner.nth[index] % len(NEAR_DUP_VARIANTS)]
            img = _decode(jpg)
            if variant == "jpeg_quality":
                jpg = _jpeg(img, 60)
            elif variant == "crop_resize":
                w, h = img.size
                m = [max(1, round(rng.uniform(0.02, 0.05) * s)) for s in (w, h, w, h)]
                box = (m[0], m[1], w - m[2], h - m[3])
                jpg = _jpeg(img.crop(box).resize((w, h), Image.LANCZOS))
                record["crop"] = list(box)
            else:
                jpg = _jpeg(ImageOps.mirror(img))
            record["variant"] = variant
        record["image_class"] = f"{scene.colour} {scene.shape}"
    elif kind == "eval_leak":
        src = planner.leak_source[index]
        sample = _sample(eval_job, src, classes)
        jpg = _jpeg(_decode(sample["jpg"]), 85)
        text = sample["txt"]
        record["original"] = f"eval:{src:09d}"
    else:
        head_heavy = kind == "clean"
        scene = _scene(planner, index, rng, head_heavy)
        size = (max(8, image_size // 4),) * 2 if kind == "small_image" else (image_size, image_size)
        img = render(scene, size[0], rng, style=style)
        if kind == "extreme_aspect":
            img = img.resize((image_size, max(2, image_size // 5)), Image.LANCZOS)
        jpg = _jpeg(img)
        text = caption(scene)
        record["image_class"] = f"{scene.colour} {scene.shape}"
        if kind == "mismatched":
            other = replace(scene, colour=rng.choice([c for c in COLOURS if c != scene.colour]),
                            shape=rng.choice([s for s in SHAPES if s != scene.shape]))
            text = caption(other)
            record["variant"] = f"{other.colour} {other.shape}"
        elif kind == "filename_caption":
            text = filename_caption(rng)
        elif kind == "foreign_language":
            language = LANGUAGES[planner.nth[index] % len(LANGUAGES)]
            text = foreign_caption(scene, language)
            record["variant"] = language
    width, height = _decode(jpg).size
    meta = {"key": key, "caption": text, "width": width, "height": height, "status": "success", "url": None}
    sample = {"__key__": key, "jpg": jpg, "txt": text, "json": json.dumps(meta).encode()}
    return sample, record


def write_noisy_dataset(out: str | Path, *, samples: int, seed: int, samples_per_shard: int, image_size: int,
                        eval_samples: int | None = None, style: str = "photo") -> dict:
    """Write the noisy set under OUT (train/, eval/, planted.jsonl, manifest.json; module docstring) and
    return its manifest. `eval_samples` defaults to max(20, samples // 10). `style` is how the scenes are drawn
    (clipkit.data.synth.STYLES: "photo", the default, or "flat", the plain scenes of format v1), the training
    and the evaluation images alike. Deterministic for a seed."""
    import webdataset as wds

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {', '.join(STYLES)}")
    eval_samples = max(20, samples // 10) if eval_samples is None else eval_samples
    if min(samples, samples_per_shard, image_size, eval_samples) <= 0:
        raise ValueError("samples, samples_per_shard, image_size and eval_samples must be positive")
    if image_size < 16:
        raise ValueError("image_size must be at least 16 (a small image is a quarter of it)")
    root = Path(out)
    train_dir, eval_test = root / "train", root / "eval" / "test"
    train_dir.mkdir(parents=True, exist_ok=True)
    eval_test.mkdir(parents=True, exist_ok=True)
    eval_jobs = [_ShardJob(str(eval_test / f"{i}.tar"), "eval", start, min(samples_per_shard, eval_samples - start),
                           seed, image_size, style) for i, start in enumerate(range(0, eval_samples, samples_per_shard))]
    for job in eval_jobs:
        _write_shard(job)
    (eval_test / "nshards.txt").write_text(f"{len(eval_jobs)}\n")
    (root / "eval" / "classnames.txt").write_text("\n".join(class_names()) + "\n")
    (root / "eval" / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")

    planner = _Planner(samples, eval_samples, seed)
    classes = class_names()
    eval_job = _ShardJob("", "eval", 0, eval_samples, seed, image_size, style)
    records = []
    shards = 0
    for shard, start in enumerate(range(0, samples, samples_per_shard)):
        with wds.TarWriter(str(train_dir / f"{shard:05d}.tar")) as sink:
            for index in range(start, min(samples, start + samples_per_shard)):
                sample, record = _make(planner, index, image_size, eval_job, classes, style)
                sink.write(sample)
                records.append(record)
        shards += 1
    atomic_write_text(root / "planted.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    counts = {k: planner.kinds.count(k) for k in KINDS}
    manifest = {"format": FORMAT, "params": {"samples": samples, "seed": seed, "samples_per_shard": samples_per_shard,
                                             "image_size": image_size, "eval_samples": eval_samples,
                                             "style": style},
                "train": f"train/{{00000..{shards - 1:05d}}}.tar", "eval": "eval", "planted": "planted.jsonl",
                "counts": counts, "proportions": PROPORTIONS,
                "head_classes": [f"{c} {s}" for c, s in planner.head]}
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
