"""The shards the benchmarks read, written once into a cache (one writer for all of them).

    spec = photo_shards(None, images=1200, per_shard=100)     # bench data, bench embed: photos, plain captions
    spec = caption_shards(None, images=600, per_shard=100)    # bench train: the same photos, web-like captions

The photos are realistic: JPEGs of 640x480 to 1280x960 pixels, each a random crop, scale, flip and colour
shift of one of the sample photographs scikit-image ships (no download), with KEY.jpg, KEY.txt and KEY.json
members in img2dataset's layout. The web-like captions have a long-tailed length (median 11 words, about 5%
over 29, at most 63), as alt-text has. A manifest beside the shards names the recipe; shards of another
recipe are rewritten.
"""
from __future__ import annotations

import io
import json
import math
import random
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_file, atomic_write_text
from .harness import CACHE, BenchError

SHARD_FORMAT = "v1"  # bump when the photo recipe changes, so cached shards are rebuilt
CAPTION_FORMAT = "c1"  # bump when the caption recipe changes, so cached shards are rebuilt


def photo_shards(folder: str | Path | None, images: int, per_shard: int) -> str:
    """The photo shards (in `folder`, default a cache shared by bench data and bench embed); their spec."""
    default = CACHE / "bench_data" / f"{SHARD_FORMAT}-{images}-{per_shard}"
    return write_bench_shards(Path(folder) if folder else default, images, per_shard)


def caption_shards(folder: str | Path | None, images: int, per_shard: int) -> str:
    """The photo shards with web-like captions (in `folder`, default bench train's cache); their spec."""
    default = CACHE / "bench_train" / f"{CAPTION_FORMAT}-{images}-{per_shard}"
    return write_train_shards(Path(folder) if folder else default, images, per_shard)


# ----------------------------------------------------------------------------------------------- photos

def _source_photos() -> list[tuple[str, np.ndarray]]:
    """The colour photographs bundled with scikit-image (no download)."""
    try:
        from skimage import data
    except ImportError as e:
        raise BenchError("the benchmark's photos come from scikit-image: pip install 'clipkit[bench]'") from e
    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            img = getattr(data, name)()
        except Exception:  # a photo this scikit-image version would have to download
            continue
        if img.ndim == 3 and img.shape[2] == 3:
            photos.append((name, img))
    if len(photos) < 3:
        raise BenchError("scikit-image ships fewer than 3 of the expected colour photographs")
    return photos


def _variant(name: str, photo: np.ndarray, rng: random.Random) -> tuple[bytes, str]:
    """A JPEG of 640x480..1280x960: random crop of the photo, scaled up, flipped, colour shifted."""
    from PIL import Image

    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
    im = Image.fromarray(photo[y:y + ch, x:x + cw])
    out_w = rng.randint(640, 1280)
    out_h = max(480, min(960, int(out_w * rng.uniform(0.6, 0.9))))
    im = im.resize((out_w, out_h), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = np.array([rng.uniform(0.75, 1.25) for _ in range(3)], dtype=np.float32)
    arr = np.clip(np.asarray(im, dtype=np.float32) * gains, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=rng.randint(85, 95))
    caption = f"a {rng.choice(['photo', 'picture', 'snapshot'])} of the {name.replace('_', ' ')}, {out_w}x{out_h}"
    return buf.getvalue(), caption


def write_bench_shards(out: Path, images: int, per_shard: int = 100, seed: int = 0,
                       caption_for: Callable[[str], str] | None = None, caption_format: str | None = None) -> str:
    """Shards 00000.tar ... (KEY.jpg, KEY.txt, KEY.json) under OUT; returns the brace spec. Cached.
    caption_for(photo name), when given, writes its caption instead of the photo's own (the photos stay the
    same for the seed); caption_format names that recipe in the cache's manifest."""
    out = Path(out)
    manifest = out / "manifest.json"
    wanted = {"images": images, "per_shard": per_shard, "seed": seed, "format": SHARD_FORMAT}
    if caption_format:
        wanted["captions"] = caption_format
    shards = (images + per_shard - 1) // per_shard
    spec = str(out / f"{{00000..{shards - 1:05d}}}.tar")
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return spec
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # while shards are rewritten, no manifest vouches for them
    photos = _source_photos()
    rng = random.Random(seed)
    for s in range(shards):
        with atomic_file(out / f"{s:05d}.tar") as f, tarfile.open(fileobj=f, mode="w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                name, photo = photos[i % len(photos)]
                jpg, caption = _variant(name, photo, rng)
                caption = caption if caption_for is None else caption_for(name)
                key = f"{s:05d}{i - s * per_shard:04d}"
                for ext, payload in (("jpg", jpg), ("txt", caption.encode()),
                                     ("json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    atomic_write_text(manifest, json.dumps(wanted))  # last: the shards under it are complete
    return spec


# --------------------------------------------------------------------------------------------- captions

_SUBJECTS = {
    "astronaut": ["an astronaut", "a nasa astronaut", "an astronaut in a white spacesuit", "astronaut portrait"],
    "coffee": ["a cup of coffee", "coffee", "an espresso cup on a saucer", "latte art in a white cup"],
    "chelsea": ["a cat", "a tabby cat", "ginger kitten", "a cute cat looking at the camera"],
    "rocket": ["a rocket", "rocket launch", "the space shuttle on the launch pad", "a rocket before launch"],
    "immunohistochemistry": ["a microscope slide", "stained tissue", "cells under the microscope", "histology"],
    "hubble_deep_field": ["galaxies", "deep space", "the hubble deep field", "a night sky full of distant galaxies"],
}
_ADJECTIVES = ("small large old new white black red blue green bright dark vintage modern beautiful cute happy "
               "close-up aerial colorful wooden quiet busy cozy sunny rainy famous rare classic natural").split()
_NOUNS = ("table window light background street city garden room sky water tree book desk wall floor morning "
          "evening sunset kitchen office camera lens detail texture pattern view home studio museum").split()
_PREPOSITIONS = "on in with near under behind at over by from".split()
_WEB_TERMS = ["stock photo", "free download", "hd wallpaper", "royalty free image", "high resolution",
              "photo by", "image", "picture", "jpg", "4k", "for sale", "buy online", "- Pinterest", "| Flickr"]
_TAGS = ["#photography", "#travel", "#love", "#instagood", "#nature", "#art", "#science", "#space", "#coffee",
         "#cat", "#photooftheday", "#picoftheday"]


def caption_words(rng: random.Random) -> int:
    """Words in a caption: log-normal, median 11, about 5% over 29 (as in web alt-text), 2..63."""
    return max(2, min(63, round(math.exp(rng.gauss(math.log(11), 0.59)))))


def _phrase(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return (f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_PREPOSITIONS)} the "
                f"{rng.choice(_NOUNS)}")
    if r < 0.7:
        return f"{rng.choice(_PREPOSITIONS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    if r < 0.85:
        return rng.choice(_WEB_TERMS)
    if r < 0.93:
        return " ".join(rng.sample(_TAGS, rng.randint(1, 3)))
    return rng.choice([str(rng.randint(1995, 2024)), f"{rng.randint(640, 4000)}x{rng.randint(480, 3000)}",
                       f"IMG_{rng.randint(1000, 9999)}", f"({rng.randint(1, 99)})"])


def web_caption(rng: random.Random, photo_name: str) -> str:
    """A caption of caption_words() words: the photo's subject, then web-like phrases, cut at the count."""
    words = caption_words(rng)
    subject = rng.choice(_SUBJECTS.get(photo_name, [photo_name.replace("_", " ")]))
    parts = rng.choice([f"photo of {subject}", subject, f"{subject} stock photo", f"close-up of {subject}"]).split()
    while len(parts) < words:
        if rng.random() < 0.4:
            parts[-1] += ","
        parts += _phrase(rng).split()
    text = " ".join(parts[:words]).rstrip(",")
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def write_train_shards(out: Path, images: int, per_shard: int = 100, seed: int = 0) -> str:
    """Shards 00000.tar ... of photos (bench data's recipe: the same photos for the same seed) with web-like
    captions (KEY.jpg, KEY.txt, KEY.json, img2dataset's layout) under OUT; returns the brace spec. Cached."""
    caption_rng = random.Random(f"captions-{seed}")
    return write_bench_shards(out, images, per_shard, seed, caption_for=lambda name: web_caption(caption_rng, name),
                              caption_format=CAPTION_FORMAT)
