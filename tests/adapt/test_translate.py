"""Image-level adaptation: CycleGAN + OP-GAN networks, losses, the patch-pair sampler, the pool, the trainer."""

import math

import numpy as np
import pytest
import torch

from adapt.translate import (
    ImagePool,
    ObjectPreservingSiamese,
    PatchGANDiscriminator,
    ResnetGenerator,
    content_consistency_loss,
    cycle_consistency_loss,
    domain_classification_loss,
    gather_pairs,
    grid_patches,
    identity_loss,
    load_label_consistency,
    lsgan_loss,
    sample_patch_pairs,
    to_imagenet,
    to_unit_range,
)
from adapt.translate_eval import edge_preservation, sobel_edges
from adapt.translate_train import TranslatorTrainer, TranslatorTraining, build_translator, checkpoint_path
from synth.engine import NonFiniteLossError

SMALL = {"generator_width": 8, "generator_blocks": 1, "discriminator_width": 8, "siamese_width": 8,
         "pairs_per_image": 4}


@pytest.mark.parametrize("size", [32, 48, 64])
def test_generator_keeps_the_shape_and_range(size):
    generator = ResnetGenerator(width=8, blocks=2)
    out = generator(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3, size, size) and out.abs().max() <= 1


@pytest.mark.parametrize("height, width", [(30, 45), (17, 17), (8, 8)])
def test_generator_translates_any_size(height, width):
    out = ResnetGenerator(width=8, blocks=1).translate(torch.randn(1, 3, height, width))
    assert out.shape == (1, 3, height, width)


@pytest.mark.parametrize("size, layers, side", [(32, 3, 2), (64, 3, 6), (128, 3, 14), (16, 2, 2)])
def test_patchgan_scores_one_value_per_patch(size, layers, side):
    scores = PatchGANDiscriminator(width=8, layers=layers)(torch.randn(2, 3, size, size))
    assert scores.shape == (2, 1, side, side)


def test_patchgan_refuses_images_too_small_for_its_depth():
    with pytest.raises(ValueError, match="sides >= 32"):
        PatchGANDiscriminator(width=8, layers=3)(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("patch", [10, 16, 21])
def test_siamese_outputs(patch):
    out = ObjectPreservingSiamese(width=8)(torch.randn(5, 3, patch, patch), torch.randn(5, 3, patch, patch))
    assert out["attention_first"].shape == out["attention_second"].shape == (5, 1, patch, patch)
    assert out["logits"].shape == (5, 3)
    assert out["attention_first"].min() > 0 and out["attention_first"].max() < 1


def test_range_conversions_are_inverse():
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.allclose(to_unit_range(to_imagenet(x)), x, atol=1e-6)


# ------------------------------------------------------------------ losses against hand-computed values


def test_lsgan_loss_by_hand():
    scores = torch.tensor([[0.5, 2.0], [1.0, 0.0]])
    # target 1: (0.25 + 1 + 0 + 1) / 4; target 0: (0.25 + 4 + 1 + 0) / 4
    assert lsgan_loss(scores, 1.0).item() == pytest.approx(2.25 / 4)
    assert lsgan_loss(scores, 0.0).item() == pytest.approx(5.25 / 4)


def test_cycle_and_identity_losses_by_hand():
    reconstructed = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    original = torch.ones(1, 1, 2, 2)
    assert cycle_consistency_loss(reconstructed, original).item() == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert identity_loss(-reconstructed, original).item() == pytest.approx((2 + 3 + 4 + 5) / 4)


def test_content_consistency_loss_by_hand():
    a = torch.tensor([0.2, 0.8, 0.5, 0.5]).view(1, 1, 2, 2)
    b = torch.tensor([0.5, 0.5, 0.5, 1.0]).view(1, 1, 2, 2)
    assert content_consistency_loss(a, b).item() == pytest.approx((0.09 + 0.09 + 0 + 0.25) / 4)
    assert content_consistency_loss(a[:0], b[:0]).item() == 0.0


def test_domain_classification_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0])
    expected = (math.log(3) + math.log(1 + 2 * math.exp(-2))) / 2
    assert domain_classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_sobel_and_edge_preservation():
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0  # a vertical step edge between columns 3 and 4
    edges = sobel_edges(image)[0, 0]
    assert edges[:, 3:5].min() == pytest.approx(4.0) and edges[:, :3].max() == 0 and edges[:, 5:].max() == 0
    same = edge_preservation(image, 0.5 * image)  # a contrast change keeps the edges
    assert same["edge_l1"] == pytest.approx(0.0, abs=1e-5) and same["edge_corr"] == pytest.approx(1.0, abs=1e-5)
    moved = edge_preservation(image, torch.roll(image, 2, dims=-1))
    assert moved["edge_l1"] > 0.5 and moved["edge_corr"] < 0.5


# ------------------------------------------------------------------ patches and pairs


def test_grid_patches_cut_the_grid_row_major():
    image = torch.arange(2 * 1 * 9 * 9, dtype=torch.float32).view(2, 1, 9, 9)
    patches = grid_patches(image, 3)
    assert patches.shape == (2, 9, 1, 3, 3)
    for k in range(9):
        row, col = divmod(k, 3)
        assert torch.equal(patches[1, k], image[1, :, 3 * row:3 * row + 3, 3 * col:3 * col + 3])
    assert grid_patches(torch.zeros(1, 3, 32, 32)).shape == (1, 9, 3, 10, 10)


def test_patch_pairs_are_what_their_class_says():
    """Tag every patch with (image, translated?, position) through its pixel values, gather the pairs, and read the
    tags back: the classes and positions must be what the pair really is."""
    batch, grid, side = 3, 3, 2
    tags = torch.zeros(batch, 2, grid * grid)
    for b in range(batch):
        for t in range(2):
            for k in range(grid * grid):
                tags[b, t, k] = 100 * b + 10 * t + k
    def images(t):  # (B, 1, 6, 6): patch k of image b filled with its tag
        out = torch.zeros(batch, 1, grid * side, grid * side)
        for b in range(batch):
            for k in range(grid * grid):
                row, col = divmod(k, grid)
                out[b, :, row * side:(row + 1) * side, col * side:(col + 1) * side] = tags[b, t, k]
        return out
    pairs = sample_patch_pairs(batch, 50, torch.Generator().manual_seed(3), grid)
    first, second = gather_pairs(grid_patches(images(0), grid), grid_patches(images(1), grid), pairs)
    assert set(pairs.label.tolist()) == {0, 1, 2}
    for i in range(len(pairs.label)):
        f, s = int(first[i].flatten()[0]), int(second[i].flatten()[0])
        (fb, ft, fk), (sb, st, sk) = (divmod(f, 100)[0], divmod(f % 100, 10)[0], f % 10), \
                                     (divmod(s, 100)[0], divmod(s % 100, 10)[0], s % 10)
        assert fb == sb == int(pairs.image[i])
        assert (fk, sk) == (int(pairs.first_position[i]), int(pairs.second_position[i]))
        assert (ft, st) == (int(pairs.first_translated[i]), int(pairs.second_translated[i]))
        label = int(pairs.label[i])
        if label == 0:
            assert ft == st == 0 and fk != sk
        elif label == 1:
            assert ft == st == 1 and fk != sk
        else:
            assert fk == sk and {ft, st} == {0, 1}
    again = sample_patch_pairs(batch, 50, torch.Generator().manual_seed(3), grid)
    assert torch.equal(again.label, pairs.label) and torch.equal(again.first_position, pairs.first_position)


# ------------------------------------------------------------------ the pool


def test_image_pool_fills_then_mixes_and_restores():
    pool = ImagePool(3)
    generator = torch.Generator().manual_seed(0)
    first = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first, generator), first) and len(pool.images) == 3
    state, draws = pool.state_dict(), generator.get_state()
    outs = [pool.query(torch.full((4, 1, 1, 1), 10.0 + i), generator) for i in range(5)]
    values = torch.cat(outs).flatten().tolist()
    assert any(v < 10 for v in values) and any(v >= 10 for v in values), "old and new images both come back"
    restored = ImagePool(3)
    restored.load_state_dict(state)
    generator = torch.Generator()
    generator.set_state(draws)
    again = [restored.query(torch.full((4, 1, 1, 1), 10.0 + i), generator) for i in range(5)]
    assert torch.equal(torch.cat(again), torch.cat(outs))
    assert torch.equal(ImagePool(0).query(first, generator), first)


# ------------------------------------------------------------------ the translator


def _images(n=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=generator) * 2 - 1,
            torch.rand(n, 3, size, size, generator=generator) * 2 - 1)


def test_total_is_the_weighted_sum_of_the_terms():
    translator = build_translator(seed=0, **SMALL, gan_weight=0.5, cycle_weight=3.0, identity_weight=2.0,
                                  opgan_weight=0.7, content_weight=4.0, domain_weight=0.25)
    losses, fakes = translator.generator_losses(*_images(), torch.Generator().manual_seed(0))
    expected = (0.5 * (losses["gan_ab"] + losses["gan_ba"]) + 3.0 * (losses["cycle_a"] + losses["cycle_b"])
                + 2.0 * (losses["identity_a"] + losses["identity_b"])
                + 0.7 * (4.0 * (losses["content_a"] + losses["content_b"])
                         + 0.25 * (losses["domain_a"] + losses["domain_b"])))
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert fakes["fake_b"].shape == (2, 3, 32, 32)


def test_zero_weights_switch_terms_off_and_opgan_zero_is_plain_cyclegan():
    translator = build_translator(seed=0, **SMALL, opgan_weight=0.0, identity_weight=0.0)
    assert translator.siamese is None
    losses, fakes = translator.generator_losses(*_images(), torch.Generator().manual_seed(0))
    assert set(losses) == {"gan_ab", "gan_ba", "cycle_a", "cycle_b", "loss"}
    critic = translator.critic_losses(*_images(), fakes["fake_a"], fakes["fake_b"], torch.Generator().manual_seed(0))
    assert set(critic) == {"disc_a", "disc_b", "loss"}


def test_generator_step_leaves_the_critics_alone():
    translator = build_translator(seed=0, **SMALL)
    for p in translator.critics():
        p.requires_grad_(False)
    losses, _ = translator.generator_losses(*_images(), torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert all(p.grad is None for p in translator.critics())
    assert all(p.grad is not None for p in translator.generators())


def test_label_consistency_from_a_pretrain_checkpoint(tmp_path):
    from pretext.synthetic import ContourHead, DepthHead
    from synth.backbone import Backbone

    torch.manual_seed(0)
    backbone, depth, contour = Backbone("resnet18"), DepthHead(channels=8), ContourHead(channels=8)
    model = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
             **{f"objectives.depth.{k}": v for k, v in depth.state_dict().items()},
             **{f"objectives.contour.{k}": v for k, v in contour.state_dict().items()}}
    config = {"model": {"arch": "resnet18"}, "objective": {"depth": {"weight": 5.0, "channels": 8},
                                                           "contour": {"weight": 1.0, "channels": 8}}}
    torch.save({"model": model, "config": config, "backbone": {"arch": "resnet18"}, "step": 3},
               tmp_path / "last.pt")
    consistency = load_label_consistency(tmp_path / "last.pt", heads=["depth", "contour"])
    a, b = _images()
    same = consistency(a, a)
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-6)
    b.requires_grad_(True)
    different = consistency(a, b)
    different["loss"].backward()
    assert different["depth"] > 0 and different["contour"] > 0 and b.grad is not None
    assert all(p.grad is None for p in consistency.parameters())
    with pytest.raises(ValueError, match="no synthetic head 'normal'"):
        load_label_consistency(tmp_path / "last.pt", heads=["normal"])
    translator = build_translator(seed=0, **SMALL, label_weight=2.0)
    losses, _ = translator.generator_losses(a, b.detach(), torch.Generator().manual_seed(0), consistency)
    assert "label" in losses and losses["label"] > 0


# ------------------------------------------------------------------ the trainer


class _Images:
    """A map-style dataset of fixed random images keyed like synth.data's datasets."""

    def __init__(self, n, size=32, seed=0):
        self.images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, sample_seed = key
        return {"image": self.images[index], "seed": torch.tensor(sample_seed)}


def _trainer(out, steps, **settings):
    return TranslatorTrainer(build_translator(seed=0, **SMALL), _Images(5), _Images(6, seed=1),
                             TranslatorTraining(steps=steps, batch_size=2, image_every=0, checkpoint_every=2,
                                                log_every=1, **settings), out)


def test_resume_gives_the_same_weights_bit_exact(tmp_path):
    _trainer(tmp_path / "straight", 4).fit()
    _trainer(tmp_path / "resumed", 2).fit()
    assert torch.load(checkpoint_path(tmp_path / "resumed"), weights_only=True)["step"] == 2
    _trainer(tmp_path / "resumed", 4).fit()
    straight = torch.load(checkpoint_path(tmp_path / "straight"), weights_only=True)
    resumed = torch.load(checkpoint_path(tmp_path / "resumed"), weights_only=True)
    assert straight["step"] == resumed["step"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert torch.equal(straight["pools"]["a"]["images"], resumed["pools"]["a"]["images"])
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [int(line.split(",")[0].split(":")[1]) for line in log] == [1, 2, 3, 4]
    before = checkpoint_path(tmp_path / "resumed").stat().st_mtime_ns
    _trainer(tmp_path / "resumed", 4).fit()  # complete: a no-op
    assert checkpoint_path(tmp_path / "resumed").stat().st_mtime_ns == before
    assert (tmp_path / "resumed" / "pictures" / "latest.png").exists()


def test_a_non_finite_term_stops_with_its_name_and_keeps_the_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, 4)
    original = trainer.translator.generator_losses

    def poisoned(*args, **kwargs):
        losses, fakes = original(*args, **kwargs)
        if trainer.step == 2:
            losses["cycle_b"] = losses["cycle_b"] * float("nan")
            losses["loss"] = losses["loss"] + losses["cycle_b"]
        return losses, fakes

    trainer.translator.generator_losses = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite generator loss term 'cycle_b'"):
        trainer.fit()
    assert torch.load(checkpoint_path(tmp_path), weights_only=True)["step"] == 2


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    trainer = _trainer(tmp_path, 2)
    with torch.no_grad():
        next(trainer.translator.g_ab.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite weights"):
        trainer.save()
    assert not checkpoint_path(tmp_path).exists()


def test_picture_grid_has_six_rows(tmp_path):
    trainer = _trainer(tmp_path, 1)
    grid = trainer.pictures()
    assert grid.dtype == np.uint8 and grid.shape[0] >= 6 * 96


@pytest.mark.slow
def test_training_brings_translations_closer_to_real_and_keeps_the_cycle(rendered_dataset, tmp_path):
    """200 CPU steps at 32 px on the 8 rendered test frames and 24 real photos: the colour statistics of the
    translations (per-channel mean and standard deviation over all pixels) move towards the photos' while the cycle
    error stays low. Measured on the training frames and photos, as ``synth adapt-images apply`` translates them:
    colour distance 0.62 rendered -> 0.27 translated, cycle L1 0.25 (in [-1, 1] units); thresholds are looser.
    (The discriminators' own scores are no measure: D_B learns to flag exactly the translations it was shown.)"""
    from synth.data import FrameAugment, RenderedFrames
    from synth.real import RealImages

    crop = FrameAugment(size=32, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0)
    synthetic = RenderedFrames([str(rendered_dataset)], augment=crop, seed=0)
    real = RealImages(["offline"], size=32, video_every=80, max_images=24, seed=0)
    translator = build_translator(seed=0, generator_width=16, generator_blocks=3, discriminator_width=32,
                                  siamese_width=16)
    settings = TranslatorTraining(steps=200, batch_size=4, image_every=0, checkpoint_every=1000, log_every=20)
    TranslatorTrainer(translator, synthetic, real, settings, tmp_path).fit()
    translator.eval()
    eval_crop = FrameAugment(size=32, train=False)
    centre = RenderedFrames([str(rendered_dataset)], augment=eval_crop)
    rendered = to_unit_range(torch.stack([centre[i]["image"] for i in range(len(centre))]))
    held = real.subset(range(len(real)), train=False)
    photos = to_unit_range(torch.stack([held[i]["image"] for i in range(len(held))]))

    def colour_distance(images):
        stats = lambda x: torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))])  # noqa: E731
        return float((stats(images) - stats(photos)).norm())

    with torch.no_grad():
        translated = translator.g_ab(rendered)
        cycle = float((translator.g_ba(translated) - rendered).abs().mean())
    before, after = colour_distance(rendered), colour_distance(translated)
    print(f"colour distance to photos: rendered {before:.3f}, translated {after:.3f}; cycle L1 {cycle:.3f}")
    assert after < 0.7 * before, (before, after)
    assert cycle < 0.4, cycle
