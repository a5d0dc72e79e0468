"""adapt.transfer.depth: median-scaled metrics by hand, zero-shot depth and fine-tuning in both data conventions."""

import math

import pytest
import torch

from adapt.transfer import (
    evaluate_depth_zero_shot,
    finetune_depth,
    load_backbone,
    load_depth_head,
    median_scaled_depth_metrics,
)


def test_median_scaled_depth_metrics():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(16, 16, generator=g) * 4 + 0.5
    target[:3] = 0.0  # invalid
    prediction = torch.where(target > 0, target / 3.7, 123.0)
    metrics = median_scaled_depth_metrics(prediction, target)
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["delta1"] == 1.0
    # By hand: medians 2 (torch's lower median of 1, 2, 4, 8) and 1, so the prediction becomes 2 everywhere:
    # abs_rel = (1/1 + 0/2 + 2/4 + 6/8) / 4; only the pixel with ratio 1 is within 1.25.
    metrics = median_scaled_depth_metrics(torch.ones(1, 4), torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
    assert metrics == pytest.approx({"abs_rel": (1 + 0 + 0.5 + 0.75) / 4, "delta1": 0.25})
    assert math.isnan(median_scaled_depth_metrics(torch.ones(2, 2), torch.zeros(2, 2))["abs_rel"])


def test_depth_zero_shot_and_finetune(sets, pretrained):
    path, _ = pretrained
    backbone, head = load_backbone(path), load_depth_head(path)
    pairs = sets.depth_pairs()
    before = evaluate_depth_zero_shot(backbone, head, pairs, size=64)
    assert set(before) == {"abs_rel", "delta1"} and all(math.isfinite(v) for v in before.values())
    tuned_backbone, tuned_head = finetune_depth(backbone, head, pairs, steps=2, batch_size=2, size=64)
    assert tuned_head.scale_invariant_weight == 1.0 and head.scale_invariant_weight == 0.5
    assert not torch.equal(tuned_backbone.network.conv1.weight, backbone.network.conv1.weight)
    after = evaluate_depth_zero_shot(tuned_backbone, tuned_head, pairs, size=64)
    assert all(math.isfinite(v) for v in after.values())
    # The RGB-D folder convention: (image (3, H, W) in [0, 1], depth (1, H, W)) items.
    folder = [(torch.as_tensor(p["image"]).permute(2, 0, 1).float() / 255, torch.as_tensor(p["relative_depth"])[None])
              for p in pairs]
    assert evaluate_depth_zero_shot(backbone, head, folder, size=64) == pytest.approx(before)
    finetune_depth(backbone, head, folder, steps=1, batch_size=2, size=64)

