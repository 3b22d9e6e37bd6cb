"""HybridMIM and masked image modeling components for MONAI bundles.

Modules: ``transforms`` (two-level masking), ``networks``, ``losses``, ``engines``, ``pretrained`` (loading
pre-trained weights), ``data`` (datalists and splits), ``phantoms`` (embedded synthetic data), ``input_checks``
(clear errors for bad input, one item at a time), ``dataset_check`` (every problem of a dataset at once),
``evaluation`` (metrics as the field reports them), ``plan`` (what pre-trained weights need from fine-tuning),
``abdomen`` (the realistic CT phantom), ``visualize`` (TensorBoard pictures), ``resume`` (exact resume),
``preprocess`` (a large corpus, preprocessed once, in parts), ``manifest`` (reading it in constant memory) and
``probe`` (a segmentation probe of the encoder during pre-training). Bundle
configs reference them by full dotted path, e.g. ``hybridmim_components.transforms.TwoLevelMaskd``.
"""

import os

from hybridmim_components import (
    abdomen, data, dataset_check, engines, evaluation, input_checks, losses, manifest, networks, phantoms, plan,
    preprocess, pretrained, probe, resume, transforms, visualize,
)

__version__ = "0.1.0"

# JSON schema of bundle metadata, shipped so that `verify_metadata --filepath` works offline
METADATA_SCHEMA = os.path.join(os.path.dirname(__file__), "schemas", "bundle_metadata_schema.json")
