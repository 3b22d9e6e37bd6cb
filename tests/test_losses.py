import math

import pytest
import torch

from hybridmim_components.losses import HybridMIMLoss, count_location_consistency, masked_mse

BIG = 30.0  # a logit whose sigmoid/softmax is 1 to float precision


def test_masked_mse_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 1, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 1, 2, 2)
    assert masked_mse(pred, torch.zeros_like(pred), mask).item() == pytest.approx((1 + 16) / 2)
    assert masked_mse(pred, torch.zeros_like(pred), torch.zeros_like(mask)).item() == 0.0


def test_consistency_by_hand():
    zeros = count_location_consistency(torch.zeros(1, 1, 9), torch.zeros(1, 1, 8))
    assert zeros.item() == pytest.approx(0.0, abs=1e-6)  # E[count] = 4 = 8 * sigmoid(0)
    count = torch.full((1, 1, 9), -BIG)
    count[..., 2] = BIG  # the count head says 2
    location = torch.full((1, 1, 8), -BIG)
    location[..., :3] = BIG  # the location head says 3
    assert count_location_consistency(count, location).item() == pytest.approx(1.0, abs=1e-4)


def test_consistency_is_differentiable_on_both_heads():
    count = torch.randn(2, 3, 9, requires_grad=True)
    location = torch.randn(2, 3, 8, requires_grad=True)
    count_location_consistency(count, location).backward()
    assert count.grad.abs().sum() > 0 and location.grad.abs().sum() > 0


def outputs_and_targets():
    reconstruction = torch.zeros(2, 1, 4, 4, 4)  # sigmoid -> 0.5 everywhere
    target = torch.ones(2, 1, 8, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[:, :, 2:6, 2:6, 2:4] = 1  # half of the box is masked
    mask[:, :, 0, 0, 0] = 1  # outside the box: must not count
    pred = {
        "reconstruction": reconstruction,
        "roi": (slice(2, 6),) * 3,
        "count_logits": torch.zeros(2, 3, 9),
        "location_logits": torch.zeros(2, 3, 8),
        "embeddings": torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]),
    }
    targets = {
        "target": target,
        "mask": mask,
        "mask_count": torch.full((2, 3), 4, dtype=torch.int64),
        "mask_location": torch.zeros(2, 3, 8),
    }
    return pred, targets


def test_each_term_by_hand():
    pred, targets = outputs_and_targets()
    terms = HybridMIMLoss()(pred, targets)
    assert terms["reconstruction"].item() == pytest.approx(0.25)  # (1 - 0.5)^2 on masked voxels in the box
    assert terms["count"].item() == pytest.approx(math.log(9))  # uniform over 9 classes
    assert terms["location"].item() == pytest.approx(math.log(2))
    assert terms["consistency"].item() == pytest.approx(0.0, abs=1e-6)
    # NT-Xent, temperature 0.5: each of the 4 embeddings has its positive at cosine 1 (exp(1 / 0.5)) and the
    # two views of the other sample at cosine 0 (exp(0)) in the denominator
    anchor = -math.log(math.exp(2) / (math.exp(2) + 2 * math.exp(0)))
    assert terms["contrastive"].item() == pytest.approx(anchor)
    expected = 0.25 + 0.1 * math.log(9) + 0.1 * math.log(2) + 0.0 + 0.1 * anchor
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_weights_and_missing_views():
    pred, targets = outputs_and_targets()
    pred["embeddings"] = None  # evaluation: one view, no contrastive term
    terms = HybridMIMLoss(count_weight=0.0, location_weight=2.0)(pred, targets)
    assert "contrastive" not in terms
    assert terms["loss"].item() == pytest.approx(0.25 + 2.0 * math.log(2) + 0.01 * terms["consistency"].item())


def test_a_zero_weight_skips_its_term():
    pred, targets = outputs_and_targets()
    loss = HybridMIMLoss(count_weight=0.0, consistency_weight=0.0, contrastive_weight=0.0)
    assert loss.required_outputs() == {
        "reconstruction": True, "count_logits": False, "location_logits": True, "embeddings": False
    }
    pred["count_logits"] = pred["embeddings"] = None  # heads the network did not build
    terms = loss(pred, targets)
    assert set(terms) == {"loss", "reconstruction", "location"}
    assert terms["loss"].item() == pytest.approx(0.25 + 0.1 * math.log(2))
    only_contrastive = HybridMIMLoss(0, 0, 0, 0, 1.0)
    assert only_contrastive.required_outputs() == {
        "reconstruction": False, "count_logits": False, "location_logits": False, "embeddings": True
    }
    pred, targets = outputs_and_targets()
    pred["reconstruction"] = pred["count_logits"] = pred["location_logits"] = None
    assert set(only_contrastive(pred, targets)) == {"loss", "contrastive"}


def test_a_missing_head_is_a_clear_error():
    pred, targets = outputs_and_targets()
    pred["count_logits"] = None
    with pytest.raises(ValueError, match=r"count_logits.*count_head"):
        HybridMIMLoss()(pred, targets)


def test_nt_xent_equals_monai_contrastive_loss():
    from monai.losses import ContrastiveLoss

    from hybridmim_components.losses import nt_xent

    torch.manual_seed(0)
    a, b = torch.randn(6, 16), torch.randn(6, 16)
    for temperature in (0.1, 0.5):
        assert nt_xent(a, b, temperature).item() == pytest.approx(ContrastiveLoss(temperature)(a, b).item(), rel=1e-5)


def test_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        HybridMIMLoss(count_weight=-1)
    with pytest.raises(ValueError, match="at least one"):
        HybridMIMLoss(0, 0, 0, 0, 0)


def _nt_xent_on_one_rank(rank: int, world: int, port: int, first, second, out) -> None:
    """One process of ``test_nt_xent_under_ddp_is_the_loss_of_the_global_batch``: rank r holds rows r*B:(r+1)*B
    of both views, computes the loss on the gathered rows and back-propagates; DDP would then average."""
    import torch.distributed as dist

    from hybridmim_components.losses import nt_xent

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = first.shape[0] // world
        mine = [v[rank * b:(rank + 1) * b].clone().requires_grad_(True) for v in (first, second)]
        loss = nt_xent(*mine, temperature=0.5)
        loss.backward()
        out[rank] = (loss.item(), mine[0].grad, mine[1].grad)
    finally:
        dist.destroy_process_group()


def test_nt_xent_under_ddp_is_the_loss_of_the_global_batch():
    """With two processes, each rank's value is the loss over all 2B samples, and each rank's gradient, averaged
    over the ranks as DDP does, is that loss's gradient for its own rows: negatives come from both ranks."""
    import socket

    import torch.multiprocessing as mp

    from hybridmim_components.losses import nt_xent

    torch.manual_seed(0)
    first, second = torch.randn(4, 8), torch.randn(4, 8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_nt_xent_on_one_rank, args=(2, port, first, second, out), nprocs=2, join=True)

    whole = [v.clone().requires_grad_(True) for v in (first, second)]
    expected = nt_xent(*whole, temperature=0.5)
    expected.backward()
    for rank in (0, 1):
        value, grad_first, grad_second = out[rank]
        assert value == pytest.approx(expected.item(), rel=1e-5)
        rows = slice(rank * 2, rank * 2 + 2)
        # each rank back-propagates the global loss into its own rows at twice the gradient; DDP halves it
        torch.testing.assert_close(grad_first / 2, whole[0].grad[rows])
        torch.testing.assert_close(grad_second / 2, whole[1].grad[rows])
