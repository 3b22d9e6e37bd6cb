"""HybridMIM on SwinUNETR and the MIM baselines (MAE, SimMIM, naive contrastive): pieces and bundles."""

import glob
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai.data import list_data_collate
from monai.networks.nets import UNETR, BasicUNet, SwinUNETR, ViT

from hybridmim_components.losses import (
    ContrastiveViewsLoss, HybridMIMLoss, MAELoss, SimMIMLoss, mae_reconstructed_volume,
)
from hybridmim_components.checkpoints import PretextWeights
from hybridmim_components.geometry import patchify, unpatchify
from hybridmim_components.baseline_networks import ContrastiveSwinUNETR, ContrastiveViT, MAEViT, SimMIMSwinUNETR, SimMIMViT
from hybridmim_components.networks import HybridMIMSwinUNETR, pool_regions
from hybridmim_components.pretrained import load_pretrained
from hybridmim_components.probe import read_probe_log
from hybridmim_components.transforms import TwoLevelMaskd
from hybridmim_components.visualize import FeatureMapPCA

from conftest import (
    REPO, bundle_config, hidden_fraction_of_written_reconstruction, monai_bundle, run_command, run_two_processes,
    verify_saved_weights,
)

SWIN = {"feature_size": 12}
VIT = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4}


def masked_batch(n=2, size=64, **kwargs):
    masking = TwoLevelMaskd("image", **kwargs).set_random_state(0)
    return list_data_collate([masking({"image": torch.rand(1, size, size, size)}) for _ in range(n)])


def test_masking_is_aligned_with_swin_tokens_and_regions():
    batch = masked_batch()
    mask = batch["mask"].float()
    # every 2 x 2 x 2 Swin token is masked whole or not at all
    assert torch.equal(F.max_pool3d(mask, 2), -F.max_pool3d(-mask, 2))
    # a 32-voxel sub-volume is one deepest Swin token, in the order of the labels
    net = HybridMIMSwinUNETR(roi_size=32, projection_dim=8, **SWIN).eval()
    with torch.no_grad():
        deepest = net.encode(batch["image"])[-1]
    assert deepest.shape[2:] == (2, 2, 2)
    regions = pool_regions(F.avg_pool3d(mask, 32), (2, 2, 2))[..., 0]
    assert torch.allclose(regions * 8, batch["mask_count"].float())


def test_hybridmim_swinunetr_trains_and_loads_into_stock_swinunetr():
    batch = masked_batch()
    net = HybridMIMSwinUNETR(roi_size=32, projection_dim=8, **SWIN)
    out = net(batch["image"])
    assert out["reconstruction"].shape == (2, 1, 32, 32, 32) and out["roi"] == (slice(16, 48),) * 3
    assert out["count_logits"].shape == (2, 8, 9) and out["embeddings"].shape == (2, 2, 8)
    HybridMIMLoss()(out, batch)["loss"].backward()
    assert all(p.grad is not None for p in net.parameters())
    SwinUNETR(in_channels=1, out_channels=1, **SWIN).load_state_dict(net.backbone.state_dict(), strict=True)


def test_simmim_mask_token_hides_masked_voxels():
    """Masked tokens are replaced by the mask token: what the masked voxels held cannot change the output."""
    torch.manual_seed(0)
    batch = masked_batch(n=1, mask_ratio=0.6)
    net = SimMIMSwinUNETR(**SWIN).eval()
    mask = batch["mask"].float()
    changed = batch["image"] + 5.0 * mask * torch.rand_like(batch["image"])
    with torch.no_grad():
        a = net(batch["image"], batch["mask"])["reconstruction"]
        b = net(changed, batch["mask"])["reconstruction"]
        c = net(batch["image"] + 5.0 * (1 - mask), batch["mask"])["reconstruction"]
    assert a.shape == (1, 1, 64, 64, 64)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
    SwinUNETR(in_channels=1, out_channels=1, **SWIN).load_state_dict(net.backbone.state_dict(), strict=True)


def test_simmim_on_a_vit_hides_masked_patches_and_loads_into_unetr():
    """SimMIM on UNETR's ViT: what the masked 16^3 patches held cannot change the output, what the visible ones hold
    does (the control); the backbone loads strictly into UNETR's ``vit``; a deeper head has hidden layers."""
    torch.manual_seed(0)
    batch = masked_batch(n=1, size=32, sub_volume_size=32, patch_size=16, mask_ratio=0.5)
    mask = batch["mask"].float()
    assert 0 < mask.mean() < 1
    for depth in (1, 2):
        net = SimMIMViT(img_size=32, patch_size=16, num_layers=2, head_depth=depth, **VIT).eval()
        with torch.no_grad():
            a = net(batch["image"], batch["mask"])["reconstruction"]
            b = net(batch["image"] + 5.0 * mask * torch.rand_like(mask), batch["mask"])["reconstruction"]
            c = net(batch["image"] + 5.0 * (1 - mask), batch["mask"])["reconstruction"]
        assert a.shape == (1, 1, 32, 32, 32)
        assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
        assert isinstance(net.head, torch.nn.Linear) == (depth == 1)
    net = SimMIMViT(img_size=32, patch_size=16, **VIT)
    UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=8, **VIT).vit.load_state_dict(
        net.backbone.state_dict(), strict=True)


def test_contrastive_on_a_vit_embeds_both_views_and_loads_into_unetr():
    torch.manual_seed(0)
    net = ContrastiveViT(img_size=32, patch_size=16, projection_dim=16, **VIT)
    x = torch.rand(2, 1, 32, 32, 32)
    out = net(x, torch.flip(x, dims=[2]))
    assert out["embeddings"].shape == (2, 2, 16)
    value = ContrastiveViewsLoss()(out)["loss"]
    assert 0 < value.item() < math.log(4) + 1
    value.backward()
    assert net.backbone.blocks[0].attn.qkv.weight.grad is not None
    UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=8, **VIT).vit.load_state_dict(
        net.backbone.state_dict(), strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["simmim_swinunetr_pretrain", "contrastive_swinunetr_pretrain"])
def test_the_vit_variant_pretrains_infers_and_fine_tunes_as_unetr(bundle, tiny_ct_phantoms, tiny_task_phantoms,
                                                                  tmp_path):
    """``configs/vit.json`` (training) and ``configs/inference_vit.json``: the method on UNETR's ViT, as the WACV
    study runs it. Its plan says ViT; its weights fine-tune UNETR through the BTCV bundle, every ViT tensor
    loaded; its inference writes its pictures."""
    vit = ["--roi_size", "[32,32,32]", "--hidden_size", "48", "--mlp_dim", "96", "--num_heads", "4",
           "--sub_volume_size", "32", "--num_workers", "0"]
    root = tmp_path / "run"
    configs = json.dumps([bundle_config(bundle), bundle_config(bundle, "vit.json")])
    proc = run_command(monai_bundle("run", "training", "--config_file", configs, "--bundle_root", str(root),
                                    "--dataset_dir", tiny_ct_phantoms, "--max_epochs", "1", "--epoch_length", "2",
                                    "--val_interval", "1", *vit), cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.load(open(root / "models" / "plan.json"))["network"]["class"] == "ViT"
    ViT(in_channels=1, img_size=32, patch_size=16, classification=False, **VIT).load_state_dict(
        torch.load(root / "models" / "model.pt", weights_only=True), strict=True)
    configs = json.dumps([bundle_config(bundle, "inference.json"), bundle_config(bundle, "inference_vit.json")])
    proc = run_command(monai_bundle("run", "--config_file", configs, "--bundle_root", str(root), "--dataset_dir",
                                    tiny_ct_phantoms, *vit), cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert glob.glob(str(root / "reconstructions" / "phantom_000_*.nii.gz"))
    task = "btcv_multiorgan_segmentation"
    proc = run_command(monai_bundle(
        "run", "training", "--config_file", bundle_config(task), "--bundle_root", str(tmp_path / "fine"),
        "--dataset_dir", tiny_task_phantoms[task], "--network_def", "@unetr_def", "--unetr_hidden_size", "48",
        "--unetr_mlp_dim", "96", "--unetr_num_heads", "4", "--roi_size", "[32,32,32]", "--num_folds", "2",
        "--max_epochs", "1", "--num_workers", "0", "--pretrained", str(root / "models" / "model.pt")), cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "loaded     161 of 194 tensors of the network, of 161 in the checkpoint (100% of the smaller)" in proc.stdout


def test_simmim_loss_by_hand():
    target = torch.zeros(1, 1, 2, 2, 2)
    mask = torch.zeros(1, 1, 2, 2, 2)
    mask[..., 0, 0, :] = 1
    reconstruction = torch.zeros(1, 1, 2, 2, 2)
    reconstruction[..., 0, 0, 0] = 2.0  # masked: |2|
    reconstruction[..., 1, 1, 1] = 7.0  # not masked: ignored
    terms = SimMIMLoss()({"reconstruction": reconstruction}, {"target": target, "mask": mask})
    assert terms["loss"].item() == pytest.approx(2.0 / 2)


def test_patchify_follows_the_patch_embedding_order():
    image = torch.zeros(1, 2, 32, 16, 48)
    index = torch.arange(2 * 1 * 3).reshape(2, 1, 3).float()
    image[:] = index.repeat_interleave(16, 0).repeat_interleave(16, 1).repeat_interleave(16, 2)  # patch number
    patches = patchify(image, (16, 16, 16))
    assert patches.shape == (1, 6, 16**3 * 2)
    assert torch.equal(patches[0, :, 0], torch.arange(6).float()) and torch.equal(patches.amin(-1), patches.amax(-1))


def test_mae_loss_by_hand():
    target = torch.rand(2, 1, 32, 32, 32)
    patches = patchify(target, (16, 16, 16))
    mask = torch.zeros(2, 8)
    mask[:, :6] = 1
    prediction = patches.clone()
    prediction[:, :6] += 1.0  # masked patches off by 1
    prediction[:, 6:] += 9.0  # visible patches: ignored
    terms = MAELoss(16)({"prediction": prediction, "patch_mask": mask}, {"target": target})
    assert terms["loss"].item() == pytest.approx(1.0)


def test_mae_vit_loads_into_unetr_vit():
    net = MAEViT(img_size=32, decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4, **VIT)
    x = torch.rand(2, 1, 32, 32, 32)
    out = net(x)
    assert out["prediction"].shape == (2, 8, 16**3) and out["patch_mask"].sum(1).tolist() == [6, 6]
    MAELoss(16)(out, {"target": x})["loss"].backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)  # else DDP fails
    weights = net.vit.state_dict()
    ViT(in_channels=1, img_size=32, patch_size=16, classification=False, **VIT).load_state_dict(weights, strict=True)
    unetr = UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=8, **VIT)
    unetr.vit.load_state_dict(weights, strict=True)
    # the encoder of the MAE and the ViT are the same modules: training one trains the other
    assert net.vit.blocks[0].mlp.linear1.weight is net.mae.blocks[0].mlp.linear1.weight


def test_mae_checkpoint_into_unetr_through_the_loader(tmp_path):
    net = MAEViT(img_size=32, decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1, decoder_num_heads=4, **VIT)
    torch.save(net.vit.state_dict(), tmp_path / "model.pt")
    unetr = load_pretrained(UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=8, **VIT), str(tmp_path / "model.pt"))
    assert torch.equal(unetr.vit.blocks[11].attn.qkv.weight, net.vit.blocks[11].attn.qkv.weight)


def test_unpatchify_inverts_patchify():
    image = torch.rand(2, 3, 32, 16, 48)
    assert torch.equal(unpatchify(patchify(image, (16, 8, 16)), (16, 8, 16), (32, 16, 48)), image)
    with pytest.raises(ValueError, match="do not tile"):
        unpatchify(patchify(image, (16, 8, 16)), (16, 8, 16), (32, 32, 48))


def test_mae_reconstructed_volume_puts_patches_back_and_undoes_the_patch_normalisation():
    target = torch.rand(1, 1, 32, 32, 32)
    patches = patchify(target, (16, 16, 16))
    mask = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1]])
    normalised = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    volume, original, voxel_mask = mae_reconstructed_volume(
        {"prediction": normalised, "patch_mask": mask}, {"target": target}, 16, norm_pix_loss=True)
    assert torch.allclose(volume, target, atol=1e-4) and torch.equal(original, target)
    assert voxel_mask[0, 0, :16, :16, :16].all() and voxel_mask[0, 0, 16:, 16:, 16:].all()
    assert voxel_mask.sum() == 2 * 16**3


@pytest.mark.parametrize("kind", ["simmim", "mae"])
def test_pretext_weights_are_what_the_backbone_lacks(kind):
    """Saved beside model.pt, they restore the pre-training network without a second copy of the backbone."""
    def build():
        if kind == "simmim":
            net = SimMIMSwinUNETR(**SWIN)
            return net, net.backbone
        net = MAEViT(img_size=32, decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=1,
                     decoder_num_heads=4, **VIT)
        return net, net.vit

    torch.manual_seed(0)
    trained, backbone = build()
    pretext = PretextWeights(trained, backbone).state_dict()
    # exactly the pretext parts: SimMIM's mask token and head; MAE's decoder, mask and class tokens
    parts = {".".join(k.split(".")[:2]) for k in pretext}
    expected = {"mask_token", "head.weight", "head.bias"} if kind == "simmim" else {
        "mae.cls_token", "mae.decoder_blocks", "mae.decoder_embed", "mae.decoder_pos_embedding", "mae.decoder_pred",
        "mae.mask_tokens"}
    assert parts == expected, parts
    # with the backbone they hold every value of the network once: nothing lost, nothing twice
    unique = {t.data_ptr(): t.numel() for t in trained.state_dict(keep_vars=True).values()}
    assert sum(t.numel() for t in pretext.values()) + sum(t.numel() for t in backbone.state_dict().values()) == sum(
        unique.values())
    torch.manual_seed(1)
    fresh, fresh_backbone = build()
    fresh_backbone.load_state_dict(backbone.state_dict(), strict=True)
    PretextWeights(fresh, fresh_backbone).load_state_dict(pretext)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="missing"):
        PretextWeights(fresh, fresh_backbone).load_state_dict({})


def test_feature_map_pca_colours_what_the_encoder_tells_apart():
    swin = SwinUNETR(in_channels=1, out_channels=1, **SWIN).eval()
    pca = FeatureMapPCA(swin, lambda net, x: net.swinViT(x, net.normalize)[2])
    x = torch.zeros(1, 1, 64, 64, 64)
    x[..., :32] = 1.0  # two halves the features must tell apart
    with torch.no_grad():
        colours = pca(x)
    assert colours.shape == (1, 3, 64, 64, 64) and colours.min() >= 0 and colours.max() <= 1
    first = colours[0, 0]
    assert abs(first[..., 8:24].mean() - first[..., 40:56].mean()) > 0.5  # the first component splits the halves
    with torch.no_grad():
        assert torch.equal(pca(x), colours)  # no randomness (the SVD is exact, its signs fixed)
    with pytest.raises(ValueError, match="components"):
        FeatureMapPCA(swin, lambda net, x: x, components=0)


def test_contrastive_projection_separates_crops_that_the_encoder_pools_alike():
    """The pooled deepest Swin features of different crops point the same way (cosine ~0.96 at initialisation);
    the projection's BatchNorm removes that common direction, else NT-Xent collapses to ln(2B - 1)."""
    torch.manual_seed(0)
    net = ContrastiveSwinUNETR(hidden_dim=32, projection_dim=16, **SWIN)
    x = torch.rand(2, 1, 64, 64, 64)
    x[1] *= 0.2
    with torch.no_grad():
        pooled = net.backbone.swinViT(x, True)[4].mean(dim=(2, 3, 4))
        z = net(x, x)["embeddings"][0]
    assert F.cosine_similarity(pooled[:1], pooled[1:]).item() > 0.9
    assert F.cosine_similarity(z[:1], z[1:]).item() < 0.5


def test_contrastive_views_in_one_pass():
    net = ContrastiveSwinUNETR(hidden_dim=32, projection_dim=16, **SWIN)
    seen = []
    net.backbone.swinViT.patch_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = net(torch.rand(2, 1, 64, 64, 64), torch.rand(2, 1, 64, 64, 64))
    assert out["embeddings"].shape == (2, 2, 16) and seen == [4]
    value = ContrastiveViewsLoss()(out)["loss"]
    assert 0 < value.item() < math.log(4) + 1
    value.backward()
    SwinUNETR(in_channels=1, out_channels=1, **SWIN).load_state_dict(net.backbone.state_dict(), strict=True)


PRETRAIN_BUNDLES = {
    "hybridmim_swinunetr_pretrain": (["--feature_size", "12", "--reconstruction_roi", "[32,32,32]"], "swin"),
    "simmim_swinunetr_pretrain": (["--feature_size", "12"], "swin"),
    "contrastive_swinunetr_pretrain": (["--feature_size", "12"], "swin"),
    "mae_vit_pretrain": (["--roi_size", "[32,32,32]", "--hidden_size", "48", "--mlp_dim", "96"], "vit"),
    "modelsgenesis_unet_pretrain": (["--features", "[4,4,8,8,16,4]", "--probe_interval", "0"], "unet"),
    "swinssl_swinunetr_pretrain": (["--feature_size", "12"], "swin"),
}
# the restoring methods: the corrupted input (cut-out view), its restoration and the original
PANELS = {b: ("corrupted", "restoration", "original") for b in ("modelsgenesis_unet_pretrain", "swinssl_swinunetr_pretrain")}


def tensorboard_image_tags(runs_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in glob.glob(os.path.join(runs_dir, "events.out.tfevents.*")):
        accumulator = EventAccumulator(events, size_guidance={"images": 0})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"])
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("bundle", PRETRAIN_BUNDLES)
def test_pretraining_bundle_end_to_end(bundle, tiny_ct_phantoms, tmp_path):
    """Train, look at what was learned (TensorBoard, inference.json), and pass the zoo's checks with the weights."""
    import nibabel as nib

    extra, kind = PRETRAIN_BUNDLES[bundle]
    root = tmp_path / "run"
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config(bundle), "--bundle_root", str(root),
                     "--dataset_dir", tiny_ct_phantoms, "--max_epochs", "1", "--epoch_length", "2",
                     "--val_interval", "1", "--log_every", "1", "--num_workers", "0", *extra),
        cwd=REPO,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Epoch: 1/1, Iter: 2/2" in log and "Metrics -- val_" in log
    assert " val_contrastive: 0.0000" not in log  # negatives present in the validation batch
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    if kind == "swin":
        SwinUNETR(in_channels=1, out_channels=1, feature_size=12).load_state_dict(weights, strict=True)
    elif kind == "unet":
        BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4)).load_state_dict(
            weights, strict=True)
    else:
        UNETR(in_channels=1, out_channels=2, img_size=32, **VIT).vit.load_state_dict(weights, strict=True)
    assert os.path.isfile(root / "models" / "checkpoint_epoch=1.pt")
    reconstructs = bundle != "contrastive_swinunetr_pretrain"
    if reconstructs:
        panels = PANELS.get(bundle, ("masked", "reconstruction", "original"))
        assert tensorboard_image_tags(root / "runs") == {f"val/{name}_HW_0" for name in panels}

    proc = run_command(
        monai_bundle("run", "--config_file", bundle_config(bundle, "inference.json"), "--bundle_root", str(root),
                     "--dataset_dir", tiny_ct_phantoms, *extra),
        cwd=REPO,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    written = sorted(glob.glob(str(root / "reconstructions" / "phantom_000_*.nii.gz")))
    size = 32 if kind == "vit" else 64
    if bundle in PANELS:
        corrupted, original, restored = (nib.load(p).get_fdata() for p in written)
        assert [p.rsplit("_", 1)[1] for p in written] == ["corrupted.nii.gz", "original.nii.gz", "restoration.nii.gz"]
        assert corrupted.shape == original.shape == restored.shape == (size,) * 3
        assert not np.array_equal(corrupted, original)
        if bundle == "modelsgenesis_unet_pretrain":  # after the sigmoid
            assert 0 <= restored.min() and restored.max() <= 1
    elif reconstructs:
        hidden = hidden_fraction_of_written_reconstruction(written, size)
        ratio = {"hybridmim_swinunetr_pretrain": 0.4, "simmim_swinunetr_pretrain": 0.6, "mae_vit_pretrain": 0.75}
        assert abs(hidden - ratio[bundle]) < 0.15, hidden  # of the patches; background patches count less
    else:  # the encoder's features, three principal components in [0, 1]
        (features,) = (nib.load(p) for p in written)
        assert features.shape == (size,) * 3 + (3,) and 0 <= features.get_fdata().min() < features.get_fdata().max() <= 1

    overrides = {k.lstrip("-"): json.loads(v) for k, v in zip(extra[::2], extra[1::2])}
    verify_saved_weights(bundle, str(root / "models" / "model.pt"), tmp_path, **overrides)


@pytest.mark.parametrize(
    "bundle,extra",
    [
        # SimMIM leaves SwinUNETR's decoder untrained: DDP must be told (find_unused_parameters)
        ("simmim_swinunetr_pretrain", ["--feature_size", "12"]),
        # MAE's ViT view shares the encoder's modules: DDP must see each parameter once
        ("mae_vit_pretrain", ["--roi_size", "[32,32,32]", "--hidden_size", "48", "--mlp_dim", "96"]),
        # the contrastive baseline leaves the decoder untrained, and its negatives come from both processes
        ("contrastive_swinunetr_pretrain", ["--feature_size", "12"]),
        # HybridMIM on SwinUNETR: all five terms; without reconstruction (the decoder idles); one view
        ("hybridmim_swinunetr_pretrain", ["--feature_size", "12", "--reconstruction_roi", "[32,32,32]"]),
        ("hybridmim_swinunetr_pretrain", ["--feature_size", "12", "--reconstruction_roi", "[32,32,32]",
                                          "--loss#reconstruction_weight", "0"]),
        ("hybridmim_swinunetr_pretrain", ["--feature_size", "12", "--reconstruction_roi", "[32,32,32]",
                                          "--loss#contrastive_weight", "0"]),
        # Models Genesis: the whole UNet is trained, so DDP may insist that every parameter gets a gradient
        ("modelsgenesis_unet_pretrain", ["--features", "[4,4,8,8,16,4]", "--probe_interval", "1"]),
        # the SwinUNETR pretext tasks: the decoder idles, the contrastive negatives come from both processes, and
        # the probe runs on rank 0
        ("swinssl_swinunetr_pretrain", ["--feature_size", "12", "--probe_interval", "1"]),
    ],
    ids=["simmim", "mae", "contrastive", "hybridmim-swin", "hybridmim-swin-no-reconstruction", "hybridmim-swin-one-view",
         "modelsgenesis", "swinssl"],
)
@pytest.mark.slow
def test_pretraining_on_two_processes(bundle, extra, tiny_ct_phantoms, tmp_path):
    log = run_two_processes(bundle, "--bundle_root", str(tmp_path), "--dataset_dir", tiny_ct_phantoms, "--max_epochs",
                            "1", "--epoch_length", "2", "--val_interval", "1", "--log_every", "1", "--num_workers", "0",
                            *extra)
    assert os.path.isfile(tmp_path / "models" / "model.pt")
    if "--probe_interval" in extra:  # before and after the one epoch
        assert [r["epoch"] for r in read_probe_log(str(tmp_path / "runs" / "probe.jsonl"))] == [0, 1]
    contrastive = [float(v) for v in re.findall(r"contrastive: ([0-9.]+)", log)]
    if "contrastive_weight" in " ".join(extra):
        assert not contrastive  # one view: the term is not computed
    elif bundle.startswith(("hybridmim", "contrastive", "swinssl")):
        # one crop per process: only the other process's crops are negatives, so the term is not its batch-of-one 0
        assert contrastive and min(contrastive) > 0.1, log[-3000:]


@pytest.mark.parametrize("bundle", PRETRAIN_BUNDLES)
def test_train_workflow_properties_and_ids(bundle, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=bundle_config(bundle), workflow_type="train", bundle_root=str(tmp_path))
    workflow.initialize()
    assert not workflow.check_properties()
    for id_ in ("run", "training", "network", "network_def", "backbone", "train#dataset#data", "validate#dataset#data"):
        assert id_ in workflow.parser, id_


def test_contrastive_baseline_views_are_two_overlapping_crops_with_their_own_flips_and_rotations():
    """SimCLR-style views: two random crops of one context box (overlapping by construction), each flipped along
    each axis independently and rotated in all three planes."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(bundle_config("contrastive_swinunetr_pretrain"))
    parser["roi_size"] = [16, 16, 16]
    assert parser.get_parsed_content("context_size") == [24, 24, 24]  # crops overlap by >= 8 voxels per axis
    views = parser.get("views")
    for key in ("image", "image_2"):
        mine = [v for v in views if v["keys"] == key]
        assert sorted(v["spatial_axis"] for v in mine if v["_target_"] == "RandFlipd") == [0, 1, 2]
        assert sorted(v["spatial_axes"] for v in mine if v["_target_"] == "RandRotate90d") == [[0, 1], [0, 2], [1, 2]]

    pipeline = Compose(parser.get_parsed_content("views")).set_random_state(0)
    volume = torch.arange(24**3, dtype=torch.float32).reshape(1, 24, 24, 24)  # every voxel has its own value
    different = 0
    for _ in range(20):
        out = pipeline({"image": volume.clone()})
        assert out["image"].shape == out["image_2"].shape == (1, 16, 16, 16)
        different += not torch.equal(out["image"], out["image_2"])
    assert different == 20
    crops = [v for v in views if v["_target_"] == "RandSpatialCropd"]
    assert [v["keys"] for v in crops] == ["image", "image_2"] and all(v["roi_size"] == "@roi_size" for v in crops)


@pytest.mark.slow
@pytest.mark.parametrize("bundle,epochs", [("hybridmim_unet_pretrain", 2), ("hybridmim_swinunetr_pretrain", 3)])
def test_contrastive_term_leaves_its_collapsed_value_in_the_demo(bundle, epochs, tmp_path):
    """The demo's own network, batch and phantoms: NT-Xent must fall well below ln(2B - 1) (ln 3 for the two
    volumes of a batch), where it sits while the embeddings cannot tell positives from negatives."""
    proc = run_command(
        monai_bundle("run", "training", "--config_file", bundle_config(bundle), "--bundle_root", str(tmp_path),
                     "--max_epochs", str(epochs), "--log_every", "1", "--val_interval", str(epochs)),
        cwd=REPO, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    values = [float(v) for v in re.findall(r" contrastive: ([0-9.]+)", log)]
    assert len(values) >= 20, values
    assert sum(values[-8:]) / 8 < math.log(3) - 0.4, values


def test_simmim_head_depth():
    """SimMIM's head is one linear layer by default (its weights keep their names); deeper heads, for the WACV
    study's decoder comparison, predict the same voxels; a depth below 1 is refused."""
    x, mask = torch.rand(1, 1, 64, 64, 64), torch.zeros(1, 1, 64, 64, 64)
    linear = SimMIMSwinUNETR(feature_size=12)
    assert [k for k in linear.state_dict() if k.startswith("head.")] == ["head.weight", "head.bias"]
    deep = SimMIMSwinUNETR(feature_size=12, head_depth=3, head_width=32)
    convs = [m for m in deep.head if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [32, 32, 32**3]
    assert deep(x, mask)["reconstruction"].shape == linear(x, mask)["reconstruction"].shape == (1, 1, 64, 64, 64)
    with pytest.raises(ValueError, match="head_depth must be at least 1"):
        SimMIMSwinUNETR(feature_size=12, head_depth=0)
