"""The fine-tuning bundles inside the real MONAI Label server (0.8.5, its ``monaibundle`` sample app).

The bundles are copied into the app as a user would copy them, with the user's small settings written into their
configs (a tiny network, so that a CPU trains it in seconds). Nothing of MONAI Label is imitated: the server is the
registry's package, started on 127.0.0.1 and stopped by PID; the requests are HTTP.
"""

import hashlib
import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch

from monai.bundle import ConfigParser

from conftest import FINETUNE_BUNDLES, HIDE_EDITABLE_ENV, REPO, bundle_config, monai_bundle, run_command
from monai_label_server import MonaiLabelServer, monailabel_venv, venv_env

# the real MONAI Label server, in a virtual environment of its own, started once for the file
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_monai_label_server")]

TINY = {"features": [4, 4, 8, 8, 16, 4], "roi_size": [32, 32, 32], "num_workers": 0}
CT_BUNDLES = [b for b, (kind, _) in FINETUNE_BUNDLES.items() if kind == "ct"]
TRAINED = "msd_spleen_segmentation"
LINEAR = "msd_spleen_segmentation_linear"  # the spleen bundle with a model of transfer: linear (a linear head)


def label_values(bundle: str) -> set[int]:
    meta = json.load(open(os.path.join(REPO, "bundles", bundle, "configs", "metadata.json")))
    return {int(k) for k in meta["network_data_format"]["outputs"]["pred"]["channel_def"]}


def install_bundle(bundle: str, model_dir: str, settings: dict = TINY, source: str | None = None,
                   name: str | None = None) -> str:
    """The bundle (the repository's, or the folder ``source``) in the app's ``model/`` folder (as ``name``), with
    small ``settings`` and a ``models/model.pt`` of its network."""
    root = os.path.join(model_dir, name or bundle)
    shutil.copytree(source or os.path.join(REPO, "bundles", bundle), root)
    for name in ("train.json", "inference.json"):
        path = os.path.join(root, "configs", name)
        config = json.load(open(path))
        config.update({k: v for k, v in settings.items() if k in config})
        json.dump(config, open(path, "w"), indent=4)
    parser = ConfigParser()
    parser.read_config(os.path.join(root, "configs", "inference.json"))
    parser.update({"bundle_root": root})
    torch.manual_seed(0)
    os.makedirs(os.path.join(root, "models"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(root, "models", "model.pt"))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_task_phantoms):
    venv_dir = monailabel_venv()
    work = tmp_path_factory.mktemp("monailabel")
    subprocess.run(["monailabel", "apps", "--name", "monaibundle", "--download", "--output", str(work)],
                   check=True, env=venv_env(venv_dir), capture_output=True)
    app = str(work / "monaibundle")
    # the spleen bundle at its own widths, with weights that segment the phantoms' spleen (Dice 0.73 to 0.84 on
    # each of them, measured with its inference.json); the others with tiny untrained networks
    trained_settings = {k: v for k, v in TINY.items() if k != "features"}
    for bundle in FINETUNE_BUNDLES:
        install_bundle(bundle, os.path.join(app, "model"), trained_settings if bundle == TRAINED else TINY)
    trained = work / "trained"
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(TRAINED), "--bundle_root",
                                    str(trained), "--dataset_dir", tiny_task_phantoms[TRAINED], "--roi_size",
                                    "[32,32,32]", "--num_folds", "2", "--max_epochs", "60", "--val_interval", "20",
                                    "--num_workers", "0", "--learning_rate", "0.01"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copy(trained / "models" / "model.pt", os.path.join(app, "model", TRAINED, "models", "model.pt"))
    # a linear head on the (random) encoder of the tiny network, installed with the plan its run wrote, which tells
    # the bundle's inference.json to build the head
    linear = work / "linear"
    proc = run_command(monai_bundle("run", "training", "--config_file", bundle_config(TRAINED), "--bundle_root",
                                    str(linear), "--dataset_dir", tiny_task_phantoms[TRAINED], "--features",
                                    json.dumps(TINY["features"]), "--roi_size", "[32,32,32]", "--num_folds", "2",
                                    "--max_epochs", "2", "--num_workers", "0", "--transfer", "linear"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = install_bundle(TRAINED, os.path.join(app, "model"), TINY, name=LINEAR)
    for name in ("model.pt", "plan.json"):
        shutil.copy(linear / "models" / name, os.path.join(installed, "models", name))

    # the datastore: the spleen task's CT phantoms with their labels, as MONAI Label's local datastore lays them out
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    from hybridmim_components.data import load_datalist

    for item in load_datalist(tiny_task_phantoms[TRAINED]):
        name = os.path.basename(item["image"])
        shutil.copy(item["image"], studies / name)
        shutil.copy(item["label"], studies / "labels" / "final" / name)

    conf = {"models": ",".join([*FINETUNE_BUNDLES, LINEAR]), "zoo_source": "github", "preload": "false", "sam2": "false"}
    with MonaiLabelServer(venv_dir, app, str(studies), conf, str(work / "server.log")) as running:
        yield running


def test_info_lists_every_bundle_with_its_labels(server):
    info = server.get("/info/").json()
    for bundle in FINETUNE_BUNDLES:
        assert bundle in info["models"], info["models"].keys()
        labels = set(info["models"][bundle]["labels"].values())
        assert labels == label_values(bundle) - {0}, (bundle, info["models"][bundle]["labels"])
    assert set(info["trainers"]) == {*FINETUNE_BUNDLES, LINEAR}


def first_image_id(server) -> str:
    """The datastore id (file name without extension) of the first study."""
    return sorted(f for f in os.listdir(server.studies) if f.endswith(".nii.gz"))[0].removesuffix(".nii.gz")


def check_label(server, response, reference: str, bundle: str) -> None:
    assert response.status_code == 200, response.text[-2000:] + server.log()[-6000:]
    path = reference + f".{bundle}.out.nii.gz"
    with open(path, "wb") as f:
        f.write(response.content)
    label, image = nib.load(path), nib.load(reference)
    assert label.shape[:3] == image.shape[:3]
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    values = set(np.unique(np.asarray(label.dataobj)).astype(int).tolist())
    assert values <= label_values(bundle), (bundle, values)


def spleen_dice(prediction: np.ndarray, reference: str) -> float:
    truth = np.asarray(nib.load(reference).dataobj) == 1
    found = prediction == 1
    return 2 * (found & truth).sum() / max(found.sum() + truth.sum(), 1)


@pytest.mark.parametrize("bundle", CT_BUNDLES)
def test_infer_returns_a_label_in_the_image_space(server, bundle):
    image_id = first_image_id(server)
    response = server.infer(bundle, image=image_id)
    check_label(server, response, os.path.join(server.studies, image_id + ".nii.gz"), bundle)
    if bundle == TRAINED:  # the trained bundle finds the phantom's spleen, where an empty label would score 0
        reference = os.path.join(server.studies, "labels", "final", image_id + ".nii.gz")
        prediction = np.asarray(nib.load(os.path.join(server.studies, f"{image_id}.nii.gz.{bundle}.out.nii.gz")).dataobj)
        assert spleen_dice(np.zeros_like(prediction), reference) == 0.0  # the negative control of the measure
        assert spleen_dice(prediction, reference) > 0.5, spleen_dice(prediction, reference)


def test_infer_with_a_linear_head_model(server):
    """A model saved by ``transfer: linear`` (a LinearHeadSegmenter) runs in MONAI Label as the bundle's
    inference.json builds it from the plan beside it; MONAI Label loads weights non-strictly, so a wrong network
    would load nothing and still answer: the label must be what the linear model itself predicts."""
    image_id = first_image_id(server)
    response = server.infer(LINEAR, image=image_id)
    reference = os.path.join(server.studies, image_id + ".nii.gz")
    check_label(server, response, reference, TRAINED)
    ours = os.path.join(server.app, "our_prediction")
    proc = run_command(monai_bundle("run", "--config_file", os.path.join(server.app, "model", LINEAR, "configs",
                                                                         "inference.json"),
                                    "--bundle_root", os.path.join(server.app, "model", LINEAR), "--dataset_dir",
                                    reference, "--output_dir", ours), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = np.asarray(nib.load(reference + f".{TRAINED}.out.nii.gz").dataobj)
    mine = np.asarray(nib.load(next(os.path.join(ours, f) for f in os.listdir(ours))).dataobj)
    assert set(np.unique(mine)) == {0, 1}  # both classes predicted: agreeing is not trivial
    assert (theirs == mine).mean() > 0.99


def four_channel_volume(case_dir: str, out: str) -> str:
    """A BraTS case as one 4-D NIfTI (x, y, z, modality), as MSD Task01 ships it and MONAI Label uploads it."""
    files = sorted(f for f in os.listdir(case_dir) if not f.endswith("_seg.nii.gz"))
    from hybridmim_components.phantoms import BRATS_MODALITIES

    ordered = [next(f for f in files if f.endswith(f"_{m}.nii.gz")) for m in BRATS_MODALITIES]
    volumes = [nib.load(os.path.join(case_dir, f)) for f in ordered]
    data = np.stack([np.asarray(v.dataobj) for v in volumes], axis=-1)
    nib.save(nib.Nifti1Image(data, volumes[0].affine), out)
    return out


def test_infer_brats_on_an_uploaded_four_channel_volume(server, tiny_task_phantoms, tmp_path):
    root = tiny_task_phantoms["brats_tumor_segmentation"]
    case = sorted(d for d in os.listdir(root) if d.startswith("BraTS20_Training_"))[0]
    upload = four_channel_volume(os.path.join(root, case), str(tmp_path / "brats_case.nii.gz"))
    response = server.infer("brats_tumor_segmentation", upload=upload)
    check_label(server, response, upload, "brats_tumor_segmentation")


def test_bad_input_gets_a_clear_error_and_the_server_lives(server):
    """MONAI Label 0.8.5 answers every failed task with a bare HTTP 500; the reason goes to the server's log."""
    image_id = first_image_id(server)
    # a one-channel CT to the four-channel BraTS bundle
    response = server.infer("brats_tumor_segmentation", image=image_id)
    assert response.status_code == 500
    assert server.log_has(f"{image_id}.nii.gz has 1 channel(s), but the network takes 4 channels (T1, T1Gd, T2, FLAIR)")
    # an image the datastore does not have
    response = server.infer("msd_spleen_segmentation", image="no_such_image")
    assert response.status_code == 500
    assert server.log_has("'image': no file at ''")
    assert server.alive() and server.get("/info/").status_code == 200


def test_train_writes_a_new_model(server):
    model = os.path.join(server.app, "model", TRAINED, "models", "model.pt")
    before = hashlib.sha256(open(model, "rb").read()).hexdigest()
    # fewer epochs than the bundle's validation interval: the model must still be written at the end
    status = server.train(TRAINED, {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False})
    assert status.get("status") == "DONE", (status, server.log()[-5000:])
    after = hashlib.sha256(open(model, "rb").read()).hexdigest()
    assert after != before, server.log()[-5000:]
    torch.load(model, weights_only=True)  # the weights, loadable as MONAI Label's infer task loads them
    response = server.infer(TRAINED, image=first_image_id(server))
    assert response.status_code == 200, response.text[-3000:]


SCHEMA_CHECK = r"""
import glob, json, sys, jsonschema
from monai.bundle import verify_metadata
from hybridmim_components.layout import validate_datalist
print("jsonschema", jsonschema.__version__)
schema = sys.argv[1]
for meta in sorted(glob.glob(sys.argv[2] + "/bundles/*/configs/metadata.json")):
    verify_metadata(meta_file=meta, filepath=schema)  # raises on a failed check
validate_datalist({"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}]}, "good.json")
try:
    validate_datalist({"training": [{"image": 3}]}, "bad.json")
except ValueError as e:
    print("REJECTED", e)
"""


def test_schemas_work_with_the_jsonschema_monai_label_installs(tmp_path):
    """MONAI Label pins jsonschema 3.2, where a relative ``$id`` broke every ``$ref`` of our schemas."""
    python = os.path.join(monailabel_venv(), "bin", "python")
    schema = os.path.join(REPO, "hybridmim_components", "schemas", "bundle_metadata_schema.json")
    proc = subprocess.run([python, "-c", SCHEMA_CHECK, schema, REPO], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jsonschema 3." in proc.stdout
    assert "REJECTED bad.json is not a valid datalist at training/0" in proc.stdout, proc.stdout


def test_a_bundle_from_its_zip_answers_infer_where_this_project_is_not_installed(tiny_task_phantoms, tmp_path):
    """The server runs without this project (its editable install hidden from the virtual environment); the
    spleen bundle, unpacked from its zip, brings its code in scripts/."""
    import zipfile

    from hybridmim_studies.packaging import package

    venv_dir = monailabel_venv()
    python = os.path.join(venv_dir, "bin", "python")
    probe = [python, "-c", "import hybridmim_components"]
    hidden = dict(os.environ, **{HIDE_EDITABLE_ENV: "1"})
    assert subprocess.run(probe, capture_output=True, cwd=tmp_path).returncode == 0  # the project, as a rule
    gone = subprocess.run(probe, capture_output=True, text=True, cwd=tmp_path, env=hidden)
    assert "No module named 'hybridmim_components'" in gone.stderr  # and not in the server's environment

    subprocess.run(["monailabel", "apps", "--name", "monaibundle", "--download", "--output", str(tmp_path)],
                   check=True, env=venv_env(venv_dir), capture_output=True)
    app = str(tmp_path / "monaibundle")
    archive = package(os.path.join(REPO, "bundles", TRAINED), output_dir=str(tmp_path / "dist"))
    zipfile.ZipFile(archive).extractall(tmp_path / "unpacked")
    root = install_bundle(TRAINED, os.path.join(app, "model"), source=str(tmp_path / "unpacked" / TRAINED))
    assert os.path.isfile(os.path.join(root, "scripts", "hybridmim_components", "engines.py"))
    studies = tmp_path / "studies"
    studies.mkdir()
    from hybridmim_components.data import load_datalist

    image = load_datalist(tiny_task_phantoms[TRAINED])[0]["image"]
    shutil.copy(image, studies / os.path.basename(image))
    conf = {"models": TRAINED, "zoo_source": "github", "preload": "false", "sam2": "false"}
    with MonaiLabelServer(venv_dir, app, str(studies), conf, str(tmp_path / "server.log"),
                          env={HIDE_EDITABLE_ENV: "1"}) as running:
        assert TRAINED in running.get("/info/").json()["models"]
        image_id = first_image_id(running)
        check_label(running, running.infer(TRAINED, image=image_id), str(studies / f"{image_id}.nii.gz"), TRAINED)
