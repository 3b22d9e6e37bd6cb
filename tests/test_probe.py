"""The segmentation probe: it measures what the encoder's features separate and leaves the network and the
random streams alone (a bundle run logging it: test_pretrain_bundle; exact resume with it: test_resume)."""

import json

import pytest
import torch
import torch.nn as nn

from hybridmim_components.networks import HybridMIMUNet
from hybridmim_components.probe import SegmentationProbe, class_fractions, pooled_dice

SIZE = 32


def blob_volumes(n: int, seed: int = 0) -> list[dict]:
    """``n`` crops holding two boxes (classes 1 and 2) at random places; ``image`` has a noisy channel for each,
    so that a linear head on the raw input can segment them and a head on nothing cannot."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        label = torch.zeros(1, SIZE, SIZE, SIZE)
        for c in (1, 2):
            x, y, z = torch.randint(0, SIZE - 14, (3,), generator=g).tolist()
            label[0, x:x + 14, y:y + 14, z:z + 10] = c
        image = torch.cat([label == 1, label == 2]).float() + 0.1 * torch.randn((2, SIZE, SIZE, SIZE), generator=g)
        items.append({"image": image, "label": label})
    return items


class RawIntensity(nn.Module):
    """An "encoder" whose only feature is the input itself."""

    def encode(self, x):
        return [x]


class Blind(nn.Module):
    """An "encoder" that sees nothing: its feature is constant."""

    def encode(self, x):
        return [torch.zeros_like(x)]


def make_probe(network, **kwargs):
    return SegmentationProbe(network, blob_volumes(6), preprocessing=lambda item: item, num_classes=3, held_out=2,
                             steps=80, **kwargs)


def test_probe_scores_what_the_features_separate():
    informative = make_probe(RawIntensity()).measure()
    blind = make_probe(Blind()).measure()
    assert informative["dice"] > 0.8, informative
    assert blind["dice"] < 0.4, blind
    assert set(informative["dice_per_class"]) == {"1", "2"}


def test_probe_leaves_the_encoder_and_the_random_streams_alone():
    torch.manual_seed(0)
    net = HybridMIMUNet(in_channels=2, features=[4, 4, 8, 8, 16, 4], roi_size=16, sub_volume_size=16)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    probe = make_probe(net)
    first = probe.measure()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # weights and buffers
    assert net.training  # its mode is given back
    assert torch.equal(torch.get_rng_state(), rng)
    assert probe.measure() == first  # same encoder, same crops, same head: the same score


def test_class_fractions_and_pooled_dice():
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1
    fractions = class_fractions(label, 3, 4)
    assert torch.allclose(fractions.flatten(), torch.tensor([0.5, 0.5, 0.0]))
    prediction = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    prediction[0, :1] = 1
    assert pooled_dice(prediction, label[:, 0], 3) == [pytest.approx(2 * 16 / (16 + 32)), None]


def test_probe_off_reads_nothing():
    def data():
        raise AssertionError("a probe with interval 0 must not read its data")

    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    SegmentationProbe(RawIntensity(), data, preprocessing=lambda i: i, num_classes=3, interval=0).attach(engine)
    engine.run([0, 1], max_epochs=2)


def test_probe_needs_volumes_to_fit_and_to_hold_out():
    probe = SegmentationProbe(RawIntensity(), blob_volumes(2), preprocessing=lambda i: i, num_classes=3,
                              held_out=2)
    with pytest.raises(ValueError, match="probe_datalist"):
        probe.measure()
    with pytest.raises(TypeError, match="encode"):
        SegmentationProbe(nn.Linear(1, 1), blob_volumes(3), preprocessing=lambda i: i, num_classes=3)


def test_probe_on_crops_the_network_cannot_take_says_what_to_do():
    net = HybridMIMUNet(in_channels=1, features=[4, 4, 8, 8, 16, 4], roi_size=16, sub_volume_size=16)
    with pytest.raises(RuntimeError, match="probe_interval 0"):
        make_probe(net).measure()  # 2-channel crops into a 1-channel network


def test_plot_probe_draws_one_run_or_several(tmp_path):
    import json
    import os

    from conftest import load_tool

    main = load_tool("plot_probe").main

    logs = []
    for name, dice in (("a", [0.1, 0.2]), ("b", [0.1, 0.15])):
        logs.append(str(tmp_path / f"{name}.jsonl"))
        with open(logs[-1], "w") as f:
            for epoch, d in zip((0, 2), dice):
                f.write(json.dumps({"epoch": epoch, "dice": d, "dice_per_class": {"liver": d}, "seconds": 1.0}) + "\n")
    assert os.path.getsize(main(logs[0], output=str(tmp_path / "one.png"))) > 0
    assert os.path.getsize(main(*logs, output=str(tmp_path / "two.png"), labels=("a", "b"))) > 0
    with pytest.raises(ValueError, match="labels"):
        main(*logs, output=str(tmp_path / "x.png"), labels=("a",))


def test_plateau_rule():
    from hybridmim_components.probe import plateaued

    assert not plateaued([0.1, 0.2, 0.3], patience=3)  # too few probes to tell
    assert plateaued([0.1, 0.3, 0.303, 0.302, 0.304], min_gain=0.005, patience=3)
    assert not plateaued([0.1, 0.3, 0.303, 0.302, 0.306], min_gain=0.005, patience=3)  # the last one gained
    assert not plateaued([0.1, 0.2, 0.25, 0.3], patience=2)


def test_stop_at_probe_plateau_reads_the_log_and_ignores_the_random_encoder(tmp_path):
    from ignite.engine import Engine

    from hybridmim_components.probe import StopAtProbePlateau

    def run(scores: list[float]) -> int:
        log = tmp_path / "probe.jsonl"
        log.write_text(json.dumps({"epoch": 0, "dice": 0.5}) + "\n")  # the random encoder, before training

        def step(engine, _):  # what the probe writes at the end of each epoch
            with log.open("a") as f:
                f.write(json.dumps({"epoch": engine.state.epoch, "dice": scores[engine.state.epoch - 1]}) + "\n")

        engine = Engine(step)
        StopAtProbePlateau(str(log), min_gain=0.005, patience=2).attach(engine)
        engine.run([0], max_epochs=len(scores))
        return engine.state.epoch

    # 0.301 and 0.302 stay within 0.005 of 0.3: the run ends at epoch 5 (counting epoch 0's 0.5, it would end at 2)
    assert run([0.1, 0.2, 0.3, 0.301, 0.302, 0.4, 0.5, 0.6]) == 5
    assert run([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == 6  # still rising: the cap ends it
