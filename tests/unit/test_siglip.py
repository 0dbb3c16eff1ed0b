"""SigLIP: the single-process loss against a hand computation (its 2 / 4 gloo ranks against the single-process
loss on the whole batch run in tests/process/test_losses_distributed.py, on the jobs the InfoNCE checks use)."""
import math

import torch
import torch.nn.functional as F

from clipkit.losses import SigLipLoss, create_loss, sigmoid_loss


def _hand_sigmoid_loss(img, txt, scale, bias):
    """-sum_ij log sigmoid(label_ij * (scale * img_i . txt_j + bias)) / n, term by term in float64."""
    n, total = len(img), 0.0
    for i in range(n):
        for j in range(n):
            z = scale * sum(a * b for a, b in zip(img[i], txt[j])) + bias
            label = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-label * z))
    return total / n


def _inputs(seed, n=6, dim=5):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_sigmoid_loss_matches_hand_computation():
    img, txt = _inputs(0)
    got = sigmoid_loss(img, txt, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    assert abs(got.item() - _hand_sigmoid_loss(img.tolist(), txt.tolist(), 10.0, -10.0)) < 1e-10


def test_sigmoid_loss_gradients_match_finite_differences():
    img, txt = _inputs(1, n=4, dim=3)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    img.requires_grad_()
    g_img, g_scale, g_bias = torch.autograd.grad(sigmoid_loss(img, txt, scale, bias), [img, scale, bias])
    hand = lambda im, s, b: _hand_sigmoid_loss(im, txt.tolist(), s, b)  # noqa: E731
    base, eps = img.detach().tolist(), 1e-6
    for i, k in [(0, 0), (2, 1), (3, 2)]:
        plus, minus = [r[:] for r in base], [r[:] for r in base]
        plus[i][k] += eps
        minus[i][k] -= eps
        assert abs(g_img[i, k].item() - (hand(plus, 3.0, -1.0) - hand(minus, 3.0, -1.0)) / (2 * eps)) < 1e-7
    assert abs(g_scale.item() - (hand(base, 3 + eps, -1.0) - hand(base, 3 - eps, -1.0)) / (2 * eps)) < 1e-7
    assert abs(g_bias.item() - (hand(base, 3.0, -1 + eps) - hand(base, 3.0, -1 - eps)) / (2 * eps)) < 1e-7


def test_siglip_module_on_one_process_is_the_global_loss_and_accepts_no_bias():
    img, txt = _inputs(2)
    scale = torch.tensor(10.0, dtype=torch.float64)
    assert torch.equal(SigLipLoss()(img, txt, scale), sigmoid_loss(img, txt, scale))
    expected = _hand_sigmoid_loss(img.tolist(), txt.tolist(), 10.0, 0.0)
    assert abs(create_loss("siglip")(img, txt, scale).item() - expected) < 1e-10


def test_large_logits_stay_finite():
    img, txt = _inputs(3)
    loss = sigmoid_loss(img.float(), txt.float(), torch.tensor(1e4), torch.tensor(-10.0))
    assert torch.isfinite(loss)
