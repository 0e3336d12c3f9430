"""Datasets and loaders: the built-in synthetic textures, and ImageFolder trees.

Every random choice about a sample depends only on (seed, epoch, index), and the order of the samples only
on (seed, epoch): the same images reach the model in the same order whatever the number of loader workers,
and a resumed run sees exactly what an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sknet_triton.models import IMAGENET_MEAN, IMAGENET_STD
from sknet_triton.training.errors import DataError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SYNTHETIC_CLASSES", "Datasets", "SyntheticScales", "EpochSeeded",
    "ShardSampler", "mix_seed", "build_datasets", "build_loaders", "set_epoch", "load_rgb_image",
]

SYNTHETIC_CLASSES = 8

# Tags of the seed streams, so that no two kinds of random draw ever share a seed.
_TRAIN_IMAGES, _VAL_IMAGES, _VIEWS = 0, 1, 2


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (modulo 2**64); the same on every platform and Python version."""
    packed = struct.pack(f"<{len(values)}Q", *(value % 2**64 for value in values))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


class SyntheticScales(Dataset):
    """Textures whose class is their spatial scale, generated on the fly from (seed, index).

    Image ``index`` has class ``index % num_classes``: a sum of plane waves of random phase whose
    wavelengths scatter (log-normally) around the class's, geometrically spaced from 3 pixels (class 0)
    to 20 pixels (the last class) and jittered per image by a quarter of the spacing. Orientation and its
    spread, contrast, colour, brightness and pixel noise are random per image, so only the scale tells the
    classes apart: the choice a Selective Kernel unit makes.

    Each image is a window of a field a quarter larger: training images at a random offset, flipped at
    random, both drawn from (seed, epoch, index) (call :meth:`set_epoch` each epoch); validation images at
    the centre. Train and validation images come from separate streams of the same seed.

    Items: (image float32 [3, img_size, img_size], of roughly zero mean and unit variance; label int).
    """

    MIN_WAVELENGTH = 3.0
    MAX_WAVELENGTH = 20.0
    BANDWIDTH = 0.12  # standard deviation of a wave's log-frequency around the image's
    WAVES = 48

    def __init__(self, size: int, img_size: int, seed: int, train: bool, num_classes: int = SYNTHETIC_CLASSES):
        if size < 1 or img_size < 8 or num_classes < 2:
            raise DataError(
                f"synthetic data needs at least 1 image of 8x8 pixels and 2 classes, got {size} images "
                f"of {img_size}x{img_size}, {num_classes} classes"
            )
        self.size = size
        self.img_size = img_size
        self.seed = seed
        self.train = train
        self.num_classes = num_classes
        self.epoch = 0
        self.margin = max(img_size // 4, 2)
        spacing = math.log(self.MAX_WAVELENGTH / self.MIN_WAVELENGTH) / (num_classes - 1)
        self._log_frequencies = [-math.log(self.MIN_WAVELENGTH) - k * spacing for k in range(num_classes)]
        self._jitter = spacing / 4

    def set_epoch(self, epoch: int) -> None:
        """Choose the training offsets and flips of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticScales: index {index} out of range for {self.size} images")
        if self.train:
            view = torch.Generator().manual_seed(mix_seed(self.seed, _VIEWS, self.epoch, index))
            top, left = torch.randint(0, self.margin + 1, (2,), generator=view).tolist()
            flip_rows, flip_columns = (torch.rand(2, generator=view) < 0.5).tolist()
        else:
            top = left = self.margin // 2
            flip_rows = flip_columns = False
        label = index % self.num_classes
        image_seed = mix_seed(self.seed, _TRAIN_IMAGES if self.train else _VAL_IMAGES, index)
        image = self._image(label, torch.Generator().manual_seed(image_seed), top, left)
        if flip_rows:
            image = image.flip(1)
        if flip_columns:
            image = image.flip(2)
        return image, label

    def _image(self, label: int, g: torch.Generator, top: int, left: int) -> Tensor:
        """The window at (top, left) of one image's field, float32 [3, img_size, img_size]."""
        jitter, orientation, spread, contrast = torch.rand(4, generator=g).tolist()
        log_frequency = self._log_frequencies[label] + self._jitter * (2 * jitter - 1)
        frequency = torch.exp(log_frequency + self.BANDWIDTH * torch.randn(self.WAVES, generator=g))
        # spread 0: every wave near one orientation (stripes); 1: all orientations (isotropic blobs)
        angle = math.pi * (orientation + (0.1 + 0.9 * spread) * (torch.rand(self.WAVES, generator=g) - 0.5))
        phase = 2 * math.pi * torch.rand(self.WAVES, 1, generator=g)
        pixels = torch.arange(self.img_size, dtype=torch.float32)
        along_x = (2 * math.pi * frequency * torch.cos(angle))[:, None] * (pixels + left) + phase  # [WAVES, W]
        along_y = (2 * math.pi * frequency * torch.sin(angle))[:, None] * (pixels + top)  # [WAVES, H]
        # sum over waves of cos(along_x + along_y), as one [H, 2 WAVES] @ [2 WAVES, W] product
        rows = torch.cat([along_y.cos(), along_y.sin()]).T
        columns = torch.cat([along_x.cos(), -along_x.sin()])
        texture = (rows @ columns) * ((0.5 + 1.5 * contrast) * math.sqrt(2 / self.WAVES))
        colour = 0.4 + 0.6 * torch.rand(3, 1, 1, generator=g)
        brightness = 0.5 * torch.randn(3, 1, 1, generator=g)
        noise = 0.1 * torch.randn(3, self.img_size, self.img_size, generator=g)
        return noise.add_(brightness).addcmul_(colour, texture)


class EpochSeeded(Dataset):
    """A dataset whose random transforms draw from (seed, epoch, index) instead of the global generator.

    torchvision's random transforms draw from torch's global generator, whose state depends on the loader
    worker and on everything drawn before; seeding it per sample makes each augmentation reproducible.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentations of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, _VIEWS, self.epoch, index))
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``length``, in order: every index exactly once over the
    ranks. For evaluation, where DistributedSampler's padding would count some images twice."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    num_classes: int


def build_datasets(data: str, img_size: int, seed: int, synthetic_size: int) -> Datasets:
    """The training and validation sets of ``data``: ``"synthetic"`` or an ImageFolder tree's root.

    Synthetic: :class:`SyntheticScales`, ``synthetic_size`` training images and a quarter as many (at
    least one per class) for validation. ImageFolder: ``data/train`` with RandomResizedCrop and horizontal
    flips, ``data/val`` resized by 1 / 0.875 and centre-cropped; both normalised with ImageNet's statistics.
    """
    if data == "synthetic":
        val_size = max(synthetic_size // 4, SYNTHETIC_CLASSES)
        return Datasets(
            train=SyntheticScales(synthetic_size, img_size, seed, train=True),
            val=SyntheticScales(val_size, img_size, seed, train=False),
            num_classes=SYNTHETIC_CLASSES,
        )
    return _image_folders(data, img_size, seed)


def _image_folders(root: str, img_size: int, seed: int) -> Datasets:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise DataError(f"--data {root} needs torchvision (pip install torchvision); --data synthetic does not") from None
    folders = {split: os.path.join(root, split) for split in ("train", "val")}
    missing = [path for path in folders.values() if not os.path.isdir(path)]
    if missing:
        raise DataError(
            f"--data {root}: no folder {' or '.join(missing)}; expected train/ and val/ with one folder of images per class"
        )
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(img_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    val_transform = transforms.Compose([
        transforms.Resize(round(img_size / 0.875)),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        normalize,
    ])
    try:
        train = datasets.ImageFolder(folders["train"], train_transform, loader=load_rgb_image)
        val = datasets.ImageFolder(folders["val"], val_transform, loader=load_rgb_image)
    except (FileNotFoundError, OSError) as error:  # an empty class folder, an unreadable tree
        raise DataError(f"--data {root}: {error}") from None
    if train.classes != val.classes:
        raise DataError(
            f"--data {root}: train/ has {len(train.classes)} classes and val/ {len(val.classes)}, "
            "or their names differ; both need the same class folders"
        )
    return Datasets(train=EpochSeeded(train, seed), val=val, num_classes=len(train.classes))


def load_rgb_image(path: str):
    """The image file at ``path`` as an RGB PIL image (torchvision's ImageFolder loader).

    A file that cannot be read or decoded raises DataError naming it: the run stops at the first one (a
    one-line error, exit status 2) rather than training on a dataset that silently lacks some images.
    """
    from PIL import Image

    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except Image.UnidentifiedImageError:
        raise DataError(f"cannot read the image {path} (not in a format PIL can decode); repair or remove it") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # PIL raises all of these
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot read the image {path} ({detail}); repair or remove it") from None


def build_loaders(
    datasets: Datasets,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
) -> tuple[DataLoader, DataLoader]:
    """Loaders of this rank's share: training shuffled by (seed, epoch) and cut into whole batches (every
    rank runs the same number of steps), validation in order.

    Call :func:`set_epoch` before each training epoch.
    """
    train_sampler = DistributedSampler(datasets.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if len(train_sampler) < batch_size:
        raise DataError(
            f"each of {world_size} process(es) gets {len(train_sampler)} of the {len(datasets.train)} training "
            f"images, less than one batch of {batch_size}: use a smaller --batch-size, or more images"
        )

    def loader(dataset: Dataset, sampler: Sampler, drop_last: bool) -> DataLoader:
        # Workers' seeds come from the loader's own generator: loading never draws from the global one.
        return DataLoader(
            dataset, batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),
        )

    val_sampler = ShardSampler(len(datasets.val), rank, world_size)
    return loader(datasets.train, train_sampler, drop_last=True), loader(datasets.val, val_sampler, drop_last=False)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Point a training loader's sample order and augmentations at ``epoch``."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
