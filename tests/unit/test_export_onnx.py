"""`--format onnx`: image and text encoders that ONNX Runtime runs with open_clip's outputs (fp32) or close to
them (int8), described by a JSON a consumer can follow; and `clipkit bench onnx` on a small set."""
import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from clipkit.cli import main as cli_main
from clipkit.export import EXPORT_FORMATS
from clipkit.models import create_transforms, get_tokenizer, load_model, save_weights

CAPTIONS = ["a photo of a red circle.", "Two BIG blue squares!!", "an image with a green star in it.",
            "there are three small purple crosses here", "x " * 30, "a"]


@pytest.fixture(scope="module")
def trained_run(nano_run_export):
    """A short clipkit-nano run whose run layer exports with export.format=onnx."""
    return nano_run_export("onnx")


@pytest.fixture(scope="module")
def exported(trained_run):
    files = {k: Path(v) for k, v in trained_run["export"].items()}
    return files, load_model(trained_run["checkpoint"]).model.eval()


def _run(path, array):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: array.numpy()})[0])


def _synth_images(synth, model, n=12):
    from clipkit.data import build_labelled_loader

    batch = next(iter(build_labelled_loader(str(synth.eval_root / "test" / "0.tar"), create_transforms(model)[1], n,
                                            workers=0)))
    return batch.images


def test_fp32_graphs_equal_open_clip_at_any_batch_size(exported, synth_small):
    files, model = exported
    assert {"image", "text", "image_int8", "text_int8", "config", "tokenizer"} <= files.keys()
    out_dir = files["image"].parent
    assert not list(out_dir.glob("*.data")), "weights must live inside the .onnx files"
    pixels = _synth_images(synth_small, model)
    tokens = get_tokenizer("clipkit-nano")(CAPTIONS)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(pixels), model.encode_text(tokens)
    for n in (1, 5, len(pixels)):  # the batch axis is dynamic
        torch.testing.assert_close(_run(files["image"], pixels[:n]), ref_img[:n], rtol=0, atol=1e-4)
    for n in (1, len(CAPTIONS)):
        torch.testing.assert_close(_run(files["text"], tokens[:n]), ref_txt[:n], rtol=0, atol=1e-4)


def test_int8_graphs_are_quantised_and_close(exported, synth_small):
    files, model = exported
    pixels = _synth_images(synth_small, model)
    tokens = get_tokenizer("clipkit-nano")(CAPTIONS)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(pixels), model.encode_text(tokens)
    for kind, inputs, ref in (("image", pixels, ref_img), ("text", tokens, ref_txt)):
        graph = onnx.load(str(files[f"{kind}_int8"]))
        assert any(node.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul")
                   for node in graph.graph.node)
        assert files[f"{kind}_int8"].stat().st_size < 0.6 * files[kind].stat().st_size
        out = _run(files[f"{kind}_int8"], inputs)
        assert out.shape == ref.shape
        assert F.cosine_similarity(out, ref, dim=-1).min() > 0.98


def test_config_json_describes_the_graphs(exported):
    files, model = exported
    config = json.loads(files["config"].read_text())
    for kind, input_name, dtype in (("image", "pixel_values", "tensor(float)"), ("text", "input_ids", "tensor(int64)")):
        entry = config["encoders"][kind]
        sess = ort.InferenceSession(str(files["image"].parent / entry["fp32"]), providers=["CPUExecutionProvider"])
        (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
        assert inp.name == entry["inputs"][0]["name"] == input_name and inp.type == dtype
        assert isinstance(inp.shape[0], str) and inp.shape[1:] == entry["inputs"][0]["shape"][1:]
        assert out.name == entry["outputs"][0]["name"] and out.shape[1:] == entry["outputs"][0]["shape"][1:] == [32]
        assert entry["max_abs_diff_vs_torch"] < 1e-4
    pp = model.visual.preprocess_cfg
    assert config["preprocess"]["size"] == [32, 32]
    assert config["preprocess"]["mean"] == list(pp["mean"]) and config["preprocess"]["std"] == list(pp["std"])
    assert config["tokenizer"]["context_length"] == 16 and config["tokenizer"]["pad_id"] == 0
    assert config["logit_scale"] == pytest.approx(model.logit_scale.exp().item())
    assert config["opset"] >= 17


def test_consumer_path_tokenizer_files_then_text_graph(exported):
    """What a consumer without open_clip does: tokenise with the shipped files, run text.onnx."""
    files, model = exported
    config = json.loads(files["config"].read_text())
    tokenizer = CLIPTokenizer.from_pretrained(files["config"].parent / config["tokenizer"]["files"],
                                              local_files_only=True)
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=config["tokenizer"]["context_length"],
                    truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, get_tokenizer("clipkit-nano")(CAPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(_run(files["text"], ids), model.encode_text(ids), rtol=0, atol=1e-4)


def test_cli_export_onnx(trained_run, tmp_path, capsys):
    assert "onnx" in EXPORT_FORMATS
    out = tmp_path / "onnx"
    assert cli_main(["export", "--checkpoint", trained_run["checkpoint"], "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "image.onnx" in printed and "text.int8.onnx" in printed
    model = load_model(trained_run["checkpoint"]).model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_run(out / "image.onnx", pixels), model.encode_image(pixels), rtol=0, atol=1e-4)


def test_bench_onnx_small_run(trained_run, synth_small, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # --onnx-dir measures the run's own export (the bench's default is to export the checkpoint itself).
    rc = cli_main(["bench", "onnx", "--checkpoint", trained_run["checkpoint"], "--data", str(synth_small.eval_root),
                   "--out", str(out), "--threads", "1", "--batch-size", "40", "--speed-samples", "40",
                   "--repeats", "1", "--onnx-dir", str(Path(trained_run["export"]["config"]).parent)])
    assert rc == 0, capsys.readouterr().err
    assert "int8 accuracy change" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["command"].startswith("clipkit bench onnx --checkpoint")
    assert set(report["backends"]) == {"torch_fp32", "onnx_fp32", "onnx_int8"}
    for b in report["backends"].values():
        assert {"acc1", "acc5", "mean_per_class_recall", "num_samples", "images_per_s"} <= b.keys()
        assert b["num_samples"] == 120 and b["images_per_s"] > 0 and 0 <= b["acc1"] <= b["acc5"] <= 1
    torch_fp32, fp32, int8 = (report["backends"][k] for k in ("torch_fp32", "onnx_fp32", "onnx_int8"))
    # Same model, same pixels, same tokens: fp32 ONNX classifies exactly as torch does.
    assert report["onnx_fp32_accuracy_equals_torch"] is True
    assert (fp32["acc1"], fp32["acc5"], fp32["mean_per_class_recall"]) == \
           (torch_fp32["acc1"], torch_fp32["acc5"], torch_fp32["mean_per_class_recall"])
    assert report["versus_torch_fp32"]["onnx_fp32"]["top1_agreement"] == 1.0
    # int8: reported; only sanity is asserted.
    assert report["int8_accuracy_change"]["acc1"] == pytest.approx(int8["acc1"] - torch_fp32["acc1"])
    assert report["versus_torch_fp32"]["onnx_int8"]["image_embeds_cosine_min"] > 0.9
    assert set(report["files_bytes"]) == {"image.onnx", "text.onnx", "image.int8.onnx", "text.int8.onnx"}


def test_bench_refuses_an_export_of_other_weights(trained_run, synth_small, tmp_path, capsys):
    """An export of the same architecture with other weights would measure another model."""
    other = tmp_path / "other.safetensors"
    model = load_model(trained_run["checkpoint"])
    state = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in model.model.state_dict().items()}
    save_weights(state, other, model.model_name, model.model_cfg)
    rc = cli_main(["bench", "onnx", "--checkpoint", str(other), "--data", str(synth_small.eval_root),
                   "--out", str(tmp_path / "b.json"), "--threads", "1", "--max-samples", "8", "--repeats", "1",
                   "--onnx-dir", str(Path(trained_run["export"]["config"]).parent)])
    assert rc == 2 and "not of this checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
