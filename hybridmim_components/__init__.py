"""HybridMIM and masked image modeling components for MONAI bundles.

Modules: ``geometry``, ``batch_keys``, ``encoders``, ``layout``, ``loading``, ``abdomen``, ``evaluation``,
``input_checks``, ``resume``, ``checkpoints``, ``probe``, ``distributed``, ``finetune_transforms``, ``transforms``,
``networks``, ``baseline_networks``, ``dataset_check``, ``phantoms``, ``plan``, ``manifest``, ``losses``, ``engines``,
``data``, ``pretrained``, ``preprocess``, ``visualize``; what each is for, and the layers their imports keep to, in
``docs/architecture.md``. Bundle configs reference them by full dotted path, e.g. ``hybridmim_components.transforms.TwoLevelMaskd``.
"""

import os

# the one place of the version: setup.cfg reads it, the plan records it, a bundle zip's vendored copy carries it
__version__ = "0.1.0"

from hybridmim_components import (  # noqa: E402
    abdomen, baseline_networks, batch_keys, checkpoints, data, dataset_check, distributed, encoders, engines, evaluation,
    finetune_transforms, geometry, input_checks, layout, loading, losses, manifest, networks, phantoms, plan, preprocess,
    pretrained, probe, resume, transforms, visualize,
)

# JSON schema of bundle metadata, shipped so that `verify_metadata --filepath` works offline
METADATA_SCHEMA = os.path.join(os.path.dirname(__file__), "schemas", "bundle_metadata_schema.json")
