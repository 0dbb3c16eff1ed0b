"""Train -> checkpoint -> resume -> zero-shot -> export -> load with open_clip, on a tiny model."""
import json
import subprocess
import sys

import open_clip
import pytest
import torch
import yaml

from safetensors.torch import load_file

from clipkit.config import ConfigError, load_config
from clipkit.models import create_model, load_model
from clipkit.run import run
from clipkit.training import Trainer
from clipkit.training.optim import WarmupCosine


def _saved(checkpoint):
    """A checkpoint's contents, read with the plain libraries (JSON, safetensors, torch in weights-only mode)."""
    return {"trainer": json.loads((checkpoint / "trainer.json").read_text()),
            "model": load_file(str(checkpoint / "model.safetensors")),
            "optimizer": torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]}


def _cfg(run_dir, synth, *extra):
    return load_config(None, [
        f"run.dir={run_dir}", f"data.train={synth.train_spec}", f"data.zeroshot={synth.eval_root}",
        "model.name=clipkit-nano", "train.global_batch_size=32", "train.steps=60", "train.warmup_steps=10",
        "train.checkpoint_every=20", "train.keep_checkpoints=3", "run.log_every=10", "run.progress=false",
        "data.workers=1", "data.shuffle_buffer=100", *extra,
    ])


def _assert_same_optimizer_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, value in a["state"][k].items():
            torch.testing.assert_close(value, b["state"][k][name], rtol=0, atol=0)


def test_train_checkpoint_resume_zeroshot_export(tmp_path, synth_small):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, synth_small)

    # 1. a run interrupted at step 40 of 60
    first = Trainer(cfg)
    first.fit(until=40)
    saved = _saved(run_dir / "checkpoints" / "step_00000040")
    info = saved["trainer"]
    assert info["step"] == 40 and (run_dir / "checkpoints" / "step_00000020" / "manifest.json").is_file()
    assert info["model_name"] == "clipkit-nano" and info["config"]["train"]["steps"] == 60
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    assert all({"step", "loss", "lr", "samples_per_s"} <= r.keys() for r in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]  # it learns
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"] == "clipkit-nano"
    assert any((run_dir / "tensorboard").iterdir())

    # 2. resume=latest continues from the saved step with identical model, optimizer and schedule state
    resumed = Trainer(_cfg(run_dir, synth_small, "train.resume=latest"))
    assert resumed.step == 40
    _assert_same_optimizer_state(resumed.engine.optimizer.state_dict(), saved["optimizer"])
    for name, p in resumed.module.state_dict().items():
        assert torch.equal(p, saved["model"][name]), name
    expected_lr = cfg.train.lr * WarmupCosine(10, 60)(40)
    assert abs(resumed.engine.optimizer.param_groups[0]["lr"] - expected_lr) < 1e-12
    resumed.fit()
    assert resumed.step == 60
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [10, 20, 30, 40, 50, 60]
    final = run_dir / "checkpoints" / "step_00000060"
    assert _saved(final)["trainer"]["step"] == 60
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [  # keep_checkpoints=3
        "latest", "step_00000020", "step_00000040", "step_00000060"]
    with pytest.raises(ConfigError, match="already holds a run"):  # a fresh run would mix with this one
        Trainer(_cfg(run_dir, synth_small, "train.lr=0.5"))
    # a resumed run trains with its own config: a changed LR is refused, naming the key
    with pytest.raises(ConfigError, match="'train.lr' differs from the checkpoint's run"):
        Trainer(_cfg(run_dir, synth_small, "train.lr=0.5", "train.resume=latest"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == cfg.train.lr  # untouched

    # 3. zero-shot through the CLI, result in CLIP_benchmark's schema
    out_json = tmp_path / "zs.json"
    subprocess.run([sys.executable, "-m", "clipkit", "zeroshot", "--checkpoint", str(final), "--data",
                    str(synth_small.eval_root), "--out", str(out_json)], check=True, capture_output=True)
    result = json.loads(out_json.read_text())
    assert result["task"] == "zeroshot_classification" and result["model"] == "clipkit-nano"
    assert {"dataset", "pretrained"} <= result.keys()
    assert {"acc1", "acc5", "mean_per_class_recall"} <= result["metrics"].keys()
    assert result["metrics"]["num_samples"] == 120

    # 4. export through the CLI, then load with open_clip alone and compare embeddings
    export_dir = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "clipkit", "export", "--checkpoint", str(final), "--format",
                    "open_clip", "--out", str(export_dir)], check=True, capture_output=True)
    ours = load_model(final).model
    ours.eval()
    images = torch.randn(4, 3, 32, 32)
    tokenizer = open_clip.get_tokenizer("clipkit-nano")
    texts = tokenizer(["a red circle", "two blue stars", "a yellow cross on a black background", "x"])
    with torch.no_grad():
        want_img, want_txt = ours.encode_image(images), ours.encode_text(texts)

    open_clip.add_model_config(export_dir / "clipkit-nano.json")
    ref, _, preprocess = open_clip.create_model_and_transforms(
        "clipkit-nano", pretrained=str(export_dir / "open_clip_model.safetensors"))
    ref_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    for model in (ref, ref_dir):
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), want_img, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.encode_text(texts), want_txt, atol=1e-5, rtol=0)
    # and the exported model is the trained one, not a fresh initialisation
    fresh = open_clip.create_model("clipkit-nano")
    assert not torch.allclose(fresh.encode_image(images), want_img, atol=1e-3)


def test_full_train_writes_summary_zeroshot_and_export(tmp_path, synth_small):
    summary = run(_cfg(tmp_path / "run", synth_small, "train.steps=20", "eval.every=10",
                       f"data.retrieval={synth_small.retrieval_root}"))
    run_dir = tmp_path / "run"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"] for r in logged if "eval" in r}
    assert sorted(evals) == [10, 20]
    assert evals[20]["zeroshot_acc1"] == summary["zeroshot"]["acc1"]  # live weights = the saved final weights
    for k in (1, 5, 10):
        assert evals[20][f"retrieval_text_retrieval_recall@{k}"] == summary["retrieval"][f"text_retrieval_recall@{k}"]
    retrieval = json.loads((run_dir / "retrieval.json").read_text())
    assert retrieval["task"] == "zeroshot_retrieval" and retrieval["metrics"]["num_images"] == 120
    assert evals[10] != evals[20]  # each evaluated the weights of its own step
    assert any((run_dir / "tensorboard").iterdir())
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 20
    assert on_disk["zeroshot"]["num_classes"] == 30
    assert 0.0 <= on_disk["zeroshot"]["acc1"] <= 1.0
    assert (run_dir / "zeroshot.json").is_file()
    assert (run_dir / "export" / "open_clip_model.safetensors").is_file()
    # the report: a page with a PNG per plot, evaluation over time included
    page = (run_dir / "report.html").read_text()
    for name in ("loss", "lr", "throughput", "data_wait", "eval"):
        png = run_dir / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'src="report/{name}.png"' in page
    assert f"{summary['zeroshot']['acc1']:.3f}" in page
    # MFU as torchtitan logs it: the model's FLOPs per sample (FlopCounterMode over one forward and
    # backward of a freshly built model, its text tower at the full context: model FLOPs, whatever the run's
    # trimmed tower executes) times samples/s, over the measured peak
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("clipkit-nano", trim_text=False)
    counter = FlopCounterMode(display=False)
    with counter:
        (model.encode_image(torch.zeros(1, 3, 32, 32)) @ model.encode_text(
            torch.ones(1, model.context_length, dtype=torch.long)).T).sum().backward()
    steps = [r for r in logged if "loss" in r]
    for r in steps:
        assert r["tflops"] * 1e12 == pytest.approx(r["samples_per_s"] * counter.get_total_flops(), rel=1e-9)
        assert 0 < r["mfu"] and 0 <= r["data_wait"] <= 1


def test_cli_rejects_bad_config_with_named_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clipkit", "train", "train.batch_sise=4",
                           f"run.dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.batch_sise" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "clipkit", "export", "--checkpoint", str(tmp_path / "nope.pt"),
                           "--out", str(tmp_path / "e")], capture_output=True, text=True)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "clipkit", "train", f"run.dir={tmp_path / 'r'}",
                           f"data.train={tmp_path}/shards/{{000..003}}.tar"], capture_output=True, text=True)
    assert proc.returncode == 2 and f"shard not found: {tmp_path}/shards/000.tar (and 3 more)" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "clipkit", "zeroshot", "--checkpoint", str(tmp_path / "c.pt"),
                           "--data", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert proc.returncode == 2 and "zero-shot data not found" in proc.stderr


def test_normalize_on_device_trains_the_same_curve(tmp_path, synth_small):
    losses = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        run(_cfg(run_dir, synth_small, "train.steps=6", "run.log_every=2", "eval.zeroshot_at_end=false",
                   "export.at_end=false", f"data.normalize_on_device={flag}"))
        losses[flag] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-6)


def test_own_shards_without_a_zeroshot_set_write_no_builtin_data(tmp_path, synth_small):
    synth_out = tmp_path / "synth"
    summary = run(load_config(None, [
        f"run.dir={tmp_path / 'run'}", f"data.train={synth_small.train_spec}", f"data.synth.out={synth_out}",
        "model.name=clipkit-nano", "train.global_batch_size=8", "train.steps=2", "run.progress=false",
        "data.workers=0", "export.at_end=false"]))
    assert summary["steps"] == 2 and "zeroshot" not in summary
    assert not synth_out.exists()  # the built-in set is written only for a run that trains on it
