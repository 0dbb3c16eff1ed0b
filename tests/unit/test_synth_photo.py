"""synth's "photo" style: the same scenes and captions as the flat style, drawn with a photograph's structure,
so unrelated pictures no longer share perceptual hashes."""
import io
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipkit.curate.hashing import hamming, perceptual_hashes
from clipkit.data.synth import render, sample_scene, write_synth_dataset


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_photo_style_keeps_scenes_and_captions(tmp_path):
    tiny = dict(train_samples=12, eval_samples=6, samples_per_shard=12, image_size=32, workers=1,
                downstream_train_samples=4, downstream_test_samples=4)
    flat = write_synth_dataset(tmp_path / "flat", **tiny)
    photo = write_synth_dataset(tmp_path / "photo", style="photo", **tiny)
    a, b = _members(flat.root / "train" / "00000.tar"), _members(photo.root / "train" / "00000.tar")
    assert sorted(a) == sorted(b)
    assert all(a[n] == b[n] for n in a if n.endswith(".txt"))  # the captions are the scene's, whatever the style
    assert all(a[n] != b[n] for n in a if n.endswith(".jpg"))
    for name in ("000000003.jpg", "000000007.jpg"):
        assert Image.open(io.BytesIO(b[name])).size == (32, 32)
    with pytest.raises(ValueError, match="style"):
        write_synth_dataset(tmp_path / "x", style="oil", **tiny)


def test_unrelated_photo_scenes_have_distant_hashes():
    """80 random training scenes at 32 px: flat pictures include pairs within 8 bits of pHash (unrelated
    scenes a hash stage would merge), photo pictures none within 12 (the distance that finds cropped copies)."""
    closest = {}
    for style in ("flat", "photo"):
        hashes = []
        for i in range(80):
            rng = random.Random(i)
            hashes.append(perceptual_hashes(render(sample_scene(rng, "train"), 32, rng, style=style))[0])
        h = np.array(hashes, dtype=np.uint64)
        closest[style] = int(hamming(h[:, None], h[None, :])[np.triu_indices(80, 1)].min())
    assert closest["flat"] <= 8 and closest["photo"] > 12, closest
