"""A labelled task drawn here, outside the project's built-in data: textures in an ImageFolder train/val/test.

    root = write_texture_task(tmp_path / "task", per_class=(60, 20, 40))   # 6 classes, the shape of a small task

The label is the texture (stripes one way or another, a checkerboard, dots, rings, plain), over random colours,
periods and phases; no pretraining caption of the built-in data names it, so zero-shot is near chance and what
fine-tuning reaches is its own doing. With `colours`, every texture comes in each of those colour families as
its own class ("red checkerboard"), for a task of many classes.

Run as a script, it measures every method with the defaults on tasks of this kind (the figures in
docs/finetune.md):

    python tests/drawn_task.py CHECKPOINT OUT_DIR [--shape small|many] [--size 32] [--methods linear_probe,full,lora]
                               [--templates "{c};a photo of {c}."]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

TEXTURES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots", "plain")
# colour families: hue ranges (degrees) a class's colours are drawn from
COLOURS = {"red": (-15, 15), "green": (100, 140), "blue": (210, 250), "yellow": (45, 65)}


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb((hue % 360) / 360, sat, val)) * 255


def draw(texture: str, rng: random.Random, size: int, hue_range: tuple[int, int] | None = None) -> Image.Image:
    hue = rng.uniform(*hue_range) if hue_range else rng.uniform(0, 360)
    fg = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    bg = _hsv(hue + rng.uniform(120, 240), rng.uniform(0.0, 0.4), rng.uniform(0.2, 1.0))
    period = rng.randint(max(4, size // 8), max(6, size // 3))
    phase_x, phase_y = rng.randrange(period), rng.randrange(period)
    y, x = np.mgrid[0:size, 0:size]
    x, y = x + phase_x, y + phase_y
    half = period / 2
    if texture == "horizontal stripes":
        mask = (y % period) < half
    elif texture == "vertical stripes":
        mask = (x % period) < half
    elif texture == "diagonal stripes":
        mask = ((x + y) % period) < half
    elif texture == "checkerboard":
        mask = ((x // half).astype(int) + (y // half).astype(int)) % 2 == 0
    elif texture == "polka dots":
        mask = ((x % period) - half) ** 2 + ((y % period) - half) ** 2 < (period / 4) ** 2
    else:  # plain
        mask = np.ones((size, size), dtype=bool)
    img = np.where(mask[..., None], fg, bg)
    img = img + np.random.default_rng(rng.randrange(2**32)).normal(0, 8, img.shape)  # a little sensor noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def classes(textures: int = 6, colours: int = 0) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(class name, texture, hue range) per class."""
    out = []
    for texture in TEXTURES[:textures]:
        if colours:
            out += [(f"{c} {texture}", texture, COLOURS[c]) for c in list(COLOURS)[:colours]]
        else:
            out.append((texture, texture, None))
    return out


def write_texture_task(root: str | Path, per_class: tuple[int, int, int] = (60, 20, 40), textures: int = 6,
                       colours: int = 0, size: int = 32, seed: int = 0, templates: list[str] | None = None) -> Path:
    """root/{train,val,test}/<class>/<n>.png (ImageFolder; "_" in a folder name reads as a space); with
    `templates`, root/zeroshot_classification_templates.txt (else the task uses the 80 OpenAI templates)."""
    root = Path(root)
    if templates:
        root.mkdir(parents=True, exist_ok=True)
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    rng = random.Random(seed)
    for name, texture, hues in classes(textures, colours):
        for split, n in zip(("train", "val", "test"), per_class):
            folder = root / split / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(texture, rng, size, hues).save(folder / f"{i}.png")
    return root


SHAPES = {"small": dict(per_class=(60, 20, 40), textures=6),  # the shape of the task in the issue: 6 classes
          "many": dict(per_class=(8, 4, 10), textures=6, colours=4)}  # 24 classes, few images each


def main() -> None:
    from clipkit.finetune.run import main as finetune_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--methods", default="linear_probe,full,lora")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--templates", default=None,
                   help="the task's zero-shot templates, ';'-separated (default: the 80 OpenAI templates)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every method")
    args = p.parse_args()
    out = Path(args.out)
    data = write_texture_task(out / "data", **SHAPES[args.shape], size=args.size,
                              templates=args.templates.split(";") if args.templates else None)
    rows = {}
    for method in args.methods.split(","):
        finetune_main(["--checkpoint", args.checkpoint, "--data", str(data), "--method", method,
                       "--out", str(out / method), "run.progress=false", "data.workers=0", *args.overrides])
        result = json.loads((out / method / "result.json").read_text())
        rows["zero-shot"] = result["zeroshot"]["test"]["acc1"]
        rows[method] = result["test"]["acc1"]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
