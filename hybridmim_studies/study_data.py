"""The studies' data when the user gives none: phantom sets of disjoint subjects, written once per study folder.

Each set starts at its own subject seed (``PHANTOM_SEEDS``), so that no subject is in two sets; the fine-tuning
bundles' embedded phantoms are subjects 0-11 and the segmentation probe's 900-903.
"""

from __future__ import annotations

import os

from hybridmim_components.phantoms import write_brain_phantoms, write_ct_phantoms

PHANTOM_SEEDS = {"pool": 0, "development": 2000, "test": 3000, "corpus": 10000}
# the phantom task of each fine-tuning bundle that has CT phantoms
PHANTOM_TASKS = {"msd_spleen_segmentation": "spleen", "msd_liver_segmentation": "liver",
                 "btcv_multiorgan_segmentation": "btcv"}


def phantom_set(folder: str, name: str, count: int, bundle: str = "", shape=None) -> str:
    """``folder`` holding ``count`` phantoms of the set ``name`` (``PHANTOM_SEEDS``) for ``bundle``'s task: 4-channel
    brain MRI for BraTS; CT otherwise, the task's organs labelled, or, for the corpus, every organ (unlabelled use).
    Written only when ``folder`` has no ``dataset.json`` yet."""
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        shape = {} if shape is None else {"shape": shape}
        if bundle.startswith("brats"):
            write_brain_phantoms(folder, num_subjects=count, seed=PHANTOM_SEEDS[name], **shape)
        else:
            task = "organs" if name == "corpus" else PHANTOM_TASKS[bundle]
            write_ct_phantoms(folder, num_subjects=count, seed=PHANTOM_SEEDS[name], task=task, **shape)
    return folder


def is_preprocessed(corpus: str | None) -> bool:
    """Whether ``corpus`` is a corpus that ``tools/preprocess.py`` wrote (a folder holding ``manifest/``)."""
    return bool(corpus) and os.path.isdir(os.path.join(corpus, "manifest"))
