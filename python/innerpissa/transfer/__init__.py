"""Cross-model transfer of steering directions (``ipissa align``): a teacher's contrast directions carried to a
student by weighted orthogonal Procrustes.

* :mod:`.contrasts`: near-manifold contrast sets rendered from a manifest and a template (the tour guide).
* :mod:`.procrustes`: the weighted orthogonal alignment between two hidden spaces.
* :mod:`.align`: the pipeline (read directions in both models, align, evaluate on held-out rows).
* :mod:`.edits`: the one-time edits (a vector folded into a bias, directional ablation as hooks or in the weights).
"""

from .align import TransferConfig, align, projection_effects, steering_effects, transfer_report
from .contrasts import TOUR_GUIDE, ContrastTemplate, load_manifest
from .edits import fold_check
from .procrustes import AlignmentMap, fit_alignment, weighted_procrustes

__all__ = [
    "TOUR_GUIDE",
    "AlignmentMap",
    "ContrastTemplate",
    "TransferConfig",
    "align",
    "fit_alignment",
    "fold_check",
    "load_manifest",
    "projection_effects",
    "steering_effects",
    "transfer_report",
    "weighted_procrustes",
]
