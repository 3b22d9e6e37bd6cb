"""tools/gpu_check.py on the CPU with --smoke: every part runs on tiny settings, so the GPU check does not rot
between GPU loans; and a part that fails is reported while the others still run."""

import json
import os
import sys

import pytest

from conftest import REPO, run_command

TOOL = os.path.join(REPO, "tools", "gpu_check.py")


@pytest.mark.slow
def test_every_part_runs_on_the_cpu(tmp_path):
    proc = run_command([sys.executable, TOOL, "--device", "cpu", "--smoke", "True", "--output_dir", str(tmp_path)],
                       cwd=REPO, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == dict.fromkeys(statuses, "ok"), {n: report["parts"][n].get("error") for n in statuses}
    parts = {name: part["result"] for name, part in report["parts"].items()}
    assert parts["environment"]["torch"] and parts["environment"]["monai"]
    assert parts["main_job"]["model_pt"] and parts["main_job"]["probes"] >= 2 and parts["main_job"]["peak_gib"] > 0
    assert parts["finetune"]["predictions"] > 0 and "mean_dice" in json.dumps(parts["finetune"]["evaluate"])
    rows = parts["step"]["rows"]
    for name in ("UNet, shared trunk", "UNet, one view (contrastive_views=1)", "UNet, shared trunk, full reconstruction",
                 "UNet, shared trunk, bf16", "UNet, shared trunk, bf16 + channels_last", "SwinUNETR, shared trunk"):
        assert rows[name]["seconds"] > 0 and rows[name]["flops"] > 0 and rows[name]["tflops"] > 0, name
    # the full reconstruction decodes more than the box: more FLOPs for the same step
    assert rows["UNet, shared trunk, full reconstruction"]["flops"] > rows["UNet, shared trunk"]["flops"]
    assert parts["pipeline"]["loaders"] and parts["ddp"]["processes"] == 2
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| step | ok |" in table and "TFLOP/s" in table and table in proc.stdout


def test_a_failing_part_is_reported_and_the_others_run(tmp_path):
    """The phantom cache unwritable: the fine-tuning part fails with its error, the environment part still runs."""
    env_break = dict(os.environ, HYBRIDMIM_CACHE="/proc/no_such_place")
    import subprocess

    proc = subprocess.run([sys.executable, TOOL, "--device", "cpu", "--smoke", "True", "--output_dir", str(tmp_path),
                           "--parts", "[environment,finetune]"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env_break)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert report["parts"]["environment"]["status"] == "ok"
    error = report["parts"]["finetune"]["error"]
    assert report["parts"]["finetune"]["status"] == "failed" and "monai.bundle run training" in error, error
    assert report["parts"]["step"]["status"] == "not asked for"
    assert "| finetune | failed |" in (tmp_path / "gpu_check.md").read_text()
