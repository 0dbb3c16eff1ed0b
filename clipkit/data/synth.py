"""The built-in dataset: procedurally drawn shapes with captions that describe them.

Training shards use img2dataset's layout (KEY.jpg, KEY.txt, KEY.json in 00000.tar, 00001.tar, ...).
The evaluation split uses CLIP_benchmark's webdataset layout (test/N.tar with KEY.jpg + KEY.cls,
test/nshards.txt, classnames.txt, zeroshot_classification_templates.txt), so the same directory
works with `clip_benchmark eval --dataset wds/... --dataset_root DIR/eval`.

The zero-shot task is "which coloured shape is this" (len(COLOURS) x len(SHAPES) classes). A fixed set
of (background, position) combinations is held out of training for every class alike: evaluation
images use only those combinations, so accuracy measures generalisation to scenes unlike any seen in
training, not memorisation. The held-out set does not depend on the class, so the background or
position carries no information about the label (holding out a background per class would let a
model learn "this background never goes with that shape" and score below chance).
"""
from __future__ import annotations

import io
import json
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
COUNTS = {1: "a", 2: "two", 3: "three"}

ZEROSHOT_TEMPLATES = [
    "a photo of a {c}.",
    "a {c}.",
    "a picture of a {c}.",
    "a drawing of a {c}.",
    "an image with a {c} in it.",
]

CAPTION_TEMPLATES = [
    "{count} {size} {colour} {shape} on a {bg} background",
    "a photo of {count} {colour} {shape} at the {pos}",
    "{count} {colour} {shape} in the {pos} of the picture, {bg} background",
    "there {be} {count} {size} {colour} {shape} here",
    "{bg} background with {count} {colour} {shape} on the {pos}",
    "an image of {count} {colour} {shape}",
]


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def is_held_out(background: str, position: str) -> bool:
    """Whether this (background, position) combination is reserved for evaluation (5 of 25)."""
    return (BACKGROUNDS.index(background) + list(POSITIONS).index(position)) % len(BACKGROUNDS) == 0


HELD_OUT = [(b, p) for b in BACKGROUNDS for p in POSITIONS if is_held_out(b, p)]
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


def caption(scene: SceneSpec) -> str:
    shape = scene.shape + ("es" if scene.shape == "cross" else "s") if scene.count > 1 else scene.shape
    count = COUNTS[scene.count]
    if scene.count == 1:
        # the article agrees with the word that follows it in this template
        template = CAPTION_TEMPLATES[scene.template]
        after = template.split("{count}", 1)[1].split()[0]
        first = {"{size}": scene.size, "{colour}": scene.colour}.get(after, after)
        count = "an" if first[:1] in "aeiou" else "a"
    return CAPTION_TEMPLATES[scene.template].format(
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


def render(scene: SceneSpec, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene at 2x and downsample, for anti-aliased edges."""
    big = image_size * 2
    img = _background(scene.background, big, rng)
    draw = ImageDraw.Draw(img)
    (x0, x1), (y0, y1) = POSITIONS[scene.position]
    lo, hi = SIZES[scene.size]
    for _ in range(scene.count):
        diameter = rng.uniform(lo, hi) * big / (1.0 + 0.25 * (scene.count - 1))
        r = diameter / 2
        cx, cy = rng.uniform(x0, x1) * big, rng.uniform(y0, y1) * big
        fill = _jitter(COLOURS[scene.colour], rng)
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            angle = rng.uniform(-0.25, 0.25)
            draw.polygon(_polygon(scene.shape, cx, cy, r, angle), fill=fill)
    return img.resize((image_size, image_size), Image.LANCZOS)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@dataclass(frozen=True)
class _ShardJob:
    path: str
    split: str
    start: int
    count: int
    seed: int
    image_size: int


def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"clipkit-synth/{seed}/{split}/{index}")


def _write_shard(job: _ShardJob) -> int:
    import webdataset as wds

    classes = class_names()
    with wds.TarWriter(job.path) as sink:
        for index in range(job.start, job.start + job.count):
            rng = _sample_rng(job.seed, job.split, index)
            scene = sample_scene(rng, job.split)
            img = render(scene, job.image_size, rng)
            key = f"{index:09d}"
            text = caption(scene)
            meta = {"key": key, "caption": text, "width": job.image_size, "height": job.image_size,
                    "status": "success", "url": None, **asdict(scene)}
            sample = {"__key__": key, "jpg": _jpeg(img), "txt": text, "json": json.dumps(meta).encode()}
            if job.split == "eval":
                sample["cls"] = str(classes.index(f"{scene.colour} {scene.shape}"))
            sink.write(sample)
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


def _shard_jobs(directory: Path, split: str, total: int, per_shard: int, seed: int, size: int,
                name_fmt: str) -> list[_ShardJob]:
    jobs = []
    for i, start in enumerate(range(0, total, per_shard)):
        jobs.append(_ShardJob(str(directory / name_fmt.format(i)), split, start,
                              min(per_shard, total - start), seed, size))
    return jobs


def write_synth_dataset(out: str | Path, train_samples: int = 20000, eval_samples: int = 1500,
                        samples_per_shard: int = 1000, image_size: int = 64, seed: int = 0,
                        workers: int = 2) -> SynthDataset:
    """Write the dataset under OUT (train/, eval/, manifest.json). Deterministic for a seed."""
    if train_samples <= 0 or eval_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("train_samples, eval_samples and samples_per_shard must be positive")
    root = Path(out)
    train_dir, eval_dir = root / "train", root / "eval"
    (eval_dir / "test").mkdir(parents=True, exist_ok=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    jobs = _shard_jobs(train_dir, "train", train_samples, samples_per_shard, seed, image_size, "{:05d}.tar")
    eval_jobs = _shard_jobs(eval_dir / "test", "eval", eval_samples, samples_per_shard, seed, image_size, "{}.tar")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_shard, jobs + eval_jobs))
    else:
        for job in jobs + eval_jobs:
            _write_shard(job)
    (eval_dir / "test" / "nshards.txt").write_text(f"{len(eval_jobs)}\n")
    (eval_dir / "classnames.txt").write_text("\n".join(class_names()) + "\n")
    (eval_dir / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    params = dict(train_samples=train_samples, eval_samples=eval_samples,
                  samples_per_shard=samples_per_shard, image_size=image_size, seed=seed)
    # Paths in the manifest are relative to the root, so the directory can be moved.
    manifest = {"format": "clipkit-synth-v2", "params": params,
                "train": f"train/{{00000..{len(jobs) - 1:05d}}}.tar", "eval": "eval",
                "num_classes": len(class_names())}
    # The manifest is written last: its presence marks a complete dataset.
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return _from_manifest(root, manifest)


def _from_manifest(root: Path, manifest: dict) -> SynthDataset:
    p = manifest["params"]
    return SynthDataset(root, str(root / manifest["train"]), root / manifest["eval"], p["train_samples"],
                        p["eval_samples"])


def ensure_synth_dataset(out: str | Path, **params) -> SynthDataset:
    """Return the dataset at OUT, writing it first if it is missing or was made with other params."""
    root = Path(out)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        wanted = {k: params[k] for k in manifest["params"] if k in params}
        if all(manifest["params"][k] == v for k, v in wanted.items()):
            return _from_manifest(root, manifest)
    return write_synth_dataset(root, **params)
