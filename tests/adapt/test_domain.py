"""Adversarial domain adaptation: gradient reversal, the DANN schedule, FeatureGAN's losses, gradients and history
pool against values recomputed here, DANN's reversed gradient, and a small adversarial game that closes a gap."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapt.domain import DANN, FeatureGAN, PatchDiscriminator, dann_coefficient, grad_reverse
from adapt.gap import mmd2
from synth.backbone import Backbone


def randn(*shape, seed=0, requires_grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def feature_batches(synthetic, real, seed=7, **extra):
    """Joint batches as the engine builds them, with precomputed features at one stage."""
    return {"synthetic": {"features": synthetic, "seed": torch.tensor([seed, seed + 1]), **extra},
            "real": {"features": real, "seed": torch.tensor([seed + 2]), **extra}}


def bce(logits, target):
    """Binary cross-entropy with logits, written out: mean of -t log s(z) - (1 - t) log(1 - s(z))."""
    return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()


# --- gradient reversal and schedule ------------------------------------------------------------------------------


def test_grad_reverse_is_identity_forward_and_negates_scaled_gradient():
    x = randn(5, 3, requires_grad=True)
    weights = randn(5, 3, seed=1)

    def function(value):
        return (value.square() * weights).sum() + value.sin().sum()

    (plain,) = torch.autograd.grad(function(x), x)
    for coeff in (1.0, 0.3, 0.0):
        assert torch.equal(grad_reverse(x, coeff), x)
        (reversed_grad,) = torch.autograd.grad(function(grad_reverse(x, coeff)), x)
        assert torch.equal(reversed_grad, plain * -coeff)


def test_dann_coefficient_follows_the_ramp():
    assert dann_coefficient(0, 100) == 0.0
    values = [dann_coefficient(step, 100, gamma=10.0, max_coeff=0.5) for step in range(0, 101, 5)]
    assert all(a < b for a, b in itertools.pairwise(values))
    for step in (1, 37, 100):
        p = step / 100
        assert dann_coefficient(step, 100, gamma=10.0, max_coeff=0.5) == pytest.approx(
            0.5 * (2 / (1 + math.exp(-10 * p)) - 1), rel=1e-12)
    assert dann_coefficient(100, 100) == pytest.approx(1.0, abs=1e-4)  # tanh(5) = 0.99991
    assert dann_coefficient(500, 100) == dann_coefficient(100, 100)  # progress is clipped at 1
    with pytest.raises(ValueError, match="total_steps"):
        dann_coefficient(0, 0)


# --- FeatureGAN: losses -------------------------------------------------------------------------------------------


def test_patch_discriminator_matches_its_layers_in_sequence():
    discriminator = PatchDiscriminator(16, channels=8)
    reference = nn.Sequential(discriminator.conv1, nn.LeakyReLU(0.2), discriminator.conv2, nn.LeakyReLU(0.2),
                              discriminator.score)
    for size in (1, 5):
        features = randn(3, 16, size, size + 2)
        torch.testing.assert_close(discriminator(features), reference(features))
        torch.testing.assert_close(discriminator(features, frozen=True), reference(features))


def test_feature_gan_losses_match_binary_cross_entropy():
    gan = FeatureGAN(stage="layer2", channels=8, history_size=0, label_smoothing=0.1)
    synthetic = {"layer2": randn(2, 128, 4, 4, seed=1)}
    real = {"layer2": randn(3, 128, 2, 3, seed=2) + 0.5}  # another image size: D is fully convolutional
    batches = feature_batches(synthetic, real)
    with torch.no_grad():
        fake_logits = gan.discriminator(synthetic["layer2"])
        real_logits = gan.discriminator(real["layer2"])

    out = gan(batches, backbone=None)
    assert out["loss"].dtype == torch.float32 and out["loss"].dim() == 0
    torch.testing.assert_close(out["loss"], bce(fake_logits, torch.ones_like(fake_logits)))
    expected_acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    torch.testing.assert_close(out["disc_acc"], expected_acc)

    disc = gan.discriminator_loss(batches, backbone=None)
    expected = 0.5 * (bce(real_logits, torch.full_like(real_logits, 0.9)) + bce(fake_logits, torch.zeros_like(
        fake_logits)))
    torch.testing.assert_close(disc["loss"], expected)
    torch.testing.assert_close(disc["acc"], expected_acc)
    torch.testing.assert_close(disc["real_score"], real_logits.sigmoid().mean())
    torch.testing.assert_close(disc["fake_score"], fake_logits.sigmoid().mean())

    quiet = gan(feature_batches(synthetic, real, with_metrics=False), backbone=None)
    assert set(quiet) == {"loss"}


def test_feature_gan_zero_scores_give_log_two():
    gan = FeatureGAN(stage="layer3", channels=8, history_size=0, label_smoothing=0.2)
    nn.init.zeros_(gan.discriminator.score.weight)
    nn.init.zeros_(gan.discriminator.score.bias)
    batches = feature_batches({"layer3": randn(2, 256, 2, 2)}, {"layer3": randn(2, 256, 2, 2, seed=3)})
    assert gan(batches, None)["loss"].item() == pytest.approx(math.log(2), rel=1e-6)
    disc = gan.discriminator_loss(batches, None)
    # A logit of 0 costs log 2 whatever the (smoothed) target; it is on neither side of the decision.
    assert disc["loss"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert disc["acc"].item() == 0.0
    assert disc["real_score"].item() == disc["fake_score"].item() == 0.5


# --- FeatureGAN: gradients ---------------------------------------------------------------------------------------


def test_encoder_loss_reaches_synthetic_features_but_not_the_discriminator():
    gan = FeatureGAN(stage="layer4", channels=8, history_size=0)
    synthetic = randn(2, 512, 2, 2, requires_grad=True)
    real = randn(2, 512, 2, 2, seed=1, requires_grad=True)
    gan(feature_batches({"layer4": synthetic}, {"layer4": real}), None)["loss"].backward()
    assert synthetic.grad is not None and synthetic.grad.abs().sum() > 0
    assert real.grad is None  # only rendered features are asked to look real; the metric is under no_grad
    assert all(p.grad is None for p in gan.discriminator_parameters())


def test_discriminator_loss_trains_the_discriminator_only():
    backbone = Backbone("resnet18")
    gan = FeatureGAN(stage="layer3", channels=8, history_size=4)
    images = {d: randn(2, 3, 32, 32, seed=i) for i, d in enumerate(("synthetic", "real"))}
    # As in the engine: features from the backbone's graph, then the discriminator's loss on them.
    batches = {d: {"image": image, "features": backbone(image), "seed": torch.tensor([1, 2])}
               for d, image in images.items()}
    gan.discriminator_loss(batches, backbone)["loss"].backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.discriminator_parameters())


# --- FeatureGAN: history pool -----------------------------------------------------------------------------------


def constant_maps(values):
    """(B, 64, 1, 1) maps, each filled with one value, so a map is recognised by its first entry."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 64, 1, 1).contiguous()


def test_history_pool_fills_then_swaps_past_inputs():
    gan = FeatureGAN(stage="layer1", channels=8, history_size=4)
    first, second = constant_maps([1, 2]), constant_maps([3, 4])
    torch.testing.assert_close(gan.mix_history(first, torch.Generator().manual_seed(0)), first)
    assert int(gan.history_count) == 2
    torch.testing.assert_close(gan.mix_history(second, torch.Generator().manual_seed(1)), second)
    assert int(gan.history_count) == 4
    torch.testing.assert_close(gan.history, torch.cat([first, second]))

    swapped = kept = 0
    for call in range(6):
        current = constant_maps([10 * (call + 1), 10 * (call + 1) + 1])
        before = gan.history.clone()
        mixed = gan.mix_history(current, torch.Generator().manual_seed(100 + call))
        after = gan.history
        for i in range(len(current)):
            if torch.equal(mixed[i], current[i]):
                kept += 1
            else:
                swapped += 1
                # What the discriminator sees instead was in the pool (or went in earlier in this batch).
                assert any(torch.equal(mixed[i], entry) for entry in [*before, *current[:i]])
        # Every pool entry is a past or current input; entries that changed were replaced by current maps.
        for old, new in zip(before, after, strict=True):
            assert torch.equal(old, new) or any(torch.equal(new, c) for c in current)
        assert int(gan.history_count) == 4
    assert swapped > 0 and kept > 0

    # The same seed draws the same swaps.
    twin = FeatureGAN(stage="layer1", channels=8, history_size=4)
    twin.load_state_dict(gan.state_dict())
    torch.testing.assert_close(twin.history, gan.history)
    probe = constant_maps([99, 98])
    torch.testing.assert_close(twin.mix_history(probe, torch.Generator().manual_seed(5)),
                               gan.mix_history(probe, torch.Generator().manual_seed(5)))
    torch.testing.assert_close(twin.history, gan.history)


def reference_mix(pool: list, count: int, features, coins, slots):
    """The pool rule example by example, as Shrivastava et al. state it: fill in order, then swap with p = 1/2."""
    mixed = list(features)
    for i, feature in enumerate(features):
        if count < len(pool):
            pool[count] = feature
            count += 1
        elif coins[i] < 0.5:
            mixed[i], pool[slots[i]] = pool[slots[i]], feature
    return mixed, count


@pytest.mark.parametrize(("size", "batches"), [(4, [3, 3, 8, 8]), (3, [5, 16]), (16, [6, 6, 6, 16])])
def test_history_pool_matches_the_example_by_example_rule(size, batches):
    # Batches that straddle the fill and the swaps, and batches larger than the pool (one slot drawn twice).
    gan = FeatureGAN(stage="layer1", channels=8, history_size=size)
    pool, count, value = [0.0] * size, 0, 1.0
    for call, batch in enumerate(batches):
        values = [value + i for i in range(batch)]
        value += batch
        generator = torch.Generator().manual_seed(call)
        coins = torch.rand(batch, generator=generator).tolist()
        slots = torch.randint(size, (batch,), generator=generator).tolist()
        expected, count = reference_mix(pool, count, values, coins, slots)
        mixed = gan.mix_history(constant_maps(values), torch.Generator().manual_seed(call))
        assert mixed[:, 0, 0, 0].tolist() == expected
        assert gan.history[:, 0, 0, 0].tolist() == pool
        assert int(gan.history_count) == count
    # Resuming from a checkpoint continues the same stream.
    twin = FeatureGAN(stage="layer1", channels=8, history_size=size)
    twin.load_state_dict(gan.state_dict())
    probe = constant_maps([-1.0, -2.0, -3.0])
    torch.testing.assert_close(twin.mix_history(probe, torch.Generator().manual_seed(9)),
                               gan.mix_history(probe, torch.Generator().manual_seed(9)))
    torch.testing.assert_close(twin.history, gan.history)
    assert int(twin.history_count) == int(gan.history_count)


def test_discriminator_loss_feeds_the_history_pool():
    gan = FeatureGAN(stage="layer1", channels=8, history_size=3)
    maps = constant_maps([1, 2])
    gan.discriminator_loss(feature_batches({"layer1": maps}, {"layer1": constant_maps([0])}), None)
    assert int(gan.history_count) == 2
    torch.testing.assert_close(gan.history[:2], maps)
    gan.discriminator_loss(feature_batches({"layer1": constant_maps([3, 4])}, {"layer1": constant_maps([0])}), None)
    assert int(gan.history_count) == 3
    assert "history" not in FeatureGAN(history_size=0).state_dict()


def test_history_pool_rejects_a_new_feature_size():
    gan = FeatureGAN(stage="layer2", channels=8, history_size=4)
    real = {"layer2": randn(2, 128, 2, 2, seed=1)}
    gan.discriminator_loss(feature_batches({"layer2": randn(2, 128, 4, 4)}, real), None)
    with pytest.raises(ValueError, match="one synthetic image size"):
        gan.discriminator_loss(feature_batches({"layer2": randn(2, 128, 2, 2)}, real), None)
    # Without a pool, any sizes go.
    free = FeatureGAN(stage="layer2", channels=8, history_size=0)
    for size in (4, 2):
        free.discriminator_loss(feature_batches({"layer2": randn(2, 128, size, size)}, real), None)


# --- FeatureGAN: stages and inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["layer2", "layer3", "layer4"])
def test_feature_gan_stage_selection(stage):
    backbone = Backbone("resnet18")
    gan = FeatureGAN(stage=stage, channels=8, history_size=2)
    assert gan.discriminator.conv1.in_channels == backbone.stage_channels[stage]
    batches = {d: {"image": randn(2, 3, 64, 64, seed=i), "seed": torch.tensor([i])}
               for i, d in enumerate(("synthetic", "real"))}
    with torch.no_grad():
        for batch in batches.values():
            batch["features"] = backbone(batch["image"])
    assert torch.isfinite(gan(batches, backbone)["loss"])
    assert torch.isfinite(gan.discriminator_loss(batches, backbone)["loss"])
    assert gan.history.shape[1:] == batches["synthetic"]["features"][stage].shape[1:]
    # Without precomputed features the objective runs the backbone itself, with the same result.
    plain = {d: {k: v for k, v in b.items() if k != "features"} for d, b in batches.items()}
    torch.testing.assert_close(gan(plain, backbone)["loss"], gan(batches, backbone)["loss"])


def test_feature_gan_inputs_are_checked():
    assert FeatureGAN().stage == "layer4"
    assert FeatureGAN(backbone_arch="vgg16_bn").stage == "block5"
    with pytest.raises(ValueError, match="layer9"):
        FeatureGAN(stage="layer9")
    gan = FeatureGAN(stage="layer2", channels=8)
    with pytest.raises(ValueError, match="resnet18"):
        gan(feature_batches({"layer2": randn(2, 64, 4, 4)}, {"layer2": randn(2, 64, 4, 4)}), None)
    with pytest.raises(KeyError, match="real"):
        gan({"synthetic": {"features": {"layer2": randn(2, 128, 4, 4)}}}, None)
    with pytest.raises(KeyError, match="layer2"):
        gan(feature_batches({"layer3": randn(2, 256, 2, 2)}, {"layer3": randn(2, 256, 2, 2)}), None)


# --- DANN -----------------------------------------------------------------------------------------------------------


def test_dann_reverses_the_domain_gradient_into_the_features():
    dann = DANN(stage="layer3", hidden=16, gamma=10.0, max_coeff=0.8)
    synthetic = randn(3, 256, 2, 2, requires_grad=True)
    real = randn(2, 256, 3, 3, seed=1, requires_grad=True)
    batches = feature_batches({"layer3": synthetic}, {"layer3": real}, step=30, total_steps=100)
    out = dann(batches, None)
    coeff = dann_coefficient(30, 100, gamma=10.0, max_coeff=0.8)
    assert out["coeff"].item() == pytest.approx(coeff)
    grads = torch.autograd.grad(out["loss"], [synthetic, real, *dann.parameters()])

    # The same loss without reversal: pooled features, classifier, binary cross-entropy averaged per domain.
    synthetic_logits = dann.classifier(synthetic.mean(dim=(2, 3))).squeeze(1)
    real_logits = dann.classifier(real.mean(dim=(2, 3))).squeeze(1)
    plain_loss = 0.5 * (bce(synthetic_logits, torch.zeros(3)) + bce(real_logits, torch.ones(2)))
    torch.testing.assert_close(out["loss"], plain_loss)
    plain = torch.autograd.grad(plain_loss, [synthetic, real, *dann.parameters()])
    torch.testing.assert_close(grads[0], -coeff * plain[0])
    torch.testing.assert_close(grads[1], -coeff * plain[1])
    assert plain[0].abs().sum() > 0
    for reversed_grad, plain_grad in zip(grads[2:], plain[2:], strict=True):  # the classifier learns normally
        torch.testing.assert_close(reversed_grad, plain_grad)

    expected_acc = 0.5 * ((real_logits > 0).float().mean() + (synthetic_logits < 0).float().mean())
    torch.testing.assert_close(out["domain_acc"], expected_acc)


def test_dann_needs_the_step():
    dann = DANN(stage="layer4", hidden=8)
    batches = feature_batches({"layer4": randn(2, 512, 1, 1)}, {"layer4": randn(2, 512, 1, 1)})
    with pytest.raises(KeyError, match="step"):
        dann(batches, None)
    out = dann(feature_batches({"layer4": randn(2, 512, 1, 1)}, {"layer4": randn(2, 512, 1, 1)}, step=0,
                               total_steps=10), None)
    assert out["coeff"].item() == 0.0 and out["loss"].dtype == torch.float32


# --- a real adversarial game at tiny scale ---------------------------------------------------------------------


def scaled_rbf_mmd(x, y):
    """Gaussian MMD² after dividing both sets by one scalar, so shrinking every feature does not count as closing
    the gap."""
    scale = torch.cat([x, y]).var(dim=0).mean().sqrt()
    return mmd2(x / scale, y / scale, kernel="rbf")


def test_feature_gan_game_pulls_two_shifted_gaussians_together():
    """A shared linear encoder of two Gaussians with orthogonal means; the encoder (Adam on the adversarial loss) and
    the discriminator (Adam on its loss) alternate, with a history pool, as the engine does. The encoder can only
    close the gap by mapping the mean difference to nothing, which it learns from the discriminator."""
    generator = torch.Generator().manual_seed(0)
    synthetic_mean, real_mean = torch.tensor([3.0, 0, 0, 0]), torch.tensor([0, 3.0, 0, 0])

    def sample(n, gen):
        return torch.randn(n, 4, generator=gen) + synthetic_mean, torch.randn(n, 4, generator=gen) + real_mean

    encoder = nn.Linear(4, 64)
    gan = FeatureGAN(stage="layer1", channels=32, history_size=8)
    with torch.no_grad():
        for p in [*encoder.parameters(), *gan.discriminator_parameters()]:
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.dim() == 2 and p.shape[1] == 4 else 0.05))
    encoder_optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2, betas=(0.5, 0.999))
    discriminator_optimizer = torch.optim.Adam(gan.discriminator_parameters(), lr=5e-3, betas=(0.5, 0.999))

    def gap():
        synthetic, real = sample(200, torch.Generator().manual_seed(123))
        with torch.no_grad():
            return scaled_rbf_mmd(encoder(synthetic), encoder(real))

    before = gap()
    for step in range(400):
        synthetic, real = sample(32, generator)
        batches = {"synthetic": {"features": {"layer1": encoder(synthetic)[..., None, None]},
                                 "seed": torch.tensor([step]), "with_metrics": False},
                   "real": {"features": {"layer1": encoder(real)[..., None, None]}}}
        encoder_optimizer.zero_grad()
        gan(batches, None)["loss"].backward()
        encoder_optimizer.step()
        discriminator_optimizer.zero_grad()
        gan.discriminator_loss(batches, None)["loss"].backward()
        discriminator_optimizer.step()
    after = gap()
    assert before > 0.4
    assert after < 0.3 * before, (before, after)
