"""A folder of images, one subfolder per class: decoded with Pillow into [C, H, W] float arrays in [0, 1].

Images keep their own size and channels unless `size` or `channels` say otherwise; training batches can be
flipped and cropped (`augment`), drawn from the epoch's seed per sample, so any data-parallel degree sees the
same images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raybig.data.files import BadRow, RowErrors
from raybig.errors import SpecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def class_folders(path: str, field: str) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise SpecError(f"no such directory: {path}", field)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise SpecError(f"{path} has {len(folders)} class folders; an image folder has one per class (two or more)",
                        field)
    return folders


def read_image_folder(spec, path: str, field: str, errors: RowErrors, classes: list[str] | None = None,
                      like: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x [N, C, H, W] float32, y [N], class names). Validation folders use the training `classes` and image
    shape `like` (C, H, W)."""
    files, names = image_files(path, field, classes)
    x, y = decode_images(spec, files, field, errors, like)
    if not len(y):
        raise SpecError(f"no image under {path} could be decoded", field)
    return x, y, names


def image_files(path: str, field: str, classes: list[str] | None = None) -> tuple[list[tuple[int, Path]], list[str]]:
    """([(class index, image file), ...] class by class, the class names); a validation folder's classes must
    be the training folder's `classes`."""
    folders = class_folders(path, field)
    names = [f.name for f in folders]
    if classes is not None and names != classes:
        raise SpecError(f"{path} has classes {', '.join(names)} but the training folder has {', '.join(classes)}",
                        field)
    out = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SpecError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})", field)
        out += [(label, file) for file in files]
    return out, names


def decode_images(spec, files: list[tuple[int, Path]], field: str, errors: RowErrors,
                  like: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, C, H, W] float32 in [0, 1], y [N]) of the images that decode, at shape `like` (default the first
    image's); one that does not is a bad row."""
    from PIL import Image, UnidentifiedImageError

    images, labels, shape = [], [], like
    for label, file in files:
        try:
            with Image.open(file) as image:
                array, shape = _pixels(image, spec, shape, Path(file))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            if isinstance(err, SizeMismatch):
                raise SpecError(str(err), "data.size") from None
            errors.bad(BadRow(f"{file}: not an image Pillow can decode ({err})", field))
            continue
        images.append(array)
        labels.append(label)
    x = np.stack(images) if images else np.zeros((0, *(shape or (1, 1, 1))), np.float32)
    return x, np.array(labels, dtype=np.int64)


class SizeMismatch(ValueError):
    pass


def _pixels(image, spec, shape: tuple[int, int, int] | None, file: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    from PIL import Image

    channels = spec.channels or (shape[0] if shape else (1 if image.mode in ("1", "L", "I", "F", "I;16") else 3))
    image = image.convert("L" if channels == 1 else "RGB")
    if spec.size is not None:
        height, width = spec.size
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    elif shape is not None and (image.height, image.width) != shape[1:]:
        raise SizeMismatch(f"{file} is {image.height}x{image.width} but the first image is {shape[1]}x{shape[2]}: "
                           "set data.size: [height, width] to resize them all")
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array), tuple(array.shape)


class Augment:
    """Random flips and crops of a training batch, decided per sample from the epoch's seed and the sample's
    index in the training split, so they do not depend on how the batch is divided among ranks."""

    def __init__(self, augment, rows: int):
        self.flip, self.pad, self.rows = augment.flip, augment.crop_padding, rows

    def __bool__(self) -> bool:
        return self.flip or self.pad > 0

    def __call__(self, x: torch.Tensor, index: torch.Tensor, seed: int) -> torch.Tensor:
        draws = torch.Generator().manual_seed(seed)
        flips = torch.rand(self.rows, generator=draws)[index] < 0.5
        offsets = torch.randint(0, 2 * self.pad + 1, (self.rows, 2), generator=draws)[index]
        if self.flip:
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        if self.pad:
            height, width = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
            x = torch.stack([p[:, dy: dy + height, dx: dx + width] for p, (dy, dx) in zip(padded, offsets.tolist())])
        return x
