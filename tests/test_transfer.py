"""The transfer recipe of the fine-tuning bundles: what is loaded (``transfer``), the transferred part's learning
rate (parameter groups), the warm-up and the frozen epochs; each through the real bundle where it matters."""

import glob
import json
import os

import pytest
import torch
from ignite.engine import Engine, Events

from monai.bundle import ConfigParser
from monai.networks.nets import UNETR, BasicUNet, SegResNet, SwinUNETR, ViT

from hybridmim_components.encoders import ENCODER_PREFIXES, encoder_prefixes, in_encoder
from hybridmim_components.engines import FreezeParameters
from hybridmim_components.pretrained import PretrainedWeights, transfer_weights

from conftest import REPO, TINY_UNET, bundle_config, monai_bundle, run_command, run_two_processes, tiny_finetune_args
from conftest import tiny_pretrain_args
from test_resume import iteration_losses, train, train_and_kill

pytestmark = pytest.mark.xdist_group("test_transfer")  # the slow tests share one pre-training
TINY = (4, 4, 8, 8, 16, 4)
VIT = dict(hidden_size=48, mlp_dim=96, num_heads=4)
FAMILIES = {
    # family: a network of it, as pre-trained (one output channel) and as fine-tuned (three)
    "BasicUNet": lambda out: BasicUNet(out_channels=out, features=TINY),
    "SwinUNETR": lambda out: SwinUNETR(in_channels=1, out_channels=out, feature_size=12),
    "UNETR": lambda out: UNETR(1, out, img_size=32, feature_size=8, **VIT),
    "SegResNet": lambda out: SegResNet(out_channels=out, init_filters=8, blocks_down=(1, 1), blocks_up=(1,)),
}


def different_weights(build, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build().state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_mode_loads_exactly_the_keys_it_names(family, tmp_path):
    build = FAMILIES[family]
    pretrained = different_weights(lambda: build(1), seed=1)
    torch.save(pretrained, tmp_path / "model.pt")
    for mode in ("encoder", "all"):
        torch.manual_seed(2)
        network = build(3)
        fresh = {k: v.clone() for k, v in network.state_dict().items()}
        report = transfer_weights(network, str(tmp_path / "model.pt"), mode, checkpoint_encoder=ENCODER_PREFIXES[family])
        encoder = [k for k in fresh if in_encoder(k, encoder_prefixes(family))]
        decoder = [k for k in fresh if k not in encoder]
        assert encoder and decoder
        after = network.state_dict()
        # the encoder is the pre-trained one in both modes
        assert all(torch.equal(after[k], pretrained[k]) for k in encoder)
        head = {k for k in decoder if pretrained[k].shape != fresh[k].shape}
        assert head  # the head's output channels differ, so it is never loaded
        assert all(torch.equal(after[k], fresh[k]) for k in head)
        same_shape_decoder = [k for k in decoder if k not in head and not torch.equal(pretrained[k], fresh[k])]
        assert same_shape_decoder  # else this test could not tell the modes apart
        if mode == "encoder":  # the decoder keeps its fresh initialisation, and the report says so
            assert all(torch.equal(after[k], fresh[k]) for k in decoder)
            assert set(report.loaded) == set(encoder) and set(report.fresh) == set(decoder)
        else:  # the negative control: "all" does take the decoder
            assert all(torch.equal(after[k], pretrained[k]) for k in same_shape_decoder)
            assert set(report.fresh) == head


def test_maes_vit_into_unetrs_encoder(tmp_path, capsys):
    vit = ViT(in_channels=1, img_size=32, patch_size=16, num_layers=12, **VIT)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    torch.manual_seed(0)
    network = UNETR(1, 3, img_size=32, feature_size=8, **VIT)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    report = transfer_weights(network, str(tmp_path / "vit.pt"), "encoder", checkpoint_encoder=ENCODER_PREFIXES["ViT"],
                              min_fraction=0.1)
    assert report.add_prefix == "vit." and all(k.startswith("vit.") for k in report.loaded)
    assert torch.equal(network.vit.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)
    assert all(torch.equal(network.state_dict()[k], before[k]) for k in report.fresh)
    assert "transfer: encoder" in capsys.readouterr().out


def test_unknown_mode_and_family_are_clear_errors(tmp_path):
    torch.save(BasicUNet(features=TINY).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="transfer must be one of"):
        PretrainedWeights(str(tmp_path / "model.pt"), transfer="decoders")
    with pytest.raises(ValueError, match="loads 'all' or the 'encoder', got 'linear'"):  # what is loaded, not a mode
        transfer_weights(BasicUNet(features=TINY), str(tmp_path / "model.pt"), "linear")
    with pytest.raises(ValueError, match=r"no encoder is defined for a Sequential.*--transfer all"):
        transfer_weights(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1)), str(tmp_path / "model.pt"), "encoder")


@pytest.mark.parametrize("network_def", ["@basicunet_def", "@swinunetr_def", "@unetr_def", "@segresnet_def"])
def test_parameter_groups_of_the_bundle_for_every_network_def(network_def, tmp_path):
    """The fine-tuning config's optimizer: the transferred part at pretrained_learning_rate, the rest at
    learning_rate; without pre-training one group at learning_rate."""
    overrides = {"network_def": network_def, "features": list(TINY), "swin_feature_size": 12, "roi_size": [32, 32, 32],
                 "unetr_hidden_size": 48, "unetr_mlp_dim": 96, "unetr_num_heads": 4, "segresnet_init_filters": 8,
                 "bundle_root": str(tmp_path),
                 "learning_rate": 1e-3, "pretrained_learning_rate": 1e-4}

    def parsed(**more):
        parser = ConfigParser()
        parser.read_config(bundle_config("btcv_multiorgan_segmentation"))
        parser.update({**overrides, **more})
        return parser.get_parsed_content("network"), parser.get_parsed_content("optimizer")

    network, optimizer = parsed()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3]
    # a checkpoint without the head, as pre-training's own: the last child that holds weights
    head = [name for name, child in network.named_children() if any(True for _ in child.parameters())][-1] + "."
    torch.save({k: v + 1 for k, v in network.state_dict().items() if not k.startswith(head)}, tmp_path / "model.pt")
    for transfer in ("encoder", "all"):
        network, optimizer = parsed(pretrained=str(tmp_path / "model.pt"), transfer=transfer)
        names = {id(p): n for n, p in network.named_parameters()}
        pretrained, fresh = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
        assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-3]
        assert len(pretrained) + len(fresh) == len(names)
        prefixes = encoder_prefixes(network)
        if transfer == "encoder":
            assert all(in_encoder(n, prefixes) for n in pretrained) and not any(in_encoder(n, prefixes) for n in fresh)
        else:  # the decoder too: everything but the head
            assert any(not in_encoder(n, prefixes) for n in pretrained) and all(n.startswith(head) for n in fresh)


FEW_SHOT = {"@basicunet_def": 32, "@swinunetr_def": 64, "@unetr_def": 32, "@segresnet_def": 32}  # crop side


@pytest.mark.parametrize("network_def", FEW_SHOT)
def test_decoder_and_linear_modes_train_only_what_they_name(network_def, tmp_path):
    """Through the bundle's own network and optimizer, three AdamW steps (weight decay on): ``decoder`` moves the
    decoder and head and not one encoder weight; ``linear`` moves its head and not one weight of the network it
    reads. The negative control: ``all``, the same steps, moves the encoder."""
    side = FEW_SHOT[network_def]
    overrides = {"network_def": network_def, "features": list(TINY), "swin_feature_size": 12,
                 "roi_size": [side] * 3, "unetr_hidden_size": 48, "unetr_mlp_dim": 96, "unetr_num_heads": 4,
                 "segresnet_init_filters": 8, "bundle_root": str(tmp_path), "weight_decay": 0.1}

    def parsed(**more):
        parser = ConfigParser()
        parser.read_config(bundle_config("btcv_multiorgan_segmentation"))
        parser.update({**overrides, **more})
        return (parser.get_parsed_content(k) for k in ("network", "optimizer", "loss", "pretrained_weights"))

    network, *_ = parsed()
    torch.save({k: v + 0.01 for k, v in network.state_dict().items()}, tmp_path / "model.pt")
    torch.manual_seed(0)
    image, label = torch.rand(1, 1, side, side, side), torch.randint(0, 14, (1, 1, side, side, side))
    for transfer in ("decoder", "linear", "all"):
        network, optimizer, loss, weights = parsed(pretrained=str(tmp_path / "model.pt"), transfer=transfer)
        stock = network.network if transfer == "linear" else network
        before = {k: v.clone() for k, v in network.state_dict().items()}
        network.train()
        for _ in range(3):
            optimizer.zero_grad()
            loss(network(image), label).backward()
            optimizer.step()
        after = network.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        prefixes = encoder_prefixes(stock)
        encoder = {k for k in before if in_encoder(k, prefixes)}
        if transfer == "decoder":
            assert encoder and not changed & encoder and changed and changed == {
                n for n, p in network.named_parameters() if p.requires_grad}
            assert weights.transferred_encoder(network) == []  # nothing for FreezeParameters to unfreeze
        elif transfer == "linear":
            assert type(network).__name__ == "LinearHeadSegmenter" and weights.head == "linear"
            assert not {k for k in changed if k.startswith("network.")}
            assert {"head.weight", "head.bias"} <= changed
            assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
                p.numel() for p in network.head.parameters())
        else:
            assert changed & encoder  # the control: the same steps move the encoder when it is not frozen


def test_a_linear_model_reloads_strictly_where_its_plan_says_so(tmp_path):
    """``as_trained`` builds what the plan says was saved: the LinearHeadSegmenter for ``head: linear`` (a strict
    load of its state dict), the stock network otherwise (which refuses that state dict: the control)."""
    from hybridmim_components.linear_head import LinearHeadSegmenter, as_trained

    saved = LinearHeadSegmenter(BasicUNet(out_channels=3, features=TINY)).state_dict()
    rebuilt = as_trained(BasicUNet(out_channels=3, features=TINY), {"network": {"head": "linear"}})
    rebuilt.load_state_dict(saved, strict=True)
    for plan in (None, {"network": {"head": "network"}}):
        with pytest.raises(RuntimeError):
            as_trained(BasicUNet(out_channels=3, features=TINY), plan).load_state_dict(saved, strict=True)


def test_frozen_epochs_leave_the_encoder_unchanged_then_it_trains():
    torch.manual_seed(0)
    network = BasicUNet(out_channels=2, features=TINY)
    encoder = [p for n, p in network.named_parameters() if in_encoder(n, ENCODER_PREFIXES["BasicUNet"])]
    decoder = [p for n, p in network.named_parameters() if not in_encoder(n, ENCODER_PREFIXES["BasicUNet"])]

    def run(frozen_epochs: int) -> list[tuple[bool, bool]]:
        """(encoder changed, decoder changed) in each of three epochs; AdamW with weight decay, which moves a
        parameter with a zero gradient"""
        torch.manual_seed(0)
        network.load_state_dict(BasicUNet(out_channels=2, features=TINY).state_dict())
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2, weight_decay=0.1)

        def step(engine, batch):
            optimizer.zero_grad()
            network(batch).mean().backward()
            for p in encoder:  # what DDP may do to a parameter without a gradient: the freeze must not care
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            optimizer.step()

        engine = Engine(step)
        FreezeParameters(encoder, frozen_epochs, optimizer).attach(engine)
        changes, before = [], None

        def snapshot(_):
            nonlocal before
            now = [p.detach().clone() for p in encoder], [p.detach().clone() for p in decoder]
            if before is not None:
                changes.append(tuple(any(not torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(before, now)))
            before = now

        engine.add_event_handler(Events.STARTED, snapshot)
        engine.add_event_handler(Events.EPOCH_COMPLETED, snapshot)
        engine.run([torch.rand(1, 1, 32, 32, 32)], max_epochs=3)
        return changes

    assert run(2) == [(False, True), (False, True), (True, True)]
    assert run(0) == [(True, True)] * 3  # the negative control: without frozen epochs the encoder trains at once


@pytest.fixture(scope="module")
def pretrained_unet(tmp_path_factory, tiny_ct_phantoms):
    root = str(tmp_path_factory.mktemp("pretrain"))
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config("hybridmim_unet_pretrain"))
                       + tiny_pretrain_args(root, tiny_ct_phantoms), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(root, "models", "model.pt")


BUNDLE = "msd_spleen_segmentation"
RECIPE = ["--transfer", "encoder", "--frozen_epochs", "1", "--pretrained_learning_rate", "1e-4", "--learning_rate", "1e-3",
          "--pretrained_warmup_epochs", "3", "--train#checkpoint#n_saved", "4"]


def checkpoint(root: str, epoch: int) -> dict:
    return torch.load(os.path.join(root, "models", f"checkpoint_epoch={epoch}.pt"), map_location="cpu",
                      weights_only=False)


@pytest.mark.slow
def test_bundle_freezes_the_transferred_encoder_and_warms_up(pretrained_unet, tiny_task_phantoms, tmp_path):
    root = str(tmp_path / "fine")
    args = tiny_finetune_args(root, tiny_task_phantoms[BUNDLE]) + ["--max_epochs", "3", "--pretrained", pretrained_unet]
    log = train(BUNDLE, args + RECIPE)
    assert "transfer: encoder" in log and "loaded     40 of 40 tensors of the network's encoder" in log
    source = torch.load(pretrained_unet, weights_only=True)
    first, second = checkpoint(root, 1), checkpoint(root, 2)
    encoder = [k for k in source if in_encoder(k, ENCODER_PREFIXES["BasicUNet"])]
    assert all(torch.equal(first["model"][k], source[k]) for k in encoder)  # frozen in epoch 1
    assert not all(torch.equal(second["model"][k], source[k]) for k in encoder)  # and trained in epoch 2
    # the decoder was fresh and trained from the start
    assert not torch.equal(first["model"]["upcat_1.convs.conv_0.conv.weight"], source["upcat_1.convs.conv_0.conv.weight"])
    groups = second["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-4, 1e-3] and [len(g["params"]) for g in groups] == [40, 42]
    # linear warm-up over 3 epochs from a quarter of the rate (no epoch at lr 0), then the cosine
    assert [g["lr"] for g in first["optimizer"]["param_groups"]] == pytest.approx([0.5e-4, 0.5e-3])
    assert [g["lr"] for g in groups] == pytest.approx([0.75e-4, 0.75e-3])


def killed_and_resumed_equals_uninterrupted(args, tmp_path) -> None:
    """A 4-epoch run of ``args(root)``, SIGKILLed in epoch 2 and resumed, logs the losses of an uninterrupted one
    from epoch 2 on and ends with the same weights, bit for bit."""
    uninterrupted = train(BUNDLE, args(str(tmp_path / "uninterrupted")))
    killed = str(tmp_path / "killed")
    train_and_kill(BUNDLE, args(killed))
    resumed = train(BUNDLE, args(killed) + ["--resume", "True"])
    expected, got = iteration_losses(uninterrupted, 2), iteration_losses(resumed, 2)
    assert len(expected) >= 6 and got == expected, (expected, got)
    final, again = checkpoint(str(tmp_path / "uninterrupted"), 4)["model"], checkpoint(killed, 4)["model"]
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.slow
def test_a_resume_in_the_warm_up_and_the_frozen_epochs_is_exact(pretrained_unet, tiny_task_phantoms, tmp_path):
    data = tiny_task_phantoms[BUNDLE]
    args = lambda root: tiny_finetune_args(root, data) + ["--max_epochs", "4", "--frozen_epochs", "2",  # noqa: E731
                                                          "--pretrained", pretrained_unet, *RECIPE[:2], *RECIPE[4:]]
    killed_and_resumed_equals_uninterrupted(args, tmp_path)  # killed in epoch 2: frozen, and in the warm-up


@pytest.mark.slow
def test_two_processes_freeze_the_encoder(pretrained_unet, tiny_task_phantoms, tmp_path):
    """Under DistributedDataParallel (gloo), the frozen encoder stays the pre-trained one on every rank."""
    run_two_processes(BUNDLE, *tiny_finetune_args(str(tmp_path), tiny_task_phantoms[BUNDLE]),
                      "--pretrained", pretrained_unet, "--max_epochs", "2", *RECIPE)
    source = torch.load(pretrained_unet, weights_only=True)
    first, second = checkpoint(str(tmp_path), 1)["model"], checkpoint(str(tmp_path), 2)["model"]
    encoder = [k for k in source if in_encoder(k, ENCODER_PREFIXES["BasicUNet"])]
    assert all(torch.equal(first["module." + k] if "module." + k in first else first[k], source[k]) for k in encoder)
    assert not all(torch.equal(second.get("module." + k, second.get(k)), source[k]) for k in encoder)


def frozen_part(mode: str, source: dict, model: dict) -> tuple[list[str], list[str]]:
    """(the weights of ``model`` that must equal ``source``'s, the weights that must have trained) in ``mode``:
    the pre-trained encoder and the head (``decoder``), or the whole stock network and the linear head (``linear``).
    Keys of a DDP checkpoint (``module.``) are read as the plain ones."""
    model = {k.removeprefix("module."): v for k, v in model.items()}
    if mode == "decoder":
        frozen = [k for k in source if in_encoder(k, ENCODER_PREFIXES["BasicUNet"])]
        return [k for k in frozen if torch.equal(model[k], source[k])] == frozen, model["upcat_1.convs.conv_0.conv.weight"]
    return ([k for k in source if in_encoder(k, ENCODER_PREFIXES["BasicUNet"])
             if torch.equal(model["network." + k], source[k])] == [k for k in source
                                                                  if in_encoder(k, ENCODER_PREFIXES["BasicUNet"])],
            model["head.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decoder", "linear"])
def test_few_shot_mode_trains_evaluates_infers_and_reloads_strictly(mode, pretrained_unet, tiny_task_phantoms,
                                                                     tmp_path):
    """The bundle in ``decoder`` and ``linear`` mode: the frozen encoder is the pre-trained one after training
    (epoch 1 and 2), the trained part moves between the epochs; evaluate.json scores the saved model and
    inference.json writes a prediction per volume, both from the run's plan, and the saved model loads strictly
    into what the plan says it is (the stock BasicUNet for ``decoder``, its linear head for ``linear``)."""
    from hybridmim_components.linear_head import as_trained
    from hybridmim_components.plan import read_plan

    root, data = str(tmp_path / "fine"), tiny_task_phantoms[BUNDLE]
    args = tiny_finetune_args(root, data) + ["--pretrained", pretrained_unet, "--transfer", mode,
                                             "--train#checkpoint#n_saved", "2"]
    log = train(BUNDLE, args)
    assert f"transfer: {'all' if mode == 'decoder' else 'encoder'}" in log
    source = torch.load(pretrained_unet, weights_only=True)
    (frozen_1, trained_1), (frozen_2, trained_2) = (frozen_part(mode, source, checkpoint(root, e)["model"]) for e in (1, 2))
    assert frozen_1 and frozen_2 and not torch.equal(trained_1, trained_2)
    saved = torch.load(os.path.join(root, "models", "model.pt"), weights_only=True)
    plan = read_plan(os.path.join(root, "models", "model.pt"))
    assert plan["network"]["head"] == ("linear" if mode == "linear" else "network")
    as_trained(BasicUNet(out_channels=2, features=TINY), plan).load_state_dict(saved, strict=True)
    evaluate = f"['{bundle_config(BUNDLE)}','{bundle_config(BUNDLE, 'evaluate.json')}']"
    proc = run_command(monai_bundle("run", "--config_file", evaluate, *tiny_finetune_args(root, data)), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(root, "eval", "metrics.json")))["val_mean_dice"]["cases"]
    images = os.path.join(data, "imagesTr")
    proc = run_command(monai_bundle("run", "--config_file", bundle_config(BUNDLE, "inference.json"), "--bundle_root",
                                    root, "--dataset_dir", images, "--features", TINY_UNET, "--roi_size", "[32,32,32]"),
                       cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(glob.glob(os.path.join(root, "predictions", "*_seg.nii.gz"))) == len(os.listdir(images))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decoder", "linear"])
def test_a_killed_few_shot_run_resumes_exactly(mode, pretrained_unet, tiny_task_phantoms, tmp_path):
    data = tiny_task_phantoms[BUNDLE]
    args = lambda root: tiny_finetune_args(root, data) + ["--max_epochs", "4", "--pretrained", pretrained_unet,  # noqa: E731
                                                          "--transfer", mode, "--train#checkpoint#n_saved", "4"]
    killed_and_resumed_equals_uninterrupted(args, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decoder", "linear"])
def test_two_processes_keep_the_few_shot_encoder_frozen(mode, pretrained_unet, tiny_task_phantoms, tmp_path):
    run_two_processes(BUNDLE, *tiny_finetune_args(str(tmp_path), tiny_task_phantoms[BUNDLE]),
                      "--pretrained", pretrained_unet, "--transfer", mode, "--train#checkpoint#n_saved", "2")
    source = torch.load(pretrained_unet, weights_only=True)
    (frozen_1, trained_1), (frozen_2, trained_2) = (
        frozen_part(mode, source, checkpoint(str(tmp_path), e)["model"]) for e in (1, 2))
    assert frozen_1 and frozen_2 and not torch.equal(trained_1, trained_2)
