"""Self-supervised objectives: each an ``nn.Module`` that takes a batch and the shared backbone and returns named
losses and metrics. Four families (Ren & Lee 2018; the taxonomy of Jing & Tian 2020): synthetic (depth, normals,
contours on rendered frames), predictive (rotation, jigsaw, relative patch position), generative (colorization,
inpainting) and contrastive (SimCLR, MoCo v2) on real images."""

from pretext.augment import ContrastiveAugment
from pretext.contrastive import MoCoV2, ProjectionHead, SimCLR, gather_with_grad, nt_xent_loss
from pretext.generative import Colorization, Inpainting, lab_to_rgb, rgb_to_lab
from pretext.predictive import (
    Jigsaw,
    RelativePatchPosition,
    RotationPrediction,
    make_jigsaw,
    maximal_hamming_permutations,
    rotate_batch,
    sample_patch_pairs,
)
from pretext.synthetic import (
    ContourHead,
    Decoder,
    DepthHead,
    NormalHead,
    SyntheticObjective,
    balanced_contour_loss,
    contour_match_counts,
    contour_prf,
    contour_prf_from_counts,
    cosine_normal_loss,
    depth_metrics,
    normal_metrics,
    scale_invariant_log_loss,
)

__all__ = [
    "Colorization",
    "ContourHead",
    "ContrastiveAugment",
    "Decoder",
    "DepthHead",
    "Inpainting",
    "Jigsaw",
    "MoCoV2",
    "NormalHead",
    "ProjectionHead",
    "RelativePatchPosition",
    "RotationPrediction",
    "SimCLR",
    "SyntheticObjective",
    "balanced_contour_loss",
    "contour_match_counts",
    "contour_prf",
    "contour_prf_from_counts",
    "cosine_normal_loss",
    "depth_metrics",
    "gather_with_grad",
    "lab_to_rgb",
    "make_jigsaw",
    "maximal_hamming_permutations",
    "normal_metrics",
    "nt_xent_loss",
    "rgb_to_lab",
    "rotate_batch",
    "sample_patch_pairs",
    "scale_invariant_log_loss",
]
