"""HybridMIM and masked image modeling components for MONAI bundles.

Modules, in layers from the bottom up. A module imports only modules of lower layers, never one of its own
layer or above (``tests/test_imports.py`` reads the imports and checks this list):

1. ``geometry`` (the patch and region geometry of masking), ``layout`` (which layout a dataset has, and its
   items), ``loading`` (what a loading chain does to a volume, as JSON), ``abdomen`` (the realistic CT phantom),
   ``evaluation`` (metrics as the field reports them), ``input_checks`` (clear errors for bad input, one item at a
   time), ``resume`` (exact resume), ``checkpoints`` (checkpoints on disk), ``probe`` (a segmentation probe of
   the encoder during pre-training);
2. ``transforms`` (two-level masking), ``networks``, ``dataset_check`` (every problem of a dataset at once),
   ``phantoms`` (embedded synthetic data), ``plan`` (what pre-trained weights need from fine-tuning),
   ``manifest`` (reading a preprocessed corpus in constant memory);
3. ``losses``, ``engines``, ``data`` (datalists and splits), ``pretrained`` (loading pre-trained weights);
4. ``preprocess`` (a large corpus, preprocessed once, in parts), ``visualize`` (TensorBoard pictures).

Bundle configs reference them by full dotted path, e.g. ``hybridmim_components.transforms.TwoLevelMaskd``.
"""

import os

from hybridmim_components import (
    abdomen, checkpoints, data, dataset_check, engines, evaluation, geometry, input_checks, layout, loading, losses,
    manifest, networks, phantoms, plan, preprocess, pretrained, probe, resume, transforms, visualize,
)

__version__ = "0.1.0"

# JSON schema of bundle metadata, shipped so that `verify_metadata --filepath` works offline
METADATA_SCHEMA = os.path.join(os.path.dirname(__file__), "schemas", "bundle_metadata_schema.json")
