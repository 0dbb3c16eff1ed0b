"""train.compile=model: the towers' transformer blocks compiled with torch.compile give the eager run's losses
over 20 fp32 steps, compile a bounded number of graphs while the trimmed text length varies, and log compile
time apart from step time; train.compile=step is refused in one line.

One compiled run is shared by the tests of this module (its compile is the cost: a few minutes on a busy
2-core machine with an empty cache). torch's compile caches go to one folder under the system's temporary
directory here (TORCHINDUCTOR_CACHE_DIR, as torch's own default does), so a later session loads the graphs
instead of compiling them; the run.dir cache that `clipkit train` uses otherwise is checked without compiling
here, and with compiling in tests/process/test_compile_ddp.py."""
import json
import math
import os
import tempfile

import pytest
import torch
from helpers import tiny_run

from clipkit.config import ConfigError, load_config
from clipkit.models import create_model
from clipkit.training import Trainer
from clipkit.training.compile import CACHE_ENV, text_lengths, transformer_blocks, use_cache_dir

STEPS = 20
PAD = 2  # train.compile_pad_text: clipkit-nano's context of 16 gives text lengths 2, 4, ..., 16
# The synthetic captions have 8 to 16 tokens: bucketed batches make the trimmed length vary between steps
BUCKETS = "data.length_buckets=[9,12]"
# Compiled and eager fp32 differ by float rounding only (inductor fuses and reorders reductions): the loss of
# every step within this relative tolerance of the eager run's, over 20 steps of AdamW.
LOSS_RTOL = 1e-4


def _losses(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def _run(run_dir, synth, *extra):
    overrides = tiny_run(run_dir, synth, "run.log_every=1", "train.checkpoint_every=1000", "data.shuffle_buffer=50",
                         f"train.compile_pad_text={PAD}", BUCKETS, *extra, steps=STEPS, batch=16)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config(None, overrides))
        trainer.fit()
    finally:
        torch.set_num_threads(before)
    return trainer


@pytest.fixture(scope="module")
def compiled_and_eager(synth_small, tmp_path_factory):
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = os.path.join(tempfile.gettempdir(), "clipkit-test-compile-cache")
    try:
        root = tmp_path_factory.mktemp("compile")
        compiled = _run(root / "compiled", synth_small, "train.compile=model")
        eager = _run(root / "eager", synth_small, "train.compile=off")
    finally:
        if before is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = before
    return root, compiled, eager


def test_compiled_losses_equal_the_eager_run(compiled_and_eager):
    root, compiled, eager = compiled_and_eager
    got, want = _losses(root / "compiled"), _losses(root / "eager")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        assert math.isfinite(g["loss"]) and g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL), g["step"]
    assert want[-1]["loss"] < want[0]["loss"]  # it trained: the comparison is over moving weights
    # and the weights after 20 updates agree too
    for (name, a), b in zip(compiled.module.state_dict().items(), eager.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_recompiles_are_bounded_and_logged_apart_from_step_time(compiled_and_eager):
    root, compiled, _ = compiled_and_eager
    records = _losses(root / "compiled")
    stats = [r["compile"] for r in records]
    lengths = text_lengths(16, PAD)
    assert lengths == [2, 4, 6, 8, 10, 12, 14, 16]
    # image blocks: one shape; text blocks: one graph per padded length at most; nothing else is compiled.
    # The buckets' batches reach at least two text lengths, so the text blocks recompiled at least once.
    assert 3 <= stats[-1]["graphs"] <= 1 + len(lengths)
    assert 1 <= stats[-1]["recompiles"] == stats[-1]["graphs"] - stats[0]["graphs"]
    assert [s["graphs"] for s in stats] == sorted(s["graphs"] for s in stats)  # cumulative
    # the windows' compile seconds add up to the run's, and the first step carries the first compile
    assert sum(s["window_seconds"] for s in stats) == pytest.approx(stats[-1]["seconds"], abs=0.01)
    assert stats[0]["window_seconds"] > 0
    for r in records:
        assert r["samples_per_s_without_compile"] >= r["samples_per_s"]
    # the compiled run pads its trimmed text lengths to multiples of the pad (the eager run does not)
    assert compiled.module.trim_text_multiple == PAD


def test_blocks_run_compiled_only_inside_the_training_forward(compiled_and_eager):
    _, compiled, _ = compiled_and_eager
    blocks = [block for _, block in transformer_blocks(compiled.module)]
    assert len(blocks) == 4  # clipkit-nano: 2 image + 2 text blocks
    assert all(block._compiled_call_impl is None for block in blocks)  # evaluation and export run eagerly
    with compiled.engine.autocast():
        assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(block._compiled_call_impl is None for block in blocks)


def test_padded_text_lengths_give_the_same_features():
    torch.manual_seed(0)
    model = create_model("clipkit-nano").eval()
    tokens = torch.zeros(3, 16, dtype=torch.long)
    for row, n in enumerate((3, 5, 6)):
        tokens[row, :n - 1] = torch.arange(1, n) + 100
        tokens[row, n - 1] = 49407
    with torch.no_grad():
        exact = model.encode_text(tokens)
        model.trim_text_multiple = 4  # longest caption 6 -> runs at 8
        padded = model.encode_text(tokens)
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-6)


def test_cache_dir_is_the_runs_unless_the_user_names_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(CACHE_ENV, default_cache_dir())  # torch writes its default there on first use
    assert use_cache_dir(tmp_path / "a") == str((tmp_path / "a").resolve())
    assert os.environ[CACHE_ENV] == str((tmp_path / "a").resolve()) and (tmp_path / "a").is_dir()
    assert use_cache_dir(tmp_path / "b") == str((tmp_path / "b").resolve())  # clipkit's own setting moves on
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert use_cache_dir(tmp_path / "c") == str(tmp_path / "mine")  # the user's stays


@pytest.mark.parametrize("overrides, message", [
    (["train.compile=step"], "train.compile"),
    (["train.compile=always"], "must be one of off, model, step"),
    (["train.compile=model", "deepspeed.enabled=true"], "torch engine"),
])
def test_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
