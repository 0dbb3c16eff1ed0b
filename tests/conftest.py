import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Checkpoints are signed with the user's key: the tests (and the runs they start) use their own.
os.environ.setdefault("CLIPKIT_CHECKPOINT_KEY", os.path.join(__import__("tempfile").mkdtemp(), "checkpoint.key"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small built-in dataset: 4 training shards of 150 samples, 1 zero-shot shard of 120."""
    from clipkit.data import write_synth_dataset

    return write_synth_dataset(tmp_path_factory.mktemp("synth"), train_samples=600, eval_samples=120,
                               samples_per_shard=150, image_size=32, seed=3, workers=1)
