"""Constants shared across the layers, each defined once."""

from pathlib import Path

#: Per-channel RGB mean and standard deviation of ImageNet: every backbone input is normalised with them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File suffixes read as images (OpenCV decodes all of them) and as videos.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS: tuple[str, ...] = (".avi", ".mp4", ".mkv", ".mov")

#: Sample data of the Debian package ``opencv-doc`` (real photos, street videos, the Middlebury Aloe pair).
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
