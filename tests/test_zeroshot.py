import pytest
import torch
import torch.nn.functional as F

from clipkit.evaluation import ZeroShotDataError, build_classifier, classification_metrics, load_zeroshot_set
from clipkit.models import create_model, get_tokenizer


def test_metrics_against_hand_counts():
    # 3 classes, 6 samples
    logits = torch.tensor([
        [0.9, 0.05, 0.05],  # label 0, right
        [0.2, 0.7, 0.1],    # label 0, wrong (second choice)
        [0.1, 0.8, 0.1],    # label 1, right
        [0.1, 0.2, 0.7],    # label 1, wrong
        [0.1, 0.2, 0.7],    # label 2, right
        [0.5, 0.4, 0.1],    # label 2, wrong (last choice)
    ])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    m = classification_metrics(logits, labels, 3)
    assert m["acc1"] == pytest.approx(3 / 6)
    assert m["acc5"] == pytest.approx(1.0)  # top-k is capped at the class count
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    unbalanced = classification_metrics(logits[:5], labels[:5], 3)
    assert unbalanced["acc1"] == pytest.approx(3 / 5)
    assert unbalanced["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_classifier_is_renormalised_mean_of_template_embeddings():
    torch.manual_seed(0)
    model = create_model("clipkit-nano").eval()
    tok = get_tokenizer("clipkit-nano")
    classes, templates = ["red circle", "blue star"], ["a photo of a {c}.", "a {c}.", "an image of a {c}"]
    W = build_classifier(model, tok, classes, templates)
    assert W.shape == (32, 2)
    for j, c in enumerate(classes):
        with torch.no_grad():
            rows = [F.normalize(model.encode_text(tok([t.format(c=c)])), dim=-1)[0] for t in templates]
        expected = torch.stack(rows).mean(0)
        expected = expected / expected.norm()
        torch.testing.assert_close(W[:, j], expected, atol=1e-6, rtol=1e-5)


def test_load_set_errors(tmp_path, synth_small):
    zs = load_zeroshot_set(synth_small.eval_root)
    assert len(zs.classnames) == 30 and zs.shards.endswith("0.tar")
    with pytest.raises(ZeroShotDataError, match="nshards.txt"):
        load_zeroshot_set(tmp_path)
    with pytest.raises(ZeroShotDataError, match="--classnames"):
        load_zeroshot_set(str(tmp_path / "x.tar"))
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a thing\n")
    with pytest.raises(ZeroShotDataError, match="placeholder"):
        load_zeroshot_set(synth_small.eval_root, templates=bad)
