import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"
# Checkpoints are signed with the user's key: the tests (and the runs they start) use their own.
os.environ.setdefault("CLIPKIT_CHECKPOINT_KEY", os.path.join(__import__("tempfile").mkdtemp(), "checkpoint.key"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile in a test process generates its code in that process, not in a pool of compile workers
# (each importing torch) competing with the other test worker's jobs for the same cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Every process a test starts (a script in tests/dist, torchrun's workers) imports clipkit from this checkout,
# whatever checkout the environment's install points at.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from clipkit.startup import paused_collection  # noqa: E402

with paused_collection():  # the test processes start as clipkit's commands do (clipkit/startup.py)
    import open_clip  # noqa: E402,F401
    import torch  # noqa: E402

# Alone, a test process uses both cores; as one of launch/test.sh's two pytest-xdist workers, one each.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The two tiers, by directory: tests/unit runs in this process (seconds; `launch/test.sh --quick`), tests/process
# starts real processes (torchrun jobs, the CLI, services). Every test carries its tier's marker (-m unit / process).
TIERS = {"unit": "in-process tests, seconds each (launch/test.sh --quick)",
         "process": "tests that start real processes: torchrun jobs, the CLI, services"}


def pytest_configure(config):
    for tier, what in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {what}")


# DeepSpeed jobs on one machine share its extension build folder: two at once (two pytest-xdist workers) can
# abort each other. Every test that starts one says so in its name (deepspeed, or a ZeRO stage: zero0-zero3) and
# they all run on one worker, one after another (--dist loadgroup). Every other test runs on the worker its module's
# other tests run on, so a module-scoped fixture (a reference curve, a trained run) is made once, not once per worker.
DEEPSPEED_JOB = re.compile(r"deepspeed|zero[0-3]", re.IGNORECASE)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collecting imports every test module's libraries: with the collector paused, as at start-up."""
    with paused_collection():
        return (yield)


# The workers take the groups longest first (launch/test.sh passes --no-loadscope-reorder, so xdist keeps this
# order), so that the last groups handed out are short and both workers finish together. The seconds are a
# full run's (tests/group_seconds.py makes the file); a group the file does not know yet goes by its tier.
GROUP_SECONDS = json.loads((Path(__file__).parent / "group_seconds.json").read_text())
NEW_GROUP_SECONDS = {"process": 20.0, "unit": 2.0}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    seconds = {}
    for item in items:
        tier = item.path.parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit or tests/process")
        item.add_marker(tier)
        group = "deepspeed" if DEEPSPEED_JOB.search(item.name) else f"{tier}/{item.path.stem}"
        item.add_marker(pytest.mark.xdist_group(group))
        seconds[item] = -GROUP_SECONDS.get(group, NEW_GROUP_SECONDS[tier])
    items.sort(key=seconds.__getitem__)  # stable: a group's tests keep their order


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


@pytest.fixture(scope="session")
def nano_checkpoint(synth_small, tmp_path_factory):
    """A clipkit-nano checkpoint after 2 steps on synth_small, for the tests that only read one (embed, index,
    search): trained once per session."""
    from helpers import tiny_run

    from clipkit.config import load_config
    from clipkit.training import Trainer

    run_dir = tmp_path_factory.mktemp("nano_checkpoint") / "run"
    return Trainer(load_config(None, tiny_run(run_dir, synth_small, f"data.zeroshot={synth_small.eval_root}"))).fit()


@pytest.fixture(scope="session")
def parts():
    """(the eval transform at 16 px, open_clip's tokenizer wrapped as the pipeline does): what a ShardStream
    decodes with in the bad-input tests."""
    from data_shards import tokenizer, transforms

    from clipkit.data.sample import Tokenize

    _, val_tf = transforms(16)
    return val_tf, Tokenize(tokenizer())


@pytest.fixture(scope="session")
def nano_export(synth_small, nano_checkpoint, tmp_path_factory):
    """(folder, reference, checkpoint): the reference export of nano_checkpoint over synth_small's training shards
    (tests/index_reference.py), written once per session; tests that damage it work on a copy."""
    from index_reference import write_export

    root = tmp_path_factory.mktemp("nano_export")
    return root / "emb", write_export(synth_small, nano_checkpoint, root / "emb"), nano_checkpoint


@pytest.fixture(scope="session")
def nano_index(synth_small, nano_export, tmp_path_factory):
    """(index folder, reference export, shards): an exact index over nano_export, built once per session."""
    from clipkit.retrieval.index import build_index

    emb, ref, _ = nano_export
    index = tmp_path_factory.mktemp("nano_index") / "synth-index"
    build_index(emb, index)
    return index, ref, synth_small


@pytest.fixture(scope="session")
def nano_run_export(synth_small, tmp_path_factory):
    """export(fmt) -> the summary of a 3-step clipkit-nano run whose run layer exported with export.format=fmt.
    The run trains once (exporting open_clip); another format is the run layer's own end-of-run export
    (evaluate_and_export, what run() calls) of that same final checkpoint, written once per format."""
    from helpers import tiny_run

    from clipkit.config import load_config
    from clipkit.run import HeldOut, evaluate_and_export, run

    root = tmp_path_factory.mktemp("nano_run")
    trained = run(load_config(None, tiny_run(root / "open_clip", synth_small, "export.format=open_clip", steps=3)))
    summaries = {"open_clip": trained}

    def export(fmt: str) -> dict:
        if fmt not in summaries:
            cfg = load_config(None, tiny_run(root / fmt, synth_small, f"export.format={fmt}", steps=3))
            out = evaluate_and_export(cfg, Path(trained["checkpoint"]), HeldOut(), torch.device("cpu"))
            summaries[fmt] = {**trained, **out}
        return summaries[fmt]

    return export
