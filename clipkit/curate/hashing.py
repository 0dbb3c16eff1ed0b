"""Image hashes shared by deduplication and decontamination: the bytes' SHA-256 and a 64-bit perceptual hash
(imagehash's pHash) of the image and of its mirror image, so a flipped copy matches as a near duplicate; and a
colour thumbnail (THUMB_SIZE x THUMB_SIZE RGB, 192 bytes) that verifies a hash match (thumb_similarity)."""
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


THUMB_SIZE = 8  # pixels a side of the verification thumbnail


def thumbnail(img: Image.Image) -> bytes:
    """The image's THUMB_SIZE x THUMB_SIZE RGB thumbnail (box-filtered: each pixel the mean of its area), as
    THUMB_SIZE * THUMB_SIZE * 3 bytes in row-major order."""
    return img.convert("RGB").resize((THUMB_SIZE, THUMB_SIZE), Image.BOX).tobytes()


def thumbs_array(thumbs) -> np.ndarray:
    """A sequence of thumbnail() bytes as uint8 [N, THUMB_SIZE, THUMB_SIZE, 3]."""
    flat = np.frombuffer(b"".join(bytes(t) for t in thumbs), dtype=np.uint8)
    return flat.reshape(len(thumbs), THUMB_SIZE, THUMB_SIZE, 3)


def _centred(t: np.ndarray) -> np.ndarray:
    x = t.reshape(len(t), -1).astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def thumb_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row, the correlation (cosine of the mean-removed values, -1..1) of thumbnails a[i] and b[i], or of
    a[i] and b[i]'s mirror image when that is higher (a flipped copy): near 1 for an image and its re-encoded,
    slightly cropped or flipped copy, near 0 for unrelated photographs. A flat thumbnail (one colour) has
    correlation 0 with anything."""
    a, b = np.asarray(a, np.uint8), np.asarray(b, np.uint8)
    ca = _centred(a)
    direct = (ca * _centred(b)).sum(axis=1)
    mirror = (ca * _centred(b[:, :, ::-1])).sum(axis=1)
    return np.maximum(direct, mirror)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between uint64 hashes, elementwise with numpy broadcasting (numpy's popcount of the XOR)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
