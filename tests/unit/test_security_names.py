"""Names read from files are data, never paths; and building a model fetches no pretrained weights.

A weights file whose header names its model "../../x/settings" or an absolute path goes through every command
that loads weights (export in its three formats, zeroshot, retrieval, embed, search, serve's model loading,
finetune): each refuses it with one line naming it, and no file appears anywhere in the test area but the
command's own output and temporary folders. A header name that is the path of a JSON config (as training with
model.name=cfgs/arch.json writes) is taken by its stem; such a run exports, and open_clip itself loads the
export both ways the export documents."""
import json
import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipkit import cli
from clipkit.checkpoint import CheckpointError
from clipkit.config import load_config
from clipkit.models import WEIGHTS_FILE, create_model, get_model_config, load_model, register_model_config
from clipkit.retrieval.embed import embed_shards
from clipkit.retrieval.index import build_index
from clipkit.retrieval.search import Searcher
from clipkit.run import run

pytestmark = pytest.mark.usefixtures("one_thread")

CRAFTED = {"dotdot": "../../x/settings", "absolute": None}  # None: an absolute path inside the test area


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    """The test area (pytest's base temporary folder) and, inside it, folders a crafted name would reach:
    mkdtemp() below `tmp` gives tmp/clipkit-cfg-*/../../x = t1/x; an OUT of runs/LABEL/CMD/out gives
    runs/LABEL/x; `outside` for the absolute name. They exist, so a write there would succeed."""
    base = tmp_path_factory.mktemp("names")
    tmp = base / "t1" / "t2"
    for folder in (tmp, base / "t1" / "x", base / "outside"):
        folder.mkdir(parents=True)
    return {"root": base.parent, "base": base, "tmp": tmp, "outside": base / "outside"}


def _crafted_weights(checkpoint: Path, out: Path, model_name: str) -> Path:
    """The trained checkpoint's weights file with its header's model_name replaced."""
    with safe_open(str(checkpoint / WEIGHTS_FILE), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(state, str(out), metadata={**meta, "model_name": model_name})
    return out


@pytest.fixture(scope="module")
def crafted(trained_nano, area):
    checkpoint, _ = trained_nano
    folder = area["base"] / "weights"
    folder.mkdir()
    names = {**CRAFTED, "absolute": str(area["outside"] / "settings")}
    return {label: (name, _crafted_weights(checkpoint, folder / f"{label}.safetensors", name))
            for label, name in names.items()}


@pytest.fixture(scope="module")
def index_dir(trained_nano, synth_small, area):
    """A flat index of one training shard, embedded with the untouched checkpoint (for serve's loading)."""
    checkpoint, _ = trained_nano
    emb = area["base"] / "emb"
    embed_shards(checkpoint, synth_small.train_spec.replace("{0..3}", "0"), emb, batch_size=64, workers=0,
                 progress=False)
    build_index(emb, area["base"] / "idx")
    return area["base"] / "idx"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _outside(new: set[Path], *allowed: Path) -> list[str]:
    return sorted(str(p) for p in new if not any(p.is_relative_to(a) for a in allowed))


def _commands(weights: Path, out: Path, synth, index: Path) -> dict:
    """Each command that loads weights, as (argv for clipkit's CLI | a callable), writing only under out."""
    return {
        "export-open_clip": ["export", "--checkpoint", weights, "--format", "open_clip", "--out", out],
        "export-hf": ["export", "--checkpoint", weights, "--format", "hf", "--out", out],
        "export-onnx": ["export", "--checkpoint", weights, "--format", "onnx", "--out", out],
        "zeroshot": ["zeroshot", "--checkpoint", weights, "--data", synth.eval_root, "--out", out / "zs.json",
                     "--workers", "0", "--batch-size", "64"],
        "embed": ["embed", "--checkpoint", weights, "--data", synth.train_spec.replace("{0..3}", "0"), "--out", out,
                  "--workers", "0", "--no-progress"],
        "retrieval": ["retrieval-eval", "--checkpoint", weights, "--data", synth.retrieval_root, "--out",
                      out / "r.json", "--workers", "0", "--batch-size", "64", "--device", "cpu"],
        "search": ["search", "--index", index, "--checkpoint", weights, "--text", "a red square"],
        # `clipkit serve` loads its model this way before it binds a port
        "serve": lambda: Searcher(index, checkpoint=weights).load_model(),
        "finetune": ["finetune", "--checkpoint", weights, "--data", synth.downstream_root, "--method",
                     "linear_probe", "--out", out, "run.progress=false", "data.workers=0",
                     "finetune.linear_probe.c_steps=2", "eval.batch_size=64"],
    }


@pytest.mark.parametrize("command", ["export-open_clip", "export-hf", "export-onnx", "zeroshot", "retrieval", "embed",
                                     "search", "serve", "finetune"])
@pytest.mark.parametrize("label", list(CRAFTED))
def test_crafted_header_name_is_refused_and_writes_nothing_outside(label, command, crafted, area, synth_small,
                                                                     index_dir, monkeypatch, capsys):
    name, weights = crafted[label]
    out = area["base"] / "runs" / label / command / "out"
    (out.parent.parent / "x").mkdir(parents=True, exist_ok=True)  # where OUT/../../x/settings.json would go
    monkeypatch.setattr(tempfile, "tempdir", str(area["tmp"]))  # where mkdtemp() puts registered configs
    before = _files(area["root"])
    target = _commands(weights, out, synth_small, index_dir)[command]
    try:
        if callable(target):
            target()
            status = 0
        else:
            status = cli.main([str(a) for a in target])
    except Exception as e:  # noqa: BLE001 - asserted on below, after what the command wrote
        status, raised = None, e
    written_outside = _outside(_files(area["root"]) - before, out, area["tmp"])
    assert written_outside == []
    for target_file in (area["outside"] / "settings.json", area["base"] / "t1" / "x" / "settings.json",
                        out.parent.parent / "x" / "settings.json"):
        assert not target_file.exists()
    if callable(target):
        assert status is None and isinstance(raised, CheckpointError), status
        message = str(raised)
    else:
        assert status == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        message = lines[0]
    assert "\n" not in message and repr(name) in message and "not a plain name" in message, message


def _same_outputs(model_a, model_b, tokenizer) -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a red square", "two blue circles", "x"])
    with torch.no_grad():
        a = model_a.eval().encode_image(images), model_a.encode_text(tokens)
        b = model_b.eval().encode_image(images), model_b.encode_text(tokens)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)  # clipkit cuts the text at its longest caption


def test_json_path_header_name_exports_under_its_stem(trained_nano, area, monkeypatch):
    """An absolute JSON path (model.name=/.../settings.json at training) is the model 'settings': the export
    writes OUT/settings.json and nothing where the path points."""
    checkpoint, _ = trained_nano
    name = str(area["outside"] / "settings.json")
    weights = _crafted_weights(checkpoint, area["base"] / "json-name.safetensors", name)
    out = area["base"] / "json-name-export"
    monkeypatch.setattr(tempfile, "tempdir", str(area["tmp"]))
    before = _files(area["root"])
    assert cli.main(["export", "--checkpoint", str(weights), "--out", str(out)]) == 0
    assert _outside(_files(area["root"]) - before, out, area["tmp"]) == []
    assert not (area["outside"] / "settings.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors",
                                                     "settings.json"]
    assert load_model(weights).model_name == "settings"


def test_relative_json_model_name_trains_and_exports(synth_small, tmp_path, monkeypatch):
    """model.name=cfgs/arch.json (a path relative to the working directory, as the docs allow): the run's
    export at the end writes OUT/arch.json, and open_clip loads the export by local-dir: and by the
    architecture file, giving the checkpoint's own outputs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfgs").mkdir()
    arch = get_model_config("clipkit-nano")
    arch["embed_dim"] = 48  # an architecture of its own, registered nowhere else
    (tmp_path / "cfgs" / "arch.json").write_text(json.dumps(arch))
    cfg = load_config(None, ["run.dir=run", f"data.train={synth_small.train_spec}", "model.name=cfgs/arch.json",
                             "train.global_batch_size=8", "train.steps=1", "train.warmup_steps=1",
                             "run.progress=false", "data.workers=0", "data.shuffle_buffer=20",
                             "eval.zeroshot_at_end=false", "eval.retrieval_at_end=false", "run.report=false"])
    summary = run(cfg)
    export = tmp_path / "run" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["arch.json", "open_clip_config.json",
                                                       "open_clip_model.safetensors"]
    loaded = load_model(summary["checkpoint"])
    assert loaded.model_name == "arch" and loaded.model_cfg == arch

    via_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}", pretrained_text=False)
    _same_outputs(loaded.model, via_dir, open_clip.get_tokenizer(f"local-dir:{export}"))
    open_clip.add_model_config(export / "arch.json")
    via_name = open_clip.create_model("arch", pretrained=str(export / "open_clip_model.safetensors"))
    _same_outputs(loaded.model, via_name, open_clip.get_tokenizer("arch"))


def test_registered_configs_are_named_by_their_digest(area):
    """A config registered for a checkpoint is built by a name of its own: the plain name when open_clip's
    registry already holds exactly this config, else <name>-ckpt<digest> (the same in every process)."""
    nano = get_model_config("clipkit-nano")
    assert register_model_config("clipkit-nano", nano) == "clipkit-nano"
    other = {**nano, "embed_dim": 24}
    name = register_model_config("clipkit-nano", other)
    assert name.startswith("clipkit-nano-ckpt") and name == register_model_config("cfgs/clipkit-nano.json", other)
    assert get_model_config(name) == other and create_model(name).text_projection.shape[-1] == 24
    for bad in ("../../x/settings", "/abs/settings", "local-dir:/tmp", "hf-hub:org/repo", "..", "a b"):
        with pytest.raises(ValueError, match="not a plain name"):
            register_model_config(bad, other)


# ------------------------------------------------------------------------------------ no pretrained text tower

def test_hf_text_tower_is_built_from_its_config_not_its_pretrained_weights(tmp_path):
    """open_clip loads a Hugging Face text tower's pretrained weights by default (pretrained_text=True: a hub
    download for a hub name). clipkit builds it from its config: a local tiny BERT whose saved word embeddings
    are all 0.25 gives a tower of that shape with freshly initialised weights."""
    from transformers import BertConfig, BertModel

    bert_dir = tmp_path / "tiny-bert"
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=24))
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight.fill_(0.25)
    bert.save_pretrained(bert_dir)
    nano = get_model_config("clipkit-nano")
    cfg = {"embed_dim": nano["embed_dim"], "vision_cfg": nano["vision_cfg"],
           "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir), "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "context_length": 24, "vocab_size": 99}}
    model = create_model(register_model_config("tiny-hf-text", cfg))
    words = model.text.transformer.embeddings.word_embeddings.weight
    assert words.shape == (99, 32)  # the local config was read
    assert not torch.all(words == 0.25)  # ...and not its weights
    assert 0.005 < float(words.detach().std()) < 0.05  # BERT's own initialisation (std 0.02)
