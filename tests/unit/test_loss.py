import math

import numpy as np
import torch
import torch.nn.functional as F

from clipkit.losses import InfoNCELoss


def _hand_infonce(img, txt, scale):
    """The CLIP loss written out term by term in float64."""
    n = img.shape[0]
    s = [[scale * sum(img[i][k] * txt[j][k] for k in range(img.shape[1])) for j in range(n)] for i in range(n)]
    i2t = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_infonce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.285, dtype=torch.float64)
    got = InfoNCELoss()(img, txt, scale).item()
    assert abs(got - _hand_infonce(img.numpy(), txt.numpy(), 14.285)) < 1e-10


def test_infonce_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 3, generator=g, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss = InfoNCELoss()(img, txt, scale)
    loss.backward()
    eps = 1e-6
    base = img.detach().numpy()
    for idx in [(0, 0), (2, 1), (3, 2)]:
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (_hand_infonce(plus, txt.numpy(), 3.0) - _hand_infonce(minus, txt.numpy(), 3.0)) / (2 * eps)
        assert abs(img.grad[idx].item() - fd) < 1e-6
    fd_scale = (_hand_infonce(base, txt.numpy(), 3.0 + eps) - _hand_infonce(base, txt.numpy(), 3.0 - eps)) / (2 * eps)
    assert abs(scale.grad.item() - fd_scale) < 1e-6


def test_perfect_alignment_gives_low_loss_and_random_gives_about_log_n():
    n = 64
    eye = torch.eye(n)
    assert InfoNCELoss()(eye, eye, torch.tensor(100.0)).item() < 1e-3
    g = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(n, 256, generator=g), dim=-1)
    b = F.normalize(torch.randn(n, 256, generator=g), dim=-1)
    assert abs(InfoNCELoss()(a, b, torch.tensor(1.0)).item() - np.log(n)) < 0.05
