"""Self-supervised objectives: each an ``nn.Module`` that takes a batch and the shared backbone and returns named
losses and metrics."""

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
    "ContourHead",
    "Decoder",
    "DepthHead",
    "NormalHead",
    "SyntheticObjective",
    "balanced_contour_loss",
    "contour_match_counts",
    "contour_prf",
    "contour_prf_from_counts",
    "cosine_normal_loss",
    "depth_metrics",
    "normal_metrics",
    "scale_invariant_log_loss",
]
