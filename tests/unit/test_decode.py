"""The fast decode path against open_clip's own transforms: the same crop distribution, and pixels that
match torchvision's full-resolution decode + resized crop to within resampling noise."""
import io
import random

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats

from clipkit.bench.shards import _source_photos, _variant
from clipkit.data.decode import FastTrainImages, TransformImages, _reduction, draft, image_pipeline, open_image


@pytest.fixture(scope="module")
def train_tf():
    return open_clip.image_transform(224, is_train=True)


def test_open_clip_train_transform_gets_the_fast_path(train_tf):
    fast = image_pipeline(train_tf)
    assert isinstance(fast, FastTrainImages)
    assert fast.size == (224, 224) and fast.scale == (0.9, 1.0) and fast.mode == "bicubic"
    assert isinstance(image_pipeline(open_clip.image_transform(224, is_train=False)), TransformImages)


@pytest.mark.parametrize("size", [(1000, 700), (300, 900)])
def test_crop_boxes_follow_torchvision_distribution(train_tf, size):
    """Area fraction and aspect of our boxes against torchvision's RandomResizedCrop.get_params itself."""
    rrc = train_tf.transforms[0]
    fast = image_pipeline(train_tf)
    w, h = size
    rng = random.Random(0)
    ours = [fast.crop_box(w, h, rng) for _ in range(3000)]
    torch.manual_seed(0)
    image = Image.new("RGB", size)
    ref = [rrc.get_params(image, rrc.scale, rrc.ratio) for _ in range(3000)]
    for feature in (lambda b: b[2] * b[3] / (w * h), lambda b: b[3] / b[2], lambda b: b[0], lambda b: b[1]):
        a, b = [feature(x) for x in ours], [feature(x) for x in ref]
        assert stats.ks_2samp(a, b, method="asymp").pvalue > 1e-3
    assert all(0 <= t and 0 <= left and t + hh <= h and left + ww <= w for t, left, hh, ww in ours)


def _grey_levels(ours, ref, std):
    d = (ours - ref) * torch.tensor(std).view(3, 1, 1) * 255
    return d.abs().mean().item(), float(np.percentile(d.abs().numpy(), 99)), d.mean().item()


def _photos(n, scale=1.0):
    photos = _source_photos()
    out = []
    for s in range(n):
        data, _ = _variant(*photos[s % len(photos)], random.Random(s))
        if scale != 1.0:
            im = Image.open(io.BytesIO(data))
            buf = io.BytesIO()
            im.resize((int(im.size[0] * scale), int(im.size[1] * scale)), Image.Resampling.BICUBIC).save(
                buf, format="JPEG", quality=92)
            data = buf.getvalue()
        out.append(data)
    return out


def test_pixels_match_full_decode_and_torchvision_resized_crop(train_tf):
    """Against torchvision on the fully decoded photo, for the crop box the fast path used (its box in the
    reduced image, mapped back: within the reduction factor of the drawn box). What remains is the
    DCT-domain downscale versus a full-resolution antialiased resize: small, and without bias."""
    fast = image_pipeline(train_tf)
    std = train_tf.transforms[-1].std
    reductions = set()
    for seed, data in enumerate(_photos(8)):
        full = Image.open(io.BytesIO(data)).convert("RGB")
        top, left, h, w = fast.crop_box(*full.size, random.Random(seed))
        im = open_image(data, None)
        sx, sy = draft(im, _reduction(w, h, 224, 224))
        reductions.add(round(sx))
        x0, y0, x1, y1 = (round(v) for v in (left / sx, top / sy, (left + w) / sx, (top + h) / sy))
        box = [round(y0 * sy), round(x0 * sx), round((y1 - y0) * sy), round((x1 - x0) * sx)]
        ref = train_tf.transforms[-1](TF.to_tensor(TF.resized_crop(full, *box, [224, 224],
                                                                   TF.InterpolationMode.BICUBIC, antialias=True)))
        ours = fast.collate([fast(data, random.Random(seed))], shared=False)[0]
        assert ours.shape == ref.shape == (3, 224, 224)
        mean_abs, p99, bias = _grey_levels(ours, ref, std)
        assert mean_abs < 3.5 and p99 < 40 and abs(bias) < 0.25, (seed, mean_abs, p99, bias)
        assert abs(ours.std().item() / ref.std().item() - 1) < 0.01  # no blur or sharpening
    assert reductions & {2, 4}  # the reduced-scale decode was exercised


def test_eval_transform_matches_open_clip(train_tf):
    val_tf = open_clip.image_transform(224, is_train=False)
    ours = image_pipeline(val_tf)
    std = val_tf.transforms[-1].std
    for data in _photos(3):  # under 900 pixels on the short side: decoded in full, so exact
        ref = val_tf(Image.open(io.BytesIO(data)))
        assert _grey_levels(ours(data, random.Random(0)), ref, std)[0] < 0.05
    errors = []
    for data in _photos(6, scale=2.5):  # large photos: drafted; close, unbiased, equally sharp
        ref = val_tf(Image.open(io.BytesIO(data)))
        out = ours(data, random.Random(0))
        mean_abs, p99, bias = _grey_levels(out, ref, std)
        # the DCT-scaled grid is offset from the full one by a fraction of a pixel: sharp edges differ most
        assert mean_abs < 6 and p99 < 60 and abs(bias) < 0.25, (mean_abs, p99, bias)
        assert abs(out.std().item() / ref.std().item() - 1) < 0.01
        errors.append(mean_abs)
    assert np.mean(errors) < 2.5, errors
