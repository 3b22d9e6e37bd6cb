"""The named functions that the bundles' configs call where a setting decides (manifest or cache, pretrained or
scratch, resume or not, phantoms or data, one process or several): each branch, both ways."""

import os

import pytest
import torch

from hybridmim_components import checkpoints, data, distributed, manifest, pretrained


def test_crops_come_from_disk_with_a_manifest_and_from_the_loaded_volume_without():
    load, crop, disk, after = ["load", "scale"], "crop", "from_disk", ["mask"]
    assert manifest.crop_transforms("/corpus", disk, load, crop, after) == ["from_disk", "mask"]
    assert manifest.crop_transforms("", disk, load, crop, after) == ["load", "scale", "crop", "mask"]
    assert manifest.crop_transforms("", disk, load, crop) == ["load", "scale", "crop"]
    assert manifest.cache_rate("/corpus", 1.0) == 0.0 and manifest.cache_rate("", 0.5) == 0.5


def test_warm_up_only_from_pretrained_weights():
    assert pretrained.PretrainedWeights("model.pt").warmup_epochs(3) == 3
    assert pretrained.PretrainedWeights("").warmup_epochs(3) == 0
    assert pretrained.warmup_multiplier(3) == 0.25 and pretrained.warmup_multiplier(0) == 0.0


def test_resume_takes_the_newest_checkpoint_only_when_asked(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "checkpoint_epoch=1.pt")
    assert checkpoints.resume_checkpoint(str(tmp_path), True).endswith("checkpoint_epoch=1.pt")
    assert checkpoints.resume_checkpoint(str(tmp_path), False) == ""
    with pytest.raises(FileNotFoundError, match="no intact"):
        checkpoints.resume_checkpoint(str(tmp_path / "none"), True)


def test_the_probe_reads_the_users_volumes_or_its_phantoms(tmp_path):
    assert data.probe_class_names("/my/datalist.json") is None
    names = data.probe_class_names("")
    assert len(names) == 13 and names[0] == "spleen"
    items = data.probe_datalist("", str(tmp_path / "phantoms"))
    assert len(items) == 4 and all(os.path.isfile(item["label"]) for item in items)
    assert data.probe_datalist(str(tmp_path / "phantoms"), "/unused") == items  # a given datalist wins


def test_inference_reads_a_folder_or_one_file(tmp_path):
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (tmp_path / name).write_text("")
    assert data.inference_items(str(tmp_path)) == [{"image": str(tmp_path / n)} for n in ("a.nii", "b.nii.gz")]
    assert data.inference_items("/x/case.nii.gz") == [{"image": "/x/case.nii.gz"}]


def test_each_process_takes_a_disjoint_shard_and_the_cpu_without_cuda(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        items = list(range(10))
        assert sorted(distributed.rank_shard(items, seed=0, even_divisible=True)) == items  # one process: all
    finally:
        dist.destroy_process_group()
    if not torch.cuda.is_available():
        assert distributed.local_device() == torch.device("cpu")
    def net():
        return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))

    assert isinstance(distributed.ddp_ready(net(), torch.device("cpu"), True)[1], torch.nn.SyncBatchNorm)
    assert type(distributed.ddp_ready(net(), torch.device("cpu"), False)[1]) is torch.nn.BatchNorm3d
