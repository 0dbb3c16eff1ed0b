import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Checkpoints are signed with the user's key: the tests (and the runs they start) use their own.
os.environ.setdefault("CLIPKIT_CHECKPOINT_KEY", os.path.join(__import__("tempfile").mkdtemp(), "checkpoint.key"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process a test starts (a script in tests/dist, torchrun's workers) imports clipkit from this checkout,
# whatever checkout the environment's install points at.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small built-in dataset: 4 training shards of 150 samples, 1 zero-shot shard of 120."""
    from clipkit.data import write_synth_dataset

    return write_synth_dataset(tmp_path_factory.mktemp("synth"), train_samples=600, eval_samples=120,
                               samples_per_shard=150, image_size=32, seed=3, workers=1,
                               downstream_train_samples=40, downstream_test_samples=20)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model work: a second intra-op thread gains nothing there, and on a shared 2-core
    machine the two threads wait on each other for several times the compute."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_nano(synth_small, tmp_path_factory):
    """(checkpoint, open_clip export) of clipkit-nano trained for 40 steps on synth_small: well above chance
    at retrieval (a caption paired with the wrong image would show), barely at zero-shot."""
    from clipkit.config import load_config
    from clipkit.export import export_checkpoint
    from clipkit.training import Trainer

    run_dir = tmp_path_factory.mktemp("trained_nano") / "run"
    cfg = load_config(None, [f"run.dir={run_dir}", f"data.train={synth_small.train_spec}", "model.name=clipkit-nano",
                             "train.global_batch_size=32", "train.steps=40", "train.warmup_steps=2",
                             "train.checkpoint_every=1000", "run.progress=false", "data.workers=0",
                             "data.shuffle_buffer=50"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from a second intra-op thread
    try:
        checkpoint = Trainer(cfg).fit()
    finally:
        torch.set_num_threads(before)
    export_checkpoint(checkpoint, run_dir.parent / "export")
    return checkpoint, run_dir.parent / "export"
