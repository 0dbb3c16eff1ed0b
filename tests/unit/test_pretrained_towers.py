"""Tower weights (model.pretrained_image: timm, model.pretrained_text: a transformers text model directory) and
the transformers tokenizer a run records, checked against timm and transformers on the same inputs; every
pretrained file is built here with tiny random shapes (nothing is downloaded)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from clipkit.models import get_model_config, load_model

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("a red circle blue square green triangle yellow star on white black background small large photo of the "
         "shape image picture").split()


def _word_tokenizer(max_length: int):
    """A WordLevel tokenizer with its own vocabulary, nothing like CLIP's BPE (ids, specials, length)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[SEP]", model_max_length=max_length)


def _bert_directory(path, max_positions=24):
    """A tiny BertModel with random weights and its own WordPiece-free tokenizer, saved as transformers does."""
    from transformers import BertConfig, BertModel

    tokenizer = _word_tokenizer(max_positions)
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                                pad_token_id=0)).eval()
    bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return bert, tokenizer


def _timm_file(path, suffix=".safetensors"):
    """timm's test_vit (the image tower of clipkit-nano-timm) with random weights and a classifier head."""
    torch.manual_seed(2)
    net = timm.create_model("test_vit", num_classes=7).eval()
    with torch.no_grad():  # not timm's initial values, so a tower left at its init would show
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    file = path.with_suffix(suffix)
    save_file(state, str(file)) if suffix == ".safetensors" else torch.save(state, file)
    return net, file


def _hf_text_config(tmp_path, vision="clipkit-nano-timm", context=16):
    """A model config: an image tower and a Hugging Face BERT text tower (named as open_clip's configs name it)."""
    cfg = {"embed_dim": 16, "vision_cfg": get_model_config(vision)["vision_cfg"],
           "text_cfg": {"hf_model_name": "bert-base-uncased", "hf_tokenizer_name": "bert-base-uncased",
                        "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": context}}
    path = tmp_path / "timm-bert.json"
    path.write_text(json.dumps(cfg))
    return path


def _config(*overrides):
    from clipkit.config import load_config

    return load_config(None, list(overrides))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_image_tower_weights_give_timms_features(tmp_path, suffix):
    from clipkit.training.trainer import build_model

    net, file = _timm_file(tmp_path / "vit", suffix)
    model = build_model(_config("model.name=clipkit-nano-timm", f"model.pretrained_image={file}"),
                        torch.device("cpu")).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.visual.trunk.forward_features(pixels), net.forward_features(pixels))
    trunk = model.visual.trunk.state_dict()
    assert all(torch.equal(trunk[k], v) for k, v in net.state_dict().items() if not k.startswith("head."))


def test_hf_text_tower_directory_gives_transformers_outputs_and_tokens(tmp_path):
    from clipkit.training.trainer import architecture, build_model, run_tokenizer

    bert, tokenizer = _bert_directory(tmp_path / "bert")
    cfg = _config(f"model.name={_hf_text_config(tmp_path)}", f"model.pretrained_text={tmp_path / 'bert'}")
    model = build_model(cfg, torch.device("cpu")).eval()
    _, _, model_cfg = architecture(cfg, None)
    clipkit_tokenizer, files = run_tokenizer(cfg, None, model_cfg)
    texts = ["a red circle on white", "photo of the small blue square shape"]
    tokens = clipkit_tokenizer(texts)
    reference = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(tokens, reference["input_ids"]) and tokens.shape == (2, 16)
    assert set(files) >= {"tokenizer.json", "tokenizer_config.json"}
    with torch.no_grad():
        ours = model.text.transformer(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        theirs = bert(**reference).last_hidden_state
        assert torch.allclose(ours, theirs, atol=1e-6)
        # the tower's text features: transformers' hidden states mean-pooled over the real tokens, projected
        mask = reference["attention_mask"].unsqueeze(-1).float()
        by_hand = model.text.proj((theirs * mask).sum(1) / mask.sum(1))
        assert torch.allclose(model.encode_text(tokens), by_hand, atol=1e-5)
    # the recorded text tower is the directory's config as data, not its path
    assert model_cfg["text_cfg"]["hf_model_config"]["hidden_size"] == 32
    assert str(tmp_path) not in json.dumps(model_cfg)


def test_lit_run_keeps_both_pretrained_towers_bit_identical_and_records_the_tokenizer(tmp_path, synth_small):
    """Locked timm image tower and locked BERT text tower from their files through a run: bit-identical; the
    run's checkpoint tokenises with the directory's tokenizer, also once the directory is gone."""
    from clipkit.run import run

    net, image_file = _timm_file(tmp_path / "vit")
    bert, tokenizer = _bert_directory(tmp_path / "bert")
    overrides = [f"model.name={_hf_text_config(tmp_path)}", f"model.pretrained_image={image_file}",
                 f"model.pretrained_text={tmp_path / 'bert'}", "model.lock_image=true", "model.lock_text=true",
                 f"run.dir={tmp_path / 'run'}", f"data.train={synth_small.train_spec}", "train.global_batch_size=8",
                 "train.warmup_steps=1", "train.lr=1e-2", "run.progress=false", "data.workers=0",
                 "data.shuffle_buffer=20", "eval.zeroshot_at_end=false", "eval.retrieval_at_end=false",
                 "export.at_end=false", "run.report=false"]
    run(_config(*overrides, "train.steps=2"))
    summary = run(_config(*overrides, "train.steps=3", "train.resume=latest"))  # resumes as any run does
    assert summary["start_step"] == 2 and summary["steps"] == 3
    assert summary["pretrained"]["towers"] == {"image": str(image_file), "text": str(tmp_path / "bert")}
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert f"pretrained_image: {image_file}" in written and f"pretrained_text: {tmp_path / 'bert'}" in written
    shutil.move(tmp_path / "bert", tmp_path / "moved")  # the checkpoint must not need the directory
    trained = load_model(summary["checkpoint"])
    state = trained.model.state_dict()
    assert all(torch.equal(state[f"visual.trunk.{k}"], v) for k, v in net.state_dict().items()
               if not k.startswith("head."))
    assert all(torch.equal(state[f"text.transformer.{k}"], v) for k, v in bert.state_dict().items()
               if f"text.transformer.{k}" in state)
    assert sum(k.startswith("text.transformer.") for k in state) >= len(bert.state_dict()) - 3  # the pooler aside
    assert float(state["logit_scale"]) != pytest.approx(2.6592600, abs=1e-6)  # the rest trained: log(1 / 0.07)
    texts = ["a large yellow star", "the green triangle on black background"]
    reference = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(trained.tokenizer(texts), reference["input_ids"])
    assert trained.context_length == 16 and trained.tokenizer_files is not None
    from clipkit.inspect import inspect_path

    described = inspect_path(summary["checkpoint"])["tokenizer"]
    assert "weights file's header" in described and f"vocabulary {len(tokenizer)}" in described


def _refused(capsys, *overrides) -> str:
    from clipkit.cli import main

    capsys.readouterr()  # what building the files in the test printed (transformers' progress bars)
    assert main(["train", *overrides, "run.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipkit: error:") and "\n" not in err
    return err


def test_tower_files_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys, synth_small):
    net, file = _timm_file(tmp_path / "vit")
    _bert_directory(tmp_path / "bert")
    run_dir = tmp_path / "run"
    common = [f"run.dir={run_dir}", f"data.train={synth_small.train_spec}"]
    # a tower of another kind: refused while the config is checked, before anything is built or written
    err = _refused(capsys, "model.name=clipkit-nano", f"model.pretrained_image={file}", *common)
    assert "model.pretrained_image" in err and "not a timm model" in err
    err = _refused(capsys, "model.name=clipkit-nano-timm", f"model.pretrained_text={tmp_path / 'bert'}", *common)
    assert "model.pretrained_text" in err and "not a Hugging Face one" in err
    err = _refused(capsys, f"model.name={_hf_text_config(tmp_path)}", f"model.pretrained_text={file}", *common)
    assert "config.json" in err
    assert not run_dir.exists()
    # shapes that do not fit: the first tensor named
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["pos_embed"] = state["pos_embed"][:, :3].contiguous()
    save_file(state, str(tmp_path / "bad.safetensors"))
    err = _refused(capsys, "model.name=clipkit-nano-timm", f"model.pretrained_image={tmp_path / 'bad.safetensors'}",
                   *common)
    assert "'pos_embed'" in err and str(tuple(state["pos_embed"].shape)) in err
    small = tmp_path / "small-bert"
    _bert_directory(small, max_positions=12)  # positions for 12 tokens, the config asks for 16
    err = _refused(capsys, f"model.name={_hf_text_config(tmp_path)}", f"model.pretrained_text={small}", *common)
    assert "context_length 16" in err and "12 positions" in err
    shutil.copytree(tmp_path / "bert", tmp_path / "wide-bert")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=24)).save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", tmp_path / "wide-bert" / "model.safetensors")
    err = _refused(capsys, f"model.name={_hf_text_config(tmp_path)}", f"model.pretrained_text={tmp_path / 'wide-bert'}",
                   *common)
    assert "does not fit the bert text tower: tensor 'embeddings.word_embeddings.weight'" in err
    shutil.copytree(tmp_path / "bert", tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no-tokenizer" / name).unlink()
    err = _refused(capsys, f"model.name={_hf_text_config(tmp_path)}",
                   f"model.pretrained_text={tmp_path / 'no-tokenizer'}", *common)
    assert "has no tokenizer" in err


def test_malicious_tower_file_is_refused_and_never_runs(tmp_path, capsys, synth_small):
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'marker'}",)

    torch.save({"pos_embed": Payload()}, tmp_path / "evil.pth")
    err = _refused(capsys, "model.name=clipkit-nano-timm", f"model.pretrained_image={tmp_path / 'evil.pth'}",
                   f"run.dir={tmp_path / 'run'}", f"data.train={synth_small.train_spec}")
    assert "weights-only" in err and not (tmp_path / "marker").exists()


def _clip_directory(path, context=12):
    """A transformers CLIPModel directory whose tokenizer is not CLIP's BPE: its own words, [CLS]/[SEP], pad 0."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = _word_tokenizer(context)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=context, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return tokenizer


def test_a_run_from_a_transformers_directory_keeps_its_tokenizer_through_training_and_finetuning(
        tmp_path, synth_small):
    """The directory's tokenizer (another vocabulary, another length than open_clip's BPE) is what the trained
    checkpoint and a fine-tuned copy of it tokenise with, once the directory is gone."""
    from clipkit.finetune.run import main as finetune_main
    from clipkit.models import get_tokenizer
    from clipkit.run import run

    tokenizer = _clip_directory(tmp_path / "hf")
    summary = run(_config(f"model.pretrained={tmp_path / 'hf'}", f"run.dir={tmp_path / 'run'}",
                          f"data.train={synth_small.train_spec}", "train.global_batch_size=8", "train.steps=2",
                          "train.warmup_steps=1", "run.progress=false", "data.workers=0", "data.shuffle_buffer=20",
                          "eval.zeroshot_at_end=false", "eval.retrieval_at_end=false", "export.at_end=false",
                          "run.report=false"))
    shutil.move(tmp_path / "hf", tmp_path / "moved")
    texts = ["a photo of the red circle", "small blue square on black background", "zebra"]
    reference = tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    trained = load_model(summary["checkpoint"])
    assert torch.equal(trained.tokenizer(texts), reference["input_ids"])
    assert not torch.equal(get_tokenizer(trained.name)(texts), reference["input_ids"])  # open_clip's BPE differs
    out = tmp_path / "ft"
    assert finetune_main(["--checkpoint", summary["checkpoint"], "--data", str(synth_small.downstream_root),
                          "--method", "linear_probe", "--out", str(out), "run.progress=false", "data.workers=0",
                          "finetune.global_batch_size=16", "finetune.epochs=1", "finetune.min_steps=2",
                          "finetune.warmup_steps=1", "finetune.linear_probe.c_steps=2", "eval.batch_size=32"]) == 0
    best = load_model(json.loads((out / "result.json").read_text())["best_checkpoint"])
    assert torch.equal(best.tokenizer(texts), reference["input_ids"])
    # the open_clip export carries it too: open_clip's own local-dir: loading reads it back
    import open_clip

    from clipkit.export import export_checkpoint

    export_checkpoint(summary["checkpoint"], tmp_path / "oc", "open_clip")
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(texts), reference["input_ids"])
    assert torch.equal(load_model(tmp_path / "oc").tokenizer(texts), reference["input_ids"])
    from transformers import AutoTokenizer

    export_checkpoint(summary["checkpoint"], tmp_path / "onnx", "onnx")
    described = json.loads((tmp_path / "onnx" / "onnx_config.json").read_text())["tokenizer"]
    assert described["files"] == "tokenizer" and described["pad_id"] == 0 and described["eot_id"] == 3
    onnx_tokens = AutoTokenizer.from_pretrained(tmp_path / "onnx" / "tokenizer")(
        texts, padding="max_length", max_length=described["context_length"], truncation=True, return_tensors="pt")
    assert torch.equal(onnx_tokens["input_ids"], reference["input_ids"])


def test_hf_export_writes_the_directorys_own_tokenizer(tmp_path):
    """A transformers CLIP directory padding with end-of-text (as openai/clip-vit-* do), exported back to the
    transformers layout: the exported tokenizer is the directory's, not clipkit's BPE (which pads with 0)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from clipkit.export import export_checkpoint
    from clipkit.export.hf_format import write_bpe_files

    source = tmp_path / "hf"
    source.mkdir()
    vocab, merges = write_bpe_files(source)
    CLIPTokenizer(vocab=str(vocab), merges=str(merges), pad_token="<|endoftext|>", model_max_length=16) \
        .save_pretrained(source)
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=16, eos_token_id=49407,
                                          bos_token_id=49406, pad_token_id=49407),
                         vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2),
                         projection_dim=16)).save_pretrained(source)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(source)
    export_checkpoint(source, tmp_path / "out", "hf")
    texts = ["a photo of a cat", "x"]

    def tokens(path):
        return AutoTokenizer.from_pretrained(path)(texts, padding="max_length", max_length=16, truncation=True,
                                                   return_tensors="pt")["input_ids"]

    assert torch.equal(tokens(tmp_path / "out"), tokens(source)) and int(tokens(source)[1, -1]) == 49407
