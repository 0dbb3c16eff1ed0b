"""Image hashes shared by deduplication and decontamination: the bytes' SHA-256 and a 64-bit perceptual hash
(imagehash's pHash) of the image and of its mirror image, so a flipped copy matches as a near duplicate."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageOps

from ..extras import require


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_uint64(h) -> int:
    bits = h.hash.flatten()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value


def perceptual_hashes(img: Image.Image) -> tuple[int, int]:
    """(pHash of the image, pHash of its left-right mirror), each a 64-bit unsigned integer."""
    imagehash = require("imagehash", "perceptual hashing (clipkit curate)")
    rgb = img.convert("RGB")
    return _as_uint64(imagehash.phash(rgb)), _as_uint64(imagehash.phash(ImageOps.mirror(rgb)))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between uint64 hashes, elementwise with numpy broadcasting (numpy's popcount of the XOR)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
