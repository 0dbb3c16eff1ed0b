"""The built-in dataset: procedurally drawn shapes with captions that describe them.

Training shards use img2dataset's layout (KEY.jpg, KEY.txt, KEY.json in 00000.tar, 00001.tar, ...).
The evaluation split uses CLIP_benchmark's webdataset layout (test/N.tar with KEY.jpg + KEY.cls,
test/nshards.txt, classnames.txt, zeroshot_classification_templates.txt), so the same directory
works with `clip_benchmark eval --dataset wds/... --dataset_root DIR/eval`. The retrieval split uses
CLIP_benchmark's retrieval layout (retrieval/test/N.tar with KEY.jpg + KEY.txt holding several captions
of the image, one per line; retrieval/dataset_type.txt = "retrieval").

The zero-shot task is "which coloured shape is this" (len(COLOURS) x len(SHAPES) classes). A fixed set
of (background, position) combinations is held out of training for every class alike: evaluation
images use only those combinations, so accuracy measures generalisation to scenes unlike any seen in
training, not memorisation. The held-out set does not depend on the class, so the background or
position carries no information about the label (holding out a background per class would let a
model learn "this background never goes with that shape" and score below chance). The retrieval split
is drawn from the same held-out combinations, each scene description at most once, and its captions name
every attribute: no two of its images share a caption.

The downstream split (downstream/train/N.tar and downstream/test/N.tar with KEY.jpg + KEY.cls + KEY.json,
each with nshards.txt; classnames.txt, zeroshot_classification_templates.txt, dataset_type.txt =
"classification") is a labelled set for adaptation experiments (linear probe, fine-tuning). Its label is a
property no pretraining caption names: how the shapes are filled (FILL_STYLES: solid; outlined, only a band
along the edge; hatched, stripes of the colour and white; dotted, the colour with dark dots), over the same
random colours, shapes, sizes, counts, backgrounds and positions (every combination, none held out). A
pretrained model's zero-shot accuracy on it is near chance (its text tower never saw the class names'
words), so what adaptation reaches is its own doing. The classes are balanced (each once in every run of
len(FILL_STYLES) samples); there is no val split, a fine-tuner splits one off train.
"""
from __future__ import annotations

import io
import itertools
import json
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..atomic import atomic_write_text

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 35),
    "purple": (140, 55, 190),
    "orange": (245, 135, 25),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]
SIZES = {"small": (0.22, 0.30), "large": (0.36, 0.48)}  # shape diameter as a fraction of the image
POSITIONS = {  # (x range, y range) of shape centres, fractions of the image
    "left": ((0.18, 0.35), (0.2, 0.8)),
    "right": ((0.65, 0.82), (0.2, 0.8)),
    "top": ((0.2, 0.8), (0.18, 0.35)),
    "bottom": ((0.2, 0.8), (0.65, 0.82)),
    "centre": ((0.4, 0.6), (0.4, 0.6)),
}
BACKGROUNDS = ["white", "black", "grey", "striped", "speckled"]
STYLES = ("flat", "photo")  # how a scene is drawn (render): plain backgrounds, or with a photograph's structure
COUNTS = {1: "a", 2: "two", 3: "three"}

ZEROSHOT_TEMPLATES = [
    "a photo of a {c}.",
    "a {c}.",
    "a picture of a {c}.",
    "a drawing of a {c}.",
    "an image with a {c} in it.",
]

# The retrieval split's captions name every attribute of the scene (see retrieval_scene).
RETRIEVAL_TEMPLATES = [
    "{count} {size} {colour} {shape} at the {pos} on a {bg} background",
    "a {bg} background with {count} {size} {colour} {shape} in the {pos}",
    "there {be} {count} {size} {colour} {shape} at the {pos}, {bg} background",
    "a photo of {count} {size} {colour} {shape} on {bg}, placed at the {pos}",
    "the {pos} of the picture shows {count} {size} {colour} {shape} over a {bg} background",
]

CAPTION_TEMPLATES = [
    "{count} {size} {colour} {shape} on a {bg} background",
    "a photo of {count} {colour} {shape} at the {pos}",
    "{count} {colour} {shape} in the {pos} of the picture, {bg} background",
    "there {be} {count} {size} {colour} {shape} here",
    "{bg} background with {count} {colour} {shape} on the {pos}",
    "an image of {count} {colour} {shape}",
]


# The downstream split's label: how the shapes are filled. No pretraining caption names it (they name
# colour, shape, size, position, background and count), so zero-shot has nothing to go on.
FILL_STYLES = ["solid", "outlined", "hatched", "dotted"]
HATCH_TONE, DOT_TONE = (245, 245, 245), (20, 20, 20)  # hatched: colour and white stripes; dotted: dark dots
PATTERN_PERIOD = 0.08  # of the stripes and of the dot grid, as a fraction of the image (at least 3 pixels)
OUTLINE_WIDTH = 0.16  # of an outlined shape's band, as a fraction of the shape's radius (at least 1 pixel)
DOWNSTREAM_TEMPLATES = [  # "the": "an outlined shape" but "a solid shape"
    "a photo of the {c}.",
    "the {c}.",
    "a picture of the {c}.",
    "a drawing of the {c}.",
    "an image with the {c} in it.",
]


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def downstream_class_names() -> list[str]:
    """The downstream split's classes, in label order: one per fill style ("solid shape", ...)."""
    return [f"{f} shape" for f in FILL_STYLES]


def is_held_out(background: str, position: str) -> bool:
    """Whether this (background, position) combination is reserved for evaluation (5 of 25)."""
    return (BACKGROUNDS.index(background) + list(POSITIONS).index(position)) % len(BACKGROUNDS) == 0


HELD_OUT = [(b, p) for b in BACKGROUNDS for p in POSITIONS if is_held_out(b, p)]
# distinct scene descriptions of the retrieval split (see retrieval_scene)
MAX_RETRIEVAL = len(COLOURS) * len(SHAPES) * len(SIZES) * len(HELD_OUT) * len(COUNTS)
TRAIN_COMBOS = [(b, p) for b in BACKGROUNDS for p in POSITIONS if not is_held_out(b, p)]


@dataclass(frozen=True)
class SceneSpec:
    colour: str
    shape: str
    size: str
    position: str
    background: str
    count: int
    template: int


CAPTIONS_PER_IMAGE = 5  # retrieval split: as many as COCO and Flickr30k give each image
RETRIEVAL_DIR = "retrieval"
DOWNSTREAM_DIR = "downstream"
DOWNSTREAM_SPLITS = ("train", "test")
DOWNSTREAM_TRAIN_SAMPLES, DOWNSTREAM_TEST_SAMPLES = 2000, 1000  # the default sizes of its splits
FORMAT = "clipkit-synth-v4"  # v3 had no downstream split, v2 no retrieval split either


def sample_scene(rng: random.Random, split: str) -> SceneSpec:
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    background, position = rng.choice(HELD_OUT if split == "eval" else TRAIN_COMBOS)
    return SceneSpec(
        colour=colour,
        shape=shape,
        size=rng.choice(list(SIZES)),
        position=position,
        background=background,
        count=rng.choice(list(COUNTS)),
        template=rng.randrange(len(CAPTION_TEMPLATES)),
    )


def downstream_scene(rng: random.Random) -> SceneSpec:
    """A scene of the downstream split: any colour, shape, size, count, background and position (its
    background and position combinations are not held out: the split is for adaptation, not zero-shot)."""
    background, position = rng.choice(TRAIN_COMBOS + HELD_OUT)
    return SceneSpec(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        size=rng.choice(list(SIZES)),
        position=position,
        background=background,
        count=rng.choice(list(COUNTS)),
        template=0,  # no caption
    )


def downstream_label(seed: int, split: str, index: int) -> int:
    """The index-th sample's label (an index into FILL_STYLES). Every run of len(FILL_STYLES) samples holds
    each class once, in an order drawn for it: the classes are balanced, and a sample does not depend on
    how many are written."""
    block, offset = divmod(index, len(FILL_STYLES))
    order = list(range(len(FILL_STYLES)))
    random.Random(f"clipkit-synth/{seed}/{split}/labels/{block}").shuffle(order)
    return order[offset]


def caption(scene: SceneSpec, templates: list[str] = CAPTION_TEMPLATES) -> str:
    shape = scene.shape + ("es" if scene.shape == "cross" else "s") if scene.count > 1 else scene.shape
    count = COUNTS[scene.count]
    if scene.count == 1:
        # the article agrees with the word that follows it in this template
        template = templates[scene.template]
        after = template.split("{count}", 1)[1].split()[0]
        first = {"{size}": scene.size, "{colour}": scene.colour}.get(after, after)
        count = "an" if first[:1] in "aeiou" else "a"
    return templates[scene.template].format(
        count=count,
        size=scene.size,
        colour=scene.colour,
        shape=shape,
        bg=scene.background,
        pos=scene.position,
        be="are" if scene.count > 1 else "is",
    )


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(name: str, size: int, rng: random.Random) -> Image.Image:
    if name == "white":
        return Image.new("RGB", (size, size), _jitter((245, 245, 240), rng, 10))
    if name == "black":
        return Image.new("RGB", (size, size), _jitter((20, 20, 25), rng, 10))
    if name == "grey":
        return Image.new("RGB", (size, size), _jitter((128, 128, 128), rng, 15))
    nprng = np.random.default_rng(rng.getrandbits(32))
    if name == "striped":
        base = np.array(_jitter((200, 200, 200), rng, 20), dtype=np.float32)
        period = rng.randint(6, 14) * size // 128 + 2
        idx = np.arange(size)
        grid = (idx[:, None] + idx[None, :]) if rng.random() < 0.5 else np.broadcast_to(idx, (size, size))
        stripes = ((grid // period) % 2).astype(np.float32)[..., None]
        arr = base * (0.55 + 0.45 * stripes)
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if name == "speckled":
        arr = nprng.normal(150, 45, size=(size, size, 3))
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    raise ValueError(f"unknown background {name!r}")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = np.deg2rad(-90 + 36 * i)
            rr = 1.0 if i % 2 == 0 else 0.42
            pts.append((rr * np.cos(a), rr * np.sin(a)))
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    ca, sa = np.cos(angle), np.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(scene: SceneSpec, image_size: int, rng: random.Random, fill_style: str = "solid",
           style: str = "flat") -> Image.Image:
    """Draw the scene at 2x and downsample, for anti-aliased edges. `fill_style` (one of FILL_STYLES) is how
    the shapes are filled: the downstream split's label; every other split draws them solid. `style` (one of
    STYLES) is how the rest of the picture looks: "flat", the plain backgrounds; "photo", the structure of a
    photograph (see _photo_background): the same scene and caption, but unrelated pictures no longer share
    their coarse layout of light and dark, which is what perceptual hashes compare."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {', '.join(STYLES)}")
    big = image_size * 2
    img = _background(scene.background, big, rng) if style == "flat" else _photo_background(scene.background, big, rng)
    draw = ImageDraw.Draw(img)
    (x0, x1), (y0, y1) = POSITIONS[scene.position]
    lo, hi = SIZES[scene.size]
    for _ in range(scene.count):
        diameter = rng.uniform(lo, hi) * big / (1.0 + 0.25 * (scene.count - 1))
        r = diameter / 2
        cx, cy = rng.uniform(x0, x1) * big, rng.uniform(y0, y1) * big
        fill = _jitter(COLOURS[scene.colour], rng)
        if fill_style != "solid":
            mask = Image.new("L", (big, big), 0)
            _draw_shape(ImageDraw.Draw(mask), scene.shape, cx, cy, r, 255, rng)
            _paint_shape(img, mask, r, fill, fill_style, rng)
        else:  # the other splits' way, unchanged
            _draw_shape(draw, scene.shape, cx, cy, r, fill, rng)
    if style == "photo":
        img = _lighting(img, rng)
    return img.resize((image_size, image_size), Image.LANCZOS)


def _natural_fields(nprng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """`channels` random fields of size x size with a photograph's 1/f amplitude spectrum (most of the energy
    at the lowest frequencies), each with zero mean and unit standard deviation."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amplitude = 1.0 / f
    amplitude[0, 0] = 0.0
    shape = (channels, size, fx.shape[1])
    spectrum = (nprng.normal(size=shape) + 1j * nprng.normal(size=shape)) * amplitude
    fields = np.fft.irfft2(spectrum, s=(size, size))
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    return fields / np.maximum(fields.std(axis=(1, 2), keepdims=True), 1e-8)


PHOTO_TONES = {"white": (232.0, 20.0), "black": (30.0, 16.0), "grey": (128.0, 30.0)}  # (mean, contrast)


def _photo_background(name: str, size: int, rng: random.Random) -> Image.Image:
    """The named background ("white", "black", "grey", "striped", "speckled": what the caption says) with a
    photograph's structure: a 1/f luminance field and a fainter colour cast over it, then 2-5 clutter objects
    (ellipses, boxes and bars in muted, desaturated tones, none of the shapes' colours) anywhere in the frame."""
    nprng = np.random.default_rng(rng.getrandbits(32))
    fields = _natural_fields(nprng, size, 3)
    lum, tint = fields[0][..., None], np.moveaxis(fields[1:], 0, -1)
    tint = np.concatenate([tint, -tint.sum(axis=-1, keepdims=True) / 2], axis=-1)  # a cast, not a brightness
    if name in PHOTO_TONES:
        mean, contrast = PHOTO_TONES[name]
        arr = mean + contrast * lum + 6.0 * tint
    else:
        flat = np.asarray(_background(name, size, rng), dtype=np.float32)
        arr = flat + 28.0 * lum + 6.0 * tint
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        grey = rng.randint(50, 210)
        tone = tuple(max(0, min(255, grey + rng.randint(-14, 14))) for _ in range(3))
        w, h = rng.uniform(0.08, 0.4) * size, rng.uniform(0.08, 0.4) * size
        x, y = rng.uniform(-0.1, 1.0) * size, rng.uniform(-0.1, 1.0) * size
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse([x, y, x + w, y + h], fill=tone)
        elif kind == 1:
            draw.rectangle([x, y, x + w, y + h], fill=tone)
        else:
            draw.line([x, y, x + w, y + h], fill=tone, width=max(1, round(rng.uniform(0.02, 0.05) * size)))
    return img


def _lighting(img: Image.Image, rng: random.Random) -> Image.Image:
    """Uneven light over the whole picture, as a photograph has: a ramp of +-10..30% at a random angle."""
    size = img.size[0]
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1) - 0.5
    gain = 1.0 + strength * 2 * (xx * np.cos(angle) + yy * np.sin(angle))
    arr = np.asarray(img, dtype=np.float32) * gain[..., None]
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rng: random.Random):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        angle = rng.uniform(-0.25, 0.25)
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _paint_shape(img: Image.Image, mask: Image.Image, r: float, fill: tuple[int, ...], fill_style: str,
                 rng: random.Random) -> None:
    """Paint the shape whose MASK (drawn at 2x) is given onto IMG in FILL_STYLE: solid; outlined (a band along
    the edge in the colour, the background showing inside); hatched (stripes of the colour and of white, at a
    random angle); dotted (the colour with a grid of dark dots at a random angle). The pattern period follows
    the image size and the outline's width the shape's radius R (small shapes keep a hole), each with a floor
    of about one output pixel per line or gap, so the pattern survives the downsampling. The second tones make
    the styles differ in colour as well as in texture: a frozen encoder trained on these scenes attends to
    colour above all, and this is what lets a linear probe tell the styles apart (with the background showing
    between the stripes and dots instead, it barely can)."""
    big = mask.size[0]
    width = max(2, round(OUTLINE_WIDTH * r))  # of the outline
    # work on the shape's bounding box (with a margin for the outline's erosion), in image coordinates
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, 1, 1)
    x0, y0, x1, y1 = max(0, x0 - width - 1), max(0, y0 - width - 1), min(big, x1 + width + 1), min(big, y1 + width + 1)
    crop = mask.crop((x0, y0, x1, y1))
    inside = np.asarray(crop) > 127
    layers = []  # (tone, where), painted in order
    if fill_style == "solid":
        layers.append((fill, inside))
    elif fill_style == "outlined":
        core = np.asarray(crop.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
        layers.append((fill, inside & ~core))
    elif fill_style in ("hatched", "dotted"):
        period = max(6.0, PATTERN_PERIOD * big)
        angle = rng.uniform(0, np.pi)
        phase_u, phase_v = rng.uniform(0, period), rng.uniform(0, period)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u = xx * np.cos(angle) + yy * np.sin(angle) + phase_u
        layers.append((fill, inside))
        if fill_style == "hatched":  # every other stripe white
            layers.append((_jitter(HATCH_TONE, rng, 10), inside & ((u % period) >= period / 2)))
        else:
            v = -xx * np.sin(angle) + yy * np.cos(angle) + phase_v
            du, dv = (u % period) - period / 2, (v % period) - period / 2
            layers.append((_jitter(DOT_TONE, rng, 10), inside & (du * du + dv * dv < (0.36 * period) ** 2)))
    else:
        raise ValueError(f"unknown fill style {fill_style!r}")
    for tone, where in layers:
        img.paste(tone, (x0, y0, x1, y1), Image.fromarray(where.astype(np.uint8) * 255))


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class _ShardJob:
    path: str
    split: str
    start: int
    count: int
    seed: int
    image_size: int
    style: str = "flat"  # render's style


def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"clipkit-synth/{seed}/{split}/{index}")


def retrieval_scene(seed: int, index: int, rng: random.Random) -> SceneSpec:
    """The index-th scene of the retrieval split: every scene description (colour, shape, size, count,
    held-out background and position) at most once, in an order fixed by the seed. Two images with the
    same description would have identical captions, which tie exactly in text retrieval."""
    scenes = _retrieval_scenes(seed)
    if index >= len(scenes):
        raise ValueError(f"the retrieval split holds at most {len(scenes)} distinct scenes")
    colour, shape, size, (background, position), count = scenes[index]
    return SceneSpec(colour, shape, size, position, background, count, rng.randrange(len(RETRIEVAL_TEMPLATES)))


@lru_cache(maxsize=4)
def _retrieval_scenes(seed: int) -> list[tuple]:
    scenes = list(itertools.product(COLOURS, SHAPES, SIZES, HELD_OUT, COUNTS))
    random.Random(f"clipkit-synth/{seed}/retrieval-scenes").shuffle(scenes)
    return scenes


def retrieval_captions(scene: SceneSpec) -> list[str]:
    """CAPTIONS_PER_IMAGE captions of the scene in different phrasings (its drawn one first), each naming
    every attribute, so no two images of the split share a caption."""
    order = [scene.template] + [t for t in range(len(RETRIEVAL_TEMPLATES)) if t != scene.template]
    return [caption(replace(scene, template=t), RETRIEVAL_TEMPLATES) for t in order[:CAPTIONS_PER_IMAGE]]


def _downstream_sample(job: _ShardJob, index: int) -> dict:
    rng = _sample_rng(job.seed, job.split, index)
    label = downstream_label(job.seed, job.split, index)
    scene = downstream_scene(rng)
    img = render(scene, job.image_size, rng, FILL_STYLES[label], style=job.style)
    key = f"{index:09d}"
    meta = {"key": key, "width": job.image_size, "height": job.image_size, "fill": FILL_STYLES[label],
            "label": label, "classname": downstream_class_names()[label],
            **{k: v for k, v in asdict(scene).items() if k != "template"}}
    return {"__key__": key, "jpg": _jpeg(img), "cls": str(label), "json": json.dumps(meta).encode()}


def _sample(job: _ShardJob, index: int, classes: list[str]) -> dict:
    if job.split.startswith(DOWNSTREAM_DIR + "/"):
        return _downstream_sample(job, index)
    rng = _sample_rng(job.seed, job.split, index)
    if job.split == "retrieval":
        scene = retrieval_scene(job.seed, index, rng)
        texts = retrieval_captions(scene)
    else:
        scene = sample_scene(rng, job.split)
        texts = [caption(scene)]
    img = render(scene, job.image_size, rng, style=job.style)
    key = f"{index:09d}"
    meta = {"key": key, "caption": texts[0], "width": job.image_size, "height": job.image_size,
            "status": "success", "url": None, **asdict(scene)}
    sample = {"__key__": key, "jpg": _jpeg(img), "txt": "\n".join(texts), "json": json.dumps(meta).encode()}
    if job.split == "eval":
        sample["cls"] = str(classes.index(f"{scene.colour} {scene.shape}"))
    return sample


def _write_shard(job: _ShardJob) -> int:
    import webdataset as wds

    classes = class_names()
    with wds.TarWriter(job.path) as sink:
        for index in range(job.start, job.start + job.count):
            sink.write(_sample(job, index, classes))
    if job.split == "train":
        stats = {"count": job.count, "successes": job.count, "failed_to_download": 0, "failed_to_resize": 0}
        Path(job.path).with_name(Path(job.path).stem + "_stats.json").write_text(json.dumps(stats))
    return job.count


@dataclass(frozen=True)
class SynthDataset:
    root: Path
    train_spec: str  # brace pattern over the training shards
    eval_root: Path  # CLIP_benchmark-style zero-shot root
    num_train: int
    num_eval: int
    retrieval_root: Path | None = None  # CLIP_benchmark-style retrieval root
    num_retrieval: int = 0  # images in it (CAPTIONS_PER_IMAGE captions each)
    downstream_root: Path | None = None  # CLIP_benchmark-style classification root (train/ and test/)
    num_downstream_train: int = 0
    num_downstream_test: int = 0


def _shard_jobs(directory: Path, split: str, total: int, per_shard: int, seed: int, size: int,
                name_fmt: str, style: str = "flat") -> list[_ShardJob]:
    jobs = []
    for i, start in enumerate(range(0, total, per_shard)):
        jobs.append(_ShardJob(str(directory / name_fmt.format(i)), split, start,
                              min(per_shard, total - start), seed, size, style))
    return jobs


def _run_jobs(jobs: list[_ShardJob], workers: int) -> None:
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)


def _retrieval_jobs(root: Path, params: dict) -> list[_ShardJob]:
    test_dir = root / RETRIEVAL_DIR / "test"
    test_dir.mkdir(parents=True, exist_ok=True)
    return _shard_jobs(test_dir, "retrieval", params["retrieval_samples"], params["samples_per_shard"],
                       params["seed"], params["image_size"], "{}.tar", params.get("style", "flat"))


def _write_retrieval_files(root: Path, nshards: int) -> None:
    (root / RETRIEVAL_DIR / "test" / "nshards.txt").write_text(f"{nshards}\n")
    (root / RETRIEVAL_DIR / "dataset_type.txt").write_text("retrieval\n")


def _downstream_jobs(root: Path, params: dict) -> list[_ShardJob]:
    jobs = []
    for split in DOWNSTREAM_SPLITS:
        directory = root / DOWNSTREAM_DIR / split
        directory.mkdir(parents=True, exist_ok=True)
        split_jobs = _shard_jobs(directory, f"{DOWNSTREAM_DIR}/{split}", params[f"downstream_{split}_samples"],
                                 params["samples_per_shard"], params["seed"], params["image_size"], "{}.tar",
                                 params.get("style", "flat"))
        for stale in directory.glob("*.tar"):  # from an earlier write with more shards
            if stale.stem.isdigit() and int(stale.stem) >= len(split_jobs):
                stale.unlink()
        jobs += split_jobs
    return jobs


def _write_downstream_files(root: Path, jobs: list[_ShardJob]) -> None:
    base = root / DOWNSTREAM_DIR
    for split in DOWNSTREAM_SPLITS:
        nshards = sum(job.split == f"{DOWNSTREAM_DIR}/{split}" for job in jobs)
        (base / split / "nshards.txt").write_text(f"{nshards}\n")
    (base / "classnames.txt").write_text("\n".join(downstream_class_names()) + "\n")
    (base / "zeroshot_classification_templates.txt").write_text("\n".join(DOWNSTREAM_TEMPLATES) + "\n")
    (base / "dataset_type.txt").write_text("classification\n")


def write_synth_dataset(out: str | Path, train_samples: int = 20000, eval_samples: int = 1500,
                        samples_per_shard: int = 1000, image_size: int = 64, seed: int = 0,
                        workers: int = 2, retrieval_samples: int | None = None,
                        downstream_train_samples: int = DOWNSTREAM_TRAIN_SAMPLES,
                        downstream_test_samples: int = DOWNSTREAM_TEST_SAMPLES, style: str = "flat") -> SynthDataset:
    """Write the dataset under OUT (train/, eval/, retrieval/, downstream/, manifest.json). Deterministic for
    a seed. The retrieval split has `retrieval_samples` images (default: as many as the zero-shot split, up
    to its MAX_RETRIEVAL distinct scenes); the downstream split `downstream_train_samples` +
    `downstream_test_samples` labelled images. `style` (STYLES) is how every split's scenes are drawn."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {', '.join(STYLES)}")
    retrieval_samples = _retrieval_size(retrieval_samples, eval_samples)
    if min(train_samples, eval_samples, retrieval_samples, samples_per_shard, downstream_train_samples,
           downstream_test_samples) <= 0:
        raise ValueError("train_samples, eval_samples, retrieval_samples, downstream_train_samples, "
                         "downstream_test_samples and samples_per_shard must be positive")
    if retrieval_samples > MAX_RETRIEVAL:
        raise ValueError(f"retrieval_samples: the retrieval split holds at most {MAX_RETRIEVAL} distinct scenes")
    root = Path(out)
    train_dir, eval_dir = root / "train", root / "eval"
    (eval_dir / "test").mkdir(parents=True, exist_ok=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    params = dict(train_samples=train_samples, eval_samples=eval_samples, samples_per_shard=samples_per_shard,
                  image_size=image_size, seed=seed, retrieval_samples=retrieval_samples,
                  downstream_train_samples=downstream_train_samples, downstream_test_samples=downstream_test_samples,
                  style=style)
    jobs = _shard_jobs(train_dir, "train", train_samples, samples_per_shard, seed, image_size, "{:05d}.tar", style)
    eval_jobs = _shard_jobs(eval_dir / "test", "eval", eval_samples, samples_per_shard, seed, image_size, "{}.tar",
                            style)
    retrieval_jobs = _retrieval_jobs(root, params)
    downstream_jobs = _downstream_jobs(root, params)
    _run_jobs(jobs + eval_jobs + retrieval_jobs + downstream_jobs, workers)
    (eval_dir / "test" / "nshards.txt").write_text(f"{len(eval_jobs)}\n")
    (eval_dir / "classnames.txt").write_text("\n".join(class_names()) + "\n")
    (eval_dir / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    _write_retrieval_files(root, len(retrieval_jobs))
    _write_downstream_files(root, downstream_jobs)
    # Paths in the manifest are relative to the root, so the directory can be moved.
    manifest = {"format": FORMAT, "params": params,
                "train": f"train/{{00000..{len(jobs) - 1:05d}}}.tar", "eval": "eval", "retrieval": RETRIEVAL_DIR,
                "num_classes": len(class_names()), "captions_per_image": CAPTIONS_PER_IMAGE,
                "downstream": DOWNSTREAM_DIR, "num_downstream_classes": len(FILL_STYLES)}
    _write_manifest(root, manifest)
    return _from_manifest(root, manifest)


def _retrieval_size(requested: int | None, eval_samples: int) -> int:
    return min(eval_samples, MAX_RETRIEVAL) if requested is None else requested


def _write_manifest(root: Path, manifest: dict) -> None:
    # The manifest is written last, and atomically: its presence marks a complete dataset.
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=2))


def _from_manifest(root: Path, manifest: dict) -> SynthDataset:
    p = manifest["params"]
    retrieval, downstream = manifest.get("retrieval"), manifest.get("downstream")
    return SynthDataset(root, str(root / manifest["train"]), root / manifest["eval"], p["train_samples"],
                        p["eval_samples"], root / retrieval if retrieval else None, p.get("retrieval_samples", 0),
                        root / downstream if downstream else None, p.get("downstream_train_samples", 0),
                        p.get("downstream_test_samples", 0))


def _add_retrieval_split(root: Path, manifest: dict, retrieval_samples: int | None, workers: int) -> dict:
    """Complete a dataset written before the retrieval split existed; its other splits stay as they are
    (they are what this version would write for the same params anyway). Returns the new manifest, for the
    caller to write."""
    params = dict(manifest["params"])
    params["retrieval_samples"] = _retrieval_size(retrieval_samples, params["eval_samples"])
    if params["retrieval_samples"] <= 0 or params["retrieval_samples"] > MAX_RETRIEVAL:
        raise ValueError(f"retrieval_samples must be positive and at most {MAX_RETRIEVAL}")
    jobs = _retrieval_jobs(root, params)
    _run_jobs(jobs, workers)
    _write_retrieval_files(root, len(jobs))
    return {**manifest, "params": params, "retrieval": RETRIEVAL_DIR, "captions_per_image": CAPTIONS_PER_IMAGE}


def _add_downstream_split(root: Path, manifest: dict, train_samples: int | None, test_samples: int | None,
                          workers: int) -> dict:
    """Complete a dataset written before the downstream split existed, as _add_retrieval_split does."""
    params = dict(manifest["params"])
    wanted = (DOWNSTREAM_TRAIN_SAMPLES if train_samples is None else train_samples,
              DOWNSTREAM_TEST_SAMPLES if test_samples is None else test_samples)
    for split, n in zip(DOWNSTREAM_SPLITS, wanted):
        if n <= 0:
            raise ValueError(f"downstream_{split}_samples must be positive")
        params[f"downstream_{split}_samples"] = n
    jobs = _downstream_jobs(root, params)
    _run_jobs(jobs, workers)
    _write_downstream_files(root, jobs)
    return {**manifest, "params": params, "downstream": DOWNSTREAM_DIR, "num_downstream_classes": len(FILL_STYLES)}


def ensure_synth_dataset(out: str | Path, **params) -> SynthDataset:
    """Return the dataset at OUT, writing it first if it is missing or was made with other params (a param
    left out or None matches any value). A dataset from before the retrieval or the downstream split gains
    the split it lacks; its other splits are not rewritten."""
    root = Path(out)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        manifest["params"].setdefault("style", "flat")  # written before there were styles
        wanted = {k: v for k, v in params.items() if k in manifest["params"] and v is not None}
        if all(manifest["params"][k] == v for k, v in wanted.items()):
            workers = params.get("workers", 2)
            if "retrieval" not in manifest or "downstream" not in manifest:
                if "retrieval" not in manifest:
                    manifest = _add_retrieval_split(root, manifest, params.get("retrieval_samples"), workers)
                if "downstream" not in manifest:
                    manifest = _add_downstream_split(root, manifest, params.get("downstream_train_samples"),
                                                     params.get("downstream_test_samples"), workers)
                manifest = {**manifest, "format": FORMAT}
                _write_manifest(root, manifest)
            return _from_manifest(root, manifest)
    return write_synth_dataset(root, **params)
