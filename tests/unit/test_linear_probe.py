"""The linear probe against independent references: scikit-learn's LogisticRegression (lbfgs, L2) and its
metrics, and the model's own encode_image."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from clipkit.config import LinearProbeConfig
from clipkit.data.sample import Batch
from clipkit.errors import UserError
from clipkit.evaluation import classification_metrics
from clipkit.finetune.linear_probe import (
    Features,
    extract_features,
    fit_logistic,
    linear_probe,
    load_features,
    save_features,
)
from clipkit.models import create_model

# Small problems: a second intra-op thread only waits on the first (conftest's one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, d: int, k: int, seed: int, spread: float = 1.5, centers: np.ndarray | None = None):
    """Gaussian blobs around k random centres, L2-normalised like CLIP embeddings; labels 0..k-1 in turn."""
    g = np.random.default_rng(seed)
    centers = g.normal(size=(k, d)) if centers is None else centers
    y = np.arange(n) % k
    x = centers[y] + spread * g.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y.astype(np.int64)


def sklearn_fit(x: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
    # The defaults are the reference: L2 penalty, lbfgs, intercept; converged tightly.
    return LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(x.astype(np.float64), y)


def as_features(x: np.ndarray, y: np.ndarray, tag: str) -> Features:
    return Features(torch.from_numpy(x), torch.from_numpy(y), [f"{tag}{i}" for i in range(len(y))])


# ---------------------------------------------------------------------------------------------------------
# fit_logistic == sklearn


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0, 1e3])
def test_fit_logistic_matches_sklearn(k, C):
    x, y = blobs(300, 16, k, seed=k)
    ref = sklearn_fit(x, y, C)
    res = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), k, C, max_iter=10000, tol=1e-10)

    assert res.weight.shape == (k, 16) and res.bias.shape == (k,) and res.C == C and res.n_iter > 0
    probs = torch.softmax(res.logits(torch.from_numpy(x)), dim=1).numpy()
    ref_probs = ref.predict_proba(x.astype(np.float64))
    np.testing.assert_allclose(probs, ref_probs, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(probs.argmax(1), ref.predict(x.astype(np.float64)))

    w, b = res.weight.numpy(), res.bias.numpy()
    scale = max(1.0, np.abs(ref.coef_).max())
    if k == 2:  # sklearn fits one vector for class 1; ours is its symmetric two-class form
        np.testing.assert_allclose(w[1] - w[0], ref.coef_[0], atol=1e-4 * scale, rtol=0)
        np.testing.assert_allclose(b[1] - b[0], ref.intercept_[0], atol=1e-4 * scale, rtol=0)
        np.testing.assert_allclose(w[0], -w[1], atol=1e-12)
    else:  # multinomial biases are defined up to a common shift: compare them centred
        np.testing.assert_allclose(w, ref.coef_, atol=1e-4 * scale, rtol=0)
        np.testing.assert_allclose(b, ref.intercept_ - ref.intercept_.mean(), atol=1e-4 * scale, rtol=0)


def test_fit_logistic_objective_scaling_matters():
    """The references above are not all alike: C acts on the summed loss, so a different n at the same C
    changes the fit (a wrong 1/C scaling of the penalty would not match sklearn at two sizes)."""
    x, y = blobs(300, 16, 5, seed=1)
    small = fit_logistic(torch.from_numpy(x[:100]), torch.from_numpy(y[:100]), 5, 1.0, tol=1e-10)
    ref = sklearn_fit(x[:100], y[:100], 1.0)
    np.testing.assert_allclose(small.weight.numpy(), ref.coef_, atol=1e-4 * max(1, np.abs(ref.coef_).max()))
    other_c = sklearn_fit(x[:100], y[:100], 3.0)
    assert np.abs(other_c.coef_ - ref.coef_).max() > 0.1


def test_fit_logistic_warm_start_reaches_the_same_optimum():
    x, y = blobs(300, 16, 5, seed=2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    cold = fit_logistic(xt, yt, 5, 10.0, tol=1e-10)
    prev = fit_logistic(xt, yt, 5, 1.0, tol=1e-10)
    warm = fit_logistic(xt, yt, 5, 10.0, tol=1e-10, init=prev)
    p_cold = torch.softmax(cold.logits(xt), 1)
    p_warm = torch.softmax(warm.logits(xt), 1)
    assert (p_cold - p_warm).abs().max() < 1e-5
    # binary warm start goes through the symmetric two-class form
    xb, yb = blobs(200, 8, 2, seed=3)
    b1 = fit_logistic(torch.from_numpy(xb), torch.from_numpy(yb), 2, 1.0, tol=1e-10)
    b2 = fit_logistic(torch.from_numpy(xb), torch.from_numpy(yb), 2, 1.0, tol=1e-10, init=b1)
    assert (b1.weight - b2.weight).abs().max() < 1e-6 and b2.n_iter <= 2


def test_fit_logistic_runs_under_no_grad():
    x, y = blobs(100, 8, 3, seed=4)
    with torch.no_grad():
        res = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), 3, 1.0)
    ref = sklearn_fit(x, y, 1.0)
    np.testing.assert_allclose(torch.softmax(res.logits(torch.from_numpy(x)), 1).numpy(),
                               ref.predict_proba(x.astype(np.float64)), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# linear_probe == an sklearn sweep


def sklearn_sweep(train, val, grid):
    accs = []
    for c in grid:
        accs.append(accuracy_score(val[1], sklearn_fit(*train, c).predict(val[0].astype(np.float64))))
    best = int(np.argmax(accs))  # first maximum: the smallest C among ties
    return accs, best


def sk_metrics(y: np.ndarray, scores: np.ndarray, k: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # balanced accuracy warns about predicted classes absent from y
        return {"acc1": accuracy_score(y, scores.argmax(1)),
                "acc5": top_k_accuracy_score(y, scores, k=min(5, k), labels=np.arange(k)),
                "mean_per_class_recall": balanced_accuracy_score(y, scores.argmax(1)),
                "num_samples": len(y)}


def assert_metrics_equal(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), name


@pytest.mark.parametrize("refit", [True, False])
def test_linear_probe_matches_sklearn(refit):
    k, d = 7, 16
    centers = np.random.default_rng(10).normal(size=(k, d))
    train = blobs(210, d, k, seed=11, spread=2.5, centers=centers)
    val = blobs(140, d, k, seed=12, spread=2.5, centers=centers)
    test = blobs(140, d, k, seed=13, spread=2.5, centers=centers)
    cfg = LinearProbeConfig(c_min=1e-2, c_max=1e2, c_steps=9, max_iter=1000, refit_on_train_val=refit)
    grid = np.logspace(-2, 2, 9)

    res = linear_probe(as_features(*train, "tr"), as_features(*val, "va"), as_features(*test, "te"), k, cfg)

    accs, best = sklearn_sweep(train, val, grid)
    assert len(set(accs)) > 2  # the sweep does discriminate between Cs here
    assert [s["C"] for s in res.sweep] == pytest.approx(list(grid), rel=1e-12)
    assert [s["val_acc1"] for s in res.sweep] == pytest.approx(accs, abs=1e-6)
    assert res.best_C == pytest.approx(grid[best], rel=1e-12)

    chosen = sklearn_fit(*train, grid[best])
    assert_metrics_equal(res.val, sk_metrics(val[1], chosen.decision_function(val[0].astype(np.float64)), k))
    if refit:
        final = sklearn_fit(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]), grid[best])
    else:
        final = chosen
    assert_metrics_equal(res.test, sk_metrics(test[1], final.decision_function(test[0].astype(np.float64)), k))
    probs = torch.softmax(res.classifier.logits(torch.from_numpy(test[0])), 1).numpy()
    np.testing.assert_allclose(probs, final.predict_proba(test[0].astype(np.float64)), atol=1e-4)
    assert res.classifier.C == res.best_C


def test_linear_probe_ties_go_to_the_smallest_C():
    k, d = 3, 8
    centers = 5 * np.eye(k, d)  # well apart: every C classifies val perfectly
    train = blobs(60, d, k, seed=20, spread=0.3, centers=centers)
    val = blobs(30, d, k, seed=21, spread=0.3, centers=centers)
    cfg = LinearProbeConfig(c_min=0.1, c_max=10.0, c_steps=3)
    res = linear_probe(as_features(*train, "a"), as_features(*val, "b"), as_features(*val, "c"), k, cfg)
    assert [s["val_acc1"] for s in res.sweep] == [1.0, 1.0, 1.0]
    assert res.best_C == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------
# metrics == sklearn.metrics


def test_classification_metrics_match_sklearn():
    g = np.random.default_rng(30)
    k = 10
    labels = g.integers(0, k - 1, size=300)  # class 9 never occurs in the labels
    logits = g.normal(size=(300, k))
    logits[np.arange(300), labels] += 1.0  # better than chance
    ours = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels), k)
    assert_metrics_equal(ours, sk_metrics(labels, logits, k))


# ---------------------------------------------------------------------------------------------------------
# features: extraction and cache


@pytest.mark.parametrize("training", [True, False])
def test_extract_features_equals_encode_image(training):
    torch.manual_seed(0)
    # patch dropout makes train mode visibly different from eval mode
    model = create_model("clipkit-nano", force_patch_dropout=0.5)
    model.train(training)
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randn(3, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)]
    batches = [
        Batch(imgs[0], torch.tensor([0, 2, 1]), ["a", "b", "c"]),
        Batch(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.int64), [], skipped={"decode": 1}),
        Batch(imgs[1], torch.tensor([1, 1]), ["d", "e"]),
    ]
    feats = extract_features(model, batches, "cpu")

    assert model.training is training
    model.eval()
    with torch.no_grad():
        want = F.normalize(model.encode_image(torch.cat(imgs)), dim=-1)
    assert feats.features.dtype == torch.float32 and feats.features.shape == want.shape
    torch.testing.assert_close(feats.features, want, atol=1e-5, rtol=1e-5)
    assert feats.labels.dtype == torch.int64 and feats.labels.tolist() == [0, 2, 1, 1, 1]
    assert feats.keys == ["a", "b", "c", "d", "e"]
    torch.testing.assert_close(feats.features.norm(dim=-1), torch.ones(5))


def test_feature_cache_roundtrip_and_staleness(tmp_path):
    g = torch.Generator().manual_seed(2)
    feats = Features(F.normalize(torch.randn(6, 5, generator=g), dim=-1), torch.tensor([0, 3, 1, 2, 2, 0]),
                     ["k0", "dir/k1", "ключ", "", "a b\nc", "k5"])
    meta = {"checkpoint": "sha256:abc", "split": "train", "keys": "d1", "transform": "resize 32"}
    path = tmp_path / "cache" / "train.safetensors"
    assert load_features(path, meta) is None  # absent

    save_features(feats, path, meta)
    back = load_features(path, dict(meta))
    assert back is not None
    assert torch.equal(back.features, feats.features) and back.features.dtype == torch.float32
    assert torch.equal(back.labels, feats.labels) and back.labels.dtype == torch.int64
    assert back.keys == feats.keys
    assert list(tmp_path.joinpath("cache").iterdir()) == [path]  # no temporary left behind

    assert load_features(path, {**meta, "checkpoint": "sha256:def"}) is None  # other checkpoint
    assert load_features(path, {k: v for k, v in meta.items() if k != "transform"}) is None  # fewer entries
    assert load_features(path, {**meta, "extra": "1"}) is None  # more entries

    path.write_bytes(path.read_bytes()[:40])  # truncated: a miss, not a crash
    assert load_features(path, meta) is None


# ---------------------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_are_user_errors():
    x, y = blobs(60, 8, 3, seed=40)
    tr, va = as_features(x, y, "t"), as_features(x, y, "v")
    cfg = LinearProbeConfig(c_steps=2)

    no_class_2 = as_features(x[y != 2], y[y != 2], "t")
    with pytest.raises(UserError, match="no training samples") as err:
        linear_probe(no_class_2, va, va, 3, cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="outside"):
        linear_probe(tr, va, va, 2, cfg)
    bad_val = as_features(x, np.where(y == 0, 7, y), "v")
    with pytest.raises(UserError, match="val labels fall outside"):
        linear_probe(tr, bad_val, va, 3, cfg)
    narrow = as_features(x[:, :4].copy(), y, "t")
    with pytest.raises(UserError, match="feature dimensions differ"):
        linear_probe(tr, va, narrow, 3, cfg)
    with pytest.raises(UserError, match="no training samples"):
        fit_logistic(torch.from_numpy(x[y != 2]), torch.from_numpy(y[y != 2]), 3, 1.0)
