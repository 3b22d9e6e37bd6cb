"""The studies that run above the bundles: each module a concept, each importing only those listed before it.

- ``runs``: a bundle run as a study sees it (configs, workflow, resume, CPU time, scoring with ``evaluate.json``);
- ``reports``: Markdown tables, means over cases, the paired bootstrap, figures;
- ``curves``: learning curves of fine-tuning runs, and the convergence read from them;
- ``study_data``: phantom sets of disjoint subjects, when the user gives no data;
- ``label_efficiency``: does pre-training help with few labels? (``tools/label_efficiency.py``);
- ``comparison``: the papers' tables, methods × tasks (``tools/compare_methods.py``).

Not vendored into bundle zips (``tools/package_bundle.py`` copies ``hybridmim_components`` only): the bundles
never import it.
"""
