"""Distributed InfoNCE, plain and tiled: 2 and 4 real gloo processes against the single-process loss on
the whole batch.

What is compared (see clipkit/losses/infonce.py): the mean of the per-rank losses equals the
single-process loss L; rank r's feature gradient divided by the world size W equals dL/d(slice r) (the
gather's backward sums all W ranks' contributions; DDP's averaging divides by W again); the mean of the
per-rank temperature and bias gradients equals dL/ds and dL/db. The tiled loss must meet the same
convention with the plain single-process InfoNCELoss as its reference. SigLIP's ranks (ring exchange of the
text features) come from the same jobs, against the single-process sigmoid loss on the whole batch.
"""
import pytest
import torch
import torch.nn.functional as F

from clipkit.losses import InfoNCELoss, create_loss, sigmoid_loss
from dist.results import BATCH_PER_RANK, compare_with_single_process, distributed_results


def _single_process_infonce(img, txt, scale, bias):
    return InfoNCELoss()(img, txt, scale, bias)


@pytest.mark.parametrize("case", ["infonce_full", "infonce_local", "tiled_full", "tiled_local"])
def test_two_ranks_match_single_process(case):
    ranks, _ = distributed_results(2)
    compare_with_single_process(ranks, case, _single_process_infonce)


@pytest.mark.parametrize("case", ["tiled_full", "tiled_local"])
def test_tiled_cases_span_several_tiles(case):
    # With one tile covering the whole block the tiled cases would only re-test the plain loss: the online
    # log-sum-exp merge across blocks and a partial last tile need a tile smaller than, and not dividing,
    # the local batch (and so the global one).
    ranks, _ = distributed_results(2)
    tile = ranks[0][case]["tile_size"]
    assert tile < BATCH_PER_RANK and BATCH_PER_RANK % tile != 0, tile


def test_full_mode_gives_every_rank_the_global_loss():
    ranks, _ = distributed_results(2)
    assert torch.allclose(ranks[0]["infonce_full"]["loss"], ranks[1]["infonce_full"]["loss"], rtol=0, atol=1e-12)
    assert torch.allclose(ranks[0]["infonce_full"]["scale_grad"], ranks[1]["infonce_full"]["scale_grad"])
    # Local mode: the ranks score different rows, so their losses differ.
    assert abs(ranks[0]["infonce_local"]["loss"] - ranks[1]["infonce_local"]["loss"]) > 1e-6


@pytest.mark.parametrize("case", ["infonce_local", "tiled_local"])
def test_four_ranks_local_loss_offsets_labels_by_rank(case):
    ranks, _ = distributed_results(4)
    compare_with_single_process(ranks, case, _single_process_infonce)


def test_gather_emits_no_deprecation_warning():
    _, stderr = distributed_results(2)
    assert "deprecat" not in stderr.lower(), stderr[-3000:]


def test_single_process_matches_open_clip_clip_loss():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(10, 6, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(10, 6, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ours = InfoNCELoss(local_loss=True)(img, txt, scale, bias)
    theirs = ClipLoss()(img, txt, scale, bias)
    assert abs(ours.item() - theirs.item()) < 1e-12
    ours_grad = torch.autograd.grad(ours, [img, txt])
    theirs_grad = torch.autograd.grad(theirs, [img, txt])
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bias_changes_neither_loss_nor_gradients():
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=-1)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    with_bias = InfoNCELoss()(img, txt, torch.tensor(5.0, dtype=torch.float64), bias)
    without = InfoNCELoss()(img, txt, torch.tensor(5.0, dtype=torch.float64))
    assert abs(with_bias.item() - without.item()) < 1e-12
    grad_img, grad_bias = torch.autograd.grad(with_bias, [img, bias])
    torch.testing.assert_close(grad_img, torch.autograd.grad(without, img)[0], rtol=0, atol=1e-12)
    assert abs(grad_bias.item()) < 1e-12


def test_create_loss_names_and_unknown_name():
    assert isinstance(create_loss("infonce", local_loss=True), InfoNCELoss)
    assert create_loss("infonce", local_loss=True).local_loss
    assert create_loss("infonce_tiled", tile_size=64).tile_size == 64
    with pytest.raises(ValueError, match="infonce, infonce_tiled, siglip"):
        create_loss("clip")
    with pytest.raises(ValueError, match="tile_size"):
        create_loss("infonce_tiled", tile_size=0)


def test_mismatched_feature_shapes_are_reported():
    with pytest.raises(ValueError, match="same shape"):
        InfoNCELoss()(torch.randn(4, 8), torch.randn(5, 8), torch.tensor(1.0))


@pytest.mark.parametrize("world", [2, 4])  # 2: one exchange to the right; 4: both directions, then one more
def test_siglip_ranks_match_single_process_global_loss(world):
    ranks, stderr = distributed_results(world)
    compare_with_single_process(ranks, "siglip", sigmoid_loss)
    assert "deprecat" not in stderr.lower(), stderr[-3000:]
