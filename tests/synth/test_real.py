"""Real image sources: decoding (images, videos, Fashion-MNIST IDX files), the offline whitelist, RealImages."""

import gzip
import itertools
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.data import StepSampler, collate_frames
from synth.real import (
    FASHION_MNIST_ROOT,
    WALLPAPER_PHOTOS,
    CorruptImageError,
    RealImages,
    fashion_mnist,
    offline_real_sources,
    read_image,
    tile_image,
    video_frames,
    wallpaper_photos,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
HAVE_FASHION = (Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").is_file()


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def textured(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    """A smooth random colour image (JPEG keeps it close)."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def denormalised(sample: dict) -> torch.Tensor:
    return sample["image"] * STD + MEAN


@pytest.fixture
def image_folder(tmp_path):
    """Six good images (png/jpg, one grey, one in a subfolder), no garbage."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        write_rgb(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", textured(i))
    assert cv2.imwrite(str(folder / "sub" / "grey.png"), textured(9)[..., 0])
    return folder


# ---------------------------------------------------------------- read_image


def test_read_image_png_exact_and_rgb_order(tmp_path):
    rgb = textured(0)
    rgb[:4, :4] = (255, 0, 0)  # red corner: catches a BGR/RGB mix-up
    out = read_image(write_rgb(tmp_path / "a.png", rgb))
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    np.testing.assert_array_equal(out, rgb)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_read_image_jpg_close(tmp_path):
    rgb = textured(1)
    out = read_image(write_rgb(tmp_path / "a.jpg", rgb))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_read_image_grey_and_alpha_give_three_channels(tmp_path):
    grey = textured(2)[..., 0]
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    out = read_image(tmp_path / "g.png")
    assert out.shape == (*grey.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    rgba = np.dstack([textured(3), np.full(grey.shape, 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated.png", "truncated.jpg"])
def test_read_image_corrupt_names_file(tmp_path, kind):
    if kind.startswith("truncated"):
        data = write_rgb(tmp_path / f"good{Path(kind).suffix}", textured(4)).read_bytes()
        data = data[:len(data) // 2]
    else:
        data = b"this is not an image" * 10 if kind == "garbage" else b""
    bad = tmp_path / f"bad_{kind}.png"
    bad.write_bytes(data)
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        read_image(bad)
    assert issubclass(CorruptImageError, ValueError)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.png"):
        read_image(tmp_path / "nothere.png")


# ---------------------------------------------------------------- video_frames

FRAME_COLOURS = [(20 * i, 240 - 20 * i, 60 + 10 * i) for i in range(10)]


@pytest.fixture
def video(tmp_path):
    """10 frames of 32x32, frame i a uniform RGB colour FRAME_COLOURS[i], MJPG in AVI."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 32))
    assert writer.isOpened()
    for colour in FRAME_COLOURS:
        writer.write(np.full((32, 32, 3), colour[::-1], np.uint8))  # BGR
    writer.release()
    return path


def test_video_frames_every_third(video):
    frames = video_frames(video, every=3)
    assert len(frames) == 4
    for frame, i in zip(frames, (0, 3, 6, 9), strict=True):
        assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
        # MJPEG loses a little; each frame must match the colour written at its index, not its neighbours'.
        np.testing.assert_allclose(frame.reshape(-1, 3).mean(0), FRAME_COLOURS[i], atol=4)
    assert len(video_frames(video, every=1)) == 10
    assert len(video_frames(video, every=3, max_frames=2)) == 2


def test_video_frames_errors(tmp_path):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        video_frames(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.avi"):
        video_frames(tmp_path / "missing.avi")


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_exactly(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    out_images, out_labels = fashion_mnist("test", root=str(tmp_path))
    np.testing.assert_array_equal(out_images, images)
    assert out_labels.dtype == np.int64
    np.testing.assert_array_equal(out_labels, labels)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)train-images-idx3-ubyte\.gz.*dataset-fashion-mnist"):
        fashion_mnist("train", root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation")
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as file:  # header claims 5 labels, holds 3
        file.write(bytes([0, 0, 8, 1]) + np.asarray([5], ">i4").tobytes() + b"\0\1\2")
    with pytest.raises(CorruptImageError, match=re.escape(str(path))):
        fashion_mnist("test", root=str(tmp_path))


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_installed():
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)  # Fashion-MNIST test is balanced


# ---------------------------------------------------------------- offline sources


def test_offline_sources_are_readable_photos():
    try:
        sources = offline_real_sources()
    except FileNotFoundError:
        pytest.skip("neither opencv-doc nor scikit-image is installed")
    assert sources and len(set(sources)) == len(sources)
    for source in sources:
        name = Path(source).name.lower()
        assert not any(word in name for word in ("logo", "suzanne", "text", "chessboard", "digits")), source
        frame = video_frames(source, max_frames=1)[0] if name.endswith(".avi") else read_image(source)
        assert frame.ndim == 3 and frame.shape[2] == 3 and min(frame.shape[:2]) >= 64, source


# ---------------------------------------------------------------- RealImages


def test_offline_keyword_builds_a_dataset():
    try:
        offline_real_sources()
    except FileNotFoundError:
        pytest.skip("neither opencv-doc nor scikit-image is installed")
    dataset = RealImages(size=32, video_every=100)  # default sources: ["offline"]
    assert len(dataset) > 0 and dataset.n_unreadable == 0
    assert dataset[0, 0]["image"].shape == (3, 32, 32)
    assert all(min(image.shape[:2]) <= 64 for image in dataset.images)  # cached at most 2 * size


def test_unreadable_file_is_counted_and_skipped(image_folder, caplog):
    bad = image_folder / "sub" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    (image_folder / "notes.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING):
        dataset = RealImages(sources=[str(image_folder)], size=16)
    assert len(dataset) == 6 and dataset.n_unreadable == 1
    assert str(bad) not in dataset.names
    assert str(bad) in caplog.text


def test_bad_sources_raise_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        RealImages(sources=[str(tmp_path / "nowhere")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        RealImages(sources=[str(tmp_path / "notes.txt")])
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad"):
        RealImages(sources=[str(only_bad)])


def test_sources_mix_files_videos_and_names(image_folder, video):
    single = image_folder / "img0.jpg"
    dataset = RealImages(sources=[str(single), str(video)], size=16, video_every=3)
    assert dataset.names == [str(single)] + [f"{video}#{i}" for i in (0, 3, 6, 9)]
    assert dataset.n_unreadable == 0


def test_same_key_same_tensor_and_seeds_differ(image_folder):
    dataset = RealImages(sources=[str(image_folder)], size=24)
    a, b = dataset[2, 123], dataset[2, 123]
    assert a["image"].shape == (3, 24, 24) and a["image"].dtype == torch.float32
    torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    assert a["seed"].dtype == torch.int64 and a["seed"].ndim == 0 and int(a["seed"]) == 123
    assert not torch.equal(a["image"], dataset[2, 124]["image"])
    # A plain index derives its seed from (seed, index), as RenderedFrames does.
    torch.testing.assert_close(dataset[2]["image"], dataset[2, int(dataset[2]["seed"])]["image"])
    assert int(dataset[2]["seed"]) != int(RealImages(sources=[str(image_folder)], size=24, seed=1)[2]["seed"])
    assert torch.equal(dataset[-1]["image"], dataset[len(dataset) - 1]["image"])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_eval_is_the_centre_crop_and_values_are_normalised(tmp_path):
    # 40x60: red strip, 40 green columns, blue strip. The centred square crop is exactly the green part.
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    rgb[:, 10:50] = (0, 200, 0)
    rgb[:, 50:] = (0, 0, 255)
    write_rgb(tmp_path / "strips.png", rgb)
    dataset = RealImages(sources=[str(tmp_path)], size=16, train=False)
    samples = [dataset[0, seed] for seed in (0, 1, 2)]
    for sample in samples[1:]:
        assert torch.equal(sample["image"], samples[0]["image"])
    expected = torch.tensor([0.0, 200 / 255, 0.0]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(denormalised(samples[0]), expected, atol=1e-5, rtol=0)
    # Training crops of the same image are valid normalised pixels too, and some include the other strips.
    train = dataset.subset([0], train=True)
    crops = [denormalised(train[0, seed]) for seed in range(20)]
    for crop in crops:
        assert crop.min() >= -1e-5 and crop.max() <= 1 + 1e-5
    assert any(crop[0].max() > 0.5 or crop[2].max() > 0.5 for crop in crops)


def test_flip(tmp_path):
    # Square image, scale (1, 1): the crop is the whole image, so the flip is the only randomness.
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, 16:] = 255
    write_rgb(tmp_path / "half.png", rgb)

    def left_half_values(flip: bool) -> set[float]:  # columns the antialiasing kernel keeps off the edge
        dataset = RealImages(sources=[str(tmp_path)], size=8, scale=(1.0, 1.0), flip=flip)
        return {round(float(denormalised(dataset[0, seed])[:, :, :3].mean()), 3) for seed in range(12)}

    assert left_half_values(True) == {0.0, 1.0}  # dark on the left as written, bright when flipped
    assert left_half_values(False) == {0.0}


def test_cache_downscales_large_images(tmp_path):
    write_rgb(tmp_path / "big.png", textured(0, h=200, w=300))
    assert RealImages(sources=[str(tmp_path)], size=16).images[0].shape == (32, 48, 3)
    assert RealImages(sources=[str(tmp_path)], size=16, cache_side=100).images[0].shape == (100, 150, 3)


def test_split_disjoint_stable_and_subset(image_folder, video):
    dataset = RealImages(sources=[str(image_folder), str(video)], size=16, video_every=1)
    train, held = dataset.split(0.4)
    assert train and held
    assert sorted(train + held) == list(range(len(dataset))) and not set(train) & set(held)
    reordered = RealImages(sources=[str(video), str(image_folder)], size=16, video_every=1)
    held_names = {reordered.names[i] for i in reordered.split(0.4)[1]}
    assert held_names == {dataset.names[i] for i in held}
    assert dataset.split(0.0) == (list(range(len(dataset))), [])
    with pytest.raises(ValueError, match="holdout"):
        dataset.split(1.0)
    view = dataset.subset(held, train=False)
    assert view.names == [dataset.names[i] for i in held] and not view.train and dataset.train
    assert torch.equal(view[0, 5]["image"], view[0, 6]["image"])
    with pytest.raises(ValueError, match="empty"):
        dataset.subset([])


def test_max_images_is_a_deterministic_subsample(image_folder, video):
    sources = [str(image_folder), str(video)]
    full = RealImages(sources=sources, size=16, video_every=1)
    small = RealImages(sources=sources, size=16, video_every=1, max_images=5)
    assert len(small) == 5 and set(small.names) <= set(full.names)
    assert small.names == RealImages(sources=sources, size=16, video_every=1, max_images=5).names
    assert small.names == [n for n in full.names if n in set(small.names)]  # source order kept
    other = RealImages(sources=sources, size=16, video_every=1, max_images=5, seed=3)
    assert other.names != small.names


def test_dataloader_with_step_sampler(image_folder):
    dataset = RealImages(sources=[str(image_folder)], size=16)
    sampler = StepSampler(len(dataset), seed=4, batch_size=3)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=3, collate_fn=collate_frames)
    batches = list(itertools.islice(loader, 3))
    keys = list(itertools.islice(iter(sampler), 9))
    for b, batch in enumerate(batches):
        assert batch["image"].shape == (3, 3, 16, 16) and batch["n_corrupt"] == 0
        assert batch["seed"].dtype == torch.int64
        assert batch["seed"].tolist() == [seed for _, seed in keys[3 * b:3 * b + 3]]
        index, seed = keys[3 * b]
        assert torch.equal(batch["image"][0], dataset[index, seed]["image"])


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_source_is_grey_rgb():
    dataset = RealImages(sources=["fashion_mnist"], size=32, max_images=20)
    assert len(dataset) == 20 and dataset.n_unreadable == 0
    assert all(name.startswith(FASHION_MNIST_ROOT) and "#" in name for name in dataset.names)
    image = denormalised(dataset[0, 1])
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image[0], image[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(image[0], image[2], atol=1e-5, rtol=0)


def test_tile_image_grid_is_exact():
    image = np.arange(10 * 17 * 3, dtype=np.uint8).reshape(10, 17, 3)
    (whole,) = tile_image(image, 1)
    assert whole[0] == "" and whole[1] is image
    tiles = tile_image(image, 2)  # side 5: 2 rows, 3 columns; 2 columns left over, 1 on each side
    assert [name for name, _ in tiles] == ["#tile0,0", "#tile0,1", "#tile0,2", "#tile1,0", "#tile1,1", "#tile1,2"]
    np.testing.assert_array_equal(tiles[4][1], image[5:10, 6:11])
    assert all(t.shape == (5, 5, 3) for _, t in tiles)


def test_tiles_are_items_and_split_keeps_a_photo_on_one_side(tmp_path):
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"p{i}.png"), np.full((40, 80, 3), 30 * i, np.uint8))
    dataset = RealImages(sources=[str(tmp_path)], size=8, tiles=2)
    assert len(dataset) == 6 * 8  # side 20: 2 x 4 tiles per photo
    assert dataset.names[1] == f"{tmp_path / 'p0.png'}#tile0,1"
    train, held = dataset.split(0.5)
    photo = [name.split("#")[0] for name in dataset.names]
    assert {photo[i] for i in train}.isdisjoint({photo[i] for i in held}) and held and train


def test_wallpaper_photos_are_installed_and_large():
    paths = wallpaper_photos()  # `make setup` installs the three wallpaper packages
    assert len(paths) == sum(len(names) for _, names in WALLPAPER_PHOTOS.values())
    shapes = [read_image(p).shape for p in paths[:3]]
    assert all(min(s[:2]) >= 1000 for s in shapes)
