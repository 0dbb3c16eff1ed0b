"""FLYP (`finetune.method=flyp`): the loss of a batch is the CLIP contrastive loss between its images and their
class prompts (written out here by hand), the head it validates with is zero-shot's classifier of the current
text tower (recomputed here from the text tower directly), and a short run on a task drawn here beats zero-shot."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clipkit.finetune.flyp import FlypClassifier, FlypObjective, train_both_towers
from clipkit.models import create_model, get_tokenizer
from clipkit.models.weights import load_any

from drawn_task import write_texture_task

pytestmark = pytest.mark.usefixtures("one_thread")

# measured: test acc1 0.783 against zero-shot's 0.142 (val 0.23, 0.48, 0.75, 0.75 at steps 20 to 80)
LR, MARGIN = 1e-3, 0.3
CLASSES = ["horizontal stripes", "checkerboard", "plain"]
TEMPLATES = ["a photo of {c}.", "{c}", "a texture of {c}, up close."]


def _zeroshot_head_by_hand(clip, tokenizer, classnames, templates) -> torch.Tensor:
    """[classes, dim]: per class the mean of its templates' normalised text embeddings, normalised, times the
    temperature (the CLIP paper's zero-shot classifier), one class at a time."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            emb = F.normalize(clip.encode_text(tokenizer([t.replace("{c}", name) for t in templates])), dim=-1)
            rows.append(F.normalize(emb.mean(dim=0), dim=0))
        return torch.stack(rows) * clip.logit_scale.exp()


@pytest.fixture
def nano():
    torch.manual_seed(0)
    clip = create_model("clipkit-nano").eval()  # eval: the same features in the objective and by hand
    return clip, get_tokenizer("clipkit-nano")


def test_flyp_loss_is_the_contrastive_loss_between_images_and_their_class_prompts(nano):
    clip, tokenizer = nano
    model = FlypClassifier(clip, len(CLASSES)).eval()
    train_both_towers(model)
    objective = FlypObjective(tokenizer, CLASSES, TEMPLATES, seed=0)
    images = torch.randn(8, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2])  # classes repeat within the batch, as they do in a task's
    keys = [f"sample{i}" for i in range(8)]

    prompts = objective.prompts(targets, keys, epoch=0)
    # one prompt per sample, of its class: one of the templates with its class name filled in
    for prompt, label in zip(prompts, targets.tolist()):
        assert prompt in [t.replace("{c}", CLASSES[label]) for t in TEMPLATES]
    assert len({p.split(CLASSES[0])[0] for p in prompts}) > 1  # the templates are drawn, not one for all
    assert objective.prompts(targets, keys, epoch=0) == prompts  # seeded by (seed, epoch, key)

    loss = objective.loss(objective.forward(model, images, targets, keys, epoch=0), targets)

    # by hand: CLIP's symmetric cross-entropy over the batch, positives on the diagonal, every other prompt a
    # negative (those of the same class too), with the model's own temperature
    image = F.normalize(clip.encode_image(images), dim=-1)
    text = F.normalize(clip.encode_text(tokenizer(prompts)), dim=-1)
    logits = clip.logit_scale.exp() * image @ text.T
    n = len(targets)
    image_to_text = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(n)) / n
    text_to_image = sum(torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(n)) / n
    assert loss.item() == pytest.approx(((image_to_text + text_to_image) / 2).item(), rel=1e-5)

    # both towers and the temperature learn from it; the head is never trained
    loss.backward()
    assert clip.visual.conv1.weight.grad.abs().sum() > 0
    assert clip.token_embedding.weight.grad.abs().sum() > 0 and clip.logit_scale.grad is not None
    assert not model.head.weight.requires_grad and model.head.weight.grad is None


def test_validation_head_is_zero_shot_of_the_current_text_tower(nano):
    clip, tokenizer = nano
    model = FlypClassifier(clip, len(CLASSES))
    objective = FlypObjective(tokenizer, CLASSES, TEMPLATES, seed=0)
    with torch.no_grad():  # a text tower and temperature unlike the ones the head was last built from
        for p in clip.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        clip.logit_scale.add_(0.3)
    objective.prepare_eval(model)
    expected = _zeroshot_head_by_hand(clip, tokenizer, CLASSES, TEMPLATES)
    torch.testing.assert_close(model.head.weight, expected, rtol=1e-5, atol=1e-5)
    assert model.head.bias.abs().max() == 0
    # the classifier it validates with: temperature * cosine between image features and the class embeddings
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), F.normalize(clip.encode_image(images), dim=-1) @ expected.T,
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """6 texture classes, 30 train / 10 val / 20 test images each (as in test_finetune_defaults.py), with three
    templates of its own: through the 80 OpenAI templates the briefly pretrained text tower sees every prompt as
    nearly the same, and FLYP moves little in the steps a test can afford (see docs/finetune.md)."""
    return write_texture_task(tmp_path_factory.mktemp("task"), per_class=(30, 10, 20), seed=1,
                              templates=["{c}", "a photo of {c}.", "a texture of {c}."])


def _finetune(out, checkpoint, data, method, *overrides) -> dict:
    from clipkit.finetune.run import main as finetune_main

    assert finetune_main(["--checkpoint", str(checkpoint), "--data", str(data), "--method", method, "--out", str(out),
                          "run.progress=false", "data.workers=0", "eval.batch_size=128", *overrides]) == 0
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def flyp_run(trained_nano, task, tmp_path_factory):
    """A short FLYP run at a fixed LR (an LR search short enough for a test chooses by noise): the figures of the
    defaults, LR search included, are in docs/finetune.md."""
    out = tmp_path_factory.mktemp("flyp") / "run"
    return out, _finetune(out, trained_nano[0], task, "flyp", "finetune.min_steps=60", "finetune.val_every=20",
                          f"finetune.lr={LR}")


def _head_matches_its_text_tower(run_dir, task):
    """The saved head is zero-shot's classifier of the saved text tower (recomputed here from the text tower)."""
    from clipkit.finetune.data import load_downstream

    best_dir = run_dir / "checkpoints" / "best"
    loaded = load_any(str(best_dir), None)
    data = load_downstream(task)
    assert len(data.templates) == 3
    expected = _zeroshot_head_by_hand(loaded.model.eval(), loaded.tokenizer, data.classnames, data.templates)
    torch.testing.assert_close(load_file(best_dir / "head.safetensors")["weight"], expected, rtol=1e-4, atol=1e-4)
    return loaded.model


def test_short_flyp_run_beats_zeroshot_and_shows_in_the_report(trained_nano, task, flyp_run, tmp_path, capsys):
    from clipkit.finetune.report import main as report_main

    out, result = flyp_run
    zeroshot = result["zeroshot"]["test"]["acc1"]
    assert result["method"] == "flyp" and zeroshot < 0.3
    assert result["test"]["acc1"] >= zeroshot + MARGIN, result["history"]
    assert [h["step"] for h in result["history"]] == [20, 40, 60, 80]
    towers = result["trainable_by_tower"]
    assert towers["image"]["fraction"] == towers["text"]["fraction"] == 1.0 and towers["head"]["trainable"] == 0

    model = _head_matches_its_text_tower(out, task)
    pretrained = load_any(str(trained_nano[0]), None).model
    assert not torch.equal(pretrained.token_embedding.weight, model.token_embedding.weight)  # the text tower trained

    capsys.readouterr()
    assert report_main([str(out), "--plot", str(tmp_path / "report.png")]) == 0
    rows = capsys.readouterr().out
    assert re.search(rf"^flyp\s+{result['val']['acc1']:.4f}\s+{result['test']['acc1']:.4f}", rows, re.M), rows


def test_wise_ft_interpolates_flyp_weights_with_the_head_rebuilt(trained_nano, task, flyp_run, tmp_path, capsys):
    from clipkit.finetune.report import main as report_main

    out, flyp = flyp_run
    result = _finetune(tmp_path / "wise", trained_nano[0], task, "wise", f"finetune.wise.finetuned={out}",
                       "finetune.wise.method=flyp", "finetune.wise.alphas=0,0.5,1")
    curve = {c["alpha"]: c for c in result["alphas"]}
    # the ends are the two models: zero-shot (its head from the pretrained text tower) and FLYP's
    for split in ("val", "test"):
        assert curve[0.0][split]["acc1"] == pytest.approx(result["zeroshot"][split]["acc1"])
        assert curve[1.0][split]["acc1"] == pytest.approx(flyp[split]["acc1"])
    _head_matches_its_text_tower(tmp_path / "wise", task)
    assert result["wise_method"] == "flyp"

    capsys.readouterr()
    assert report_main([str(out), str(tmp_path / "wise"), "--plot", str(tmp_path / "report.png")]) == 0
    rows = capsys.readouterr().out
    assert re.search(rf"^wise \(flyp\)\s+{result['val']['acc1']:.4f}\s+{result['test']['acc1']:.4f}", rows, re.M), rows
    assert re.search(rf"^flyp\s+{flyp['val']['acc1']:.4f}", rows, re.M), rows


def _slices_worker(rank: int, init_file: str, errors) -> None:
    import torch.distributed as dist

    from clipkit.errors import UserError
    from clipkit.finetune.flyp import _check_equal_slices

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for sizes in ([4, 4], [4, 3]):  # equal slices pass; a rank short of an image stops both
            try:
                _check_equal_slices(sizes[rank], torch.device("cpu"))
                errors.put((rank, tuple(sizes), None))
            except UserError as e:
                errors.put((rank, tuple(sizes), str(e)))
    finally:
        dist.destroy_process_group()


def test_unequal_slices_stop_every_rank_with_one_line(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_slices_worker, args=(r, str(tmp_path / "init"), errors)) for r in range(2)]
    for p in procs:
        p.start()
    got = {(rank, sizes): msg for rank, sizes, msg in (errors.get(timeout=120) for _ in range(4))}
    for p in procs:
        p.join(timeout=60)
    assert got[(0, (4, 4))] is None and got[(1, (4, 4))] is None
    for rank in (0, 1):  # both ranks raise, so none is left waiting in the gather
        msg = got[(rank, (4, 3))]
        assert msg and "3 to 4 images" in msg and "\n" not in msg, got
