"""One command per finding of the research: ``python -m ds_soo.experiments NAME --preset P --out DIR``.

Each experiment is a module here (its grid, presets and report); :mod:`ds_soo.experiments.runner`
runs grids in parallel and resumably, :mod:`ds_soo.experiments.cli` ties them together.
"""

from __future__ import annotations

from types import ModuleType

from ds_soo.experiments import batch_sweep, curvature_quality, damping, dataset_size, early_curvature

MODULES = (batch_sweep, curvature_quality, dataset_size, early_curvature, damping)
EXPERIMENTS: dict[str, ModuleType] = {m.NAME: m for m in MODULES}
