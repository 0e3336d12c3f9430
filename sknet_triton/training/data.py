"""Datasets and loaders: the built-in synthetic textures, and ImageFolder trees.

Every random choice about a sample depends only on (seed, epoch, index), and the order of the samples only
on (seed, epoch): the same images reach the model in the same order whatever the number of loader workers,
and a resumed run sees exactly what an uninterrupted one would. The augmentations are timm's (its
ImageNet transforms with RandAugment/AutoAugment, and random erasing); the synthetic textures take random
erasing only, the policies being defined on photographs.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sknet_triton.training.errors import DataError

__all__ = [
    "SYNTHETIC_CLASSES", "Augmentation", "Datasets", "SyntheticScales", "EpochSeeded", "ShardSampler", "mix_seed",
    "build_datasets", "build_loaders", "set_epoch", "load_rgb_image",
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

    ``transform``, if given, maps each training image (float32 [3, img_size, img_size]) to another of the
    same shape, drawing from the global generators (wrap the dataset in :class:`EpochSeeded`).

    Items: (image float32 [3, img_size, img_size], of roughly zero mean and unit variance; label int).
    """

    MIN_WAVELENGTH = 3.0
    MAX_WAVELENGTH = 20.0
    BANDWIDTH = 0.12  # standard deviation of a wave's log-frequency around the image's
    WAVES = 48

    def __init__(
        self, size: int, img_size: int, seed: int, train: bool, num_classes: int = SYNTHETIC_CLASSES,
        transform: Optional[Callable[[Tensor], Tensor]] = None,
    ):
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
        self.transform = transform
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
        if self.transform is not None:
            image = self.transform(image)
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
    """A dataset whose random transforms draw from (seed, epoch, index) instead of the global generators.

    torchvision's and timm's random transforms draw from torch's, Python's and NumPy's global generators,
    whose states depend on the loader worker and on everything drawn before; seeding all three per sample
    makes each augmentation reproducible, and restoring them afterwards leaves the caller's draws alone.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentations of ``epoch`` (and the wrapped dataset's own, if it has any)."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = mix_seed(self.seed, _VIEWS, self.epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``length``, in order: every index exactly once over the
    ranks. For evaluation, where DistributedSampler's padding would count some images twice."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Augmentation:
    """The training images' augmentation beyond crops and flips: ``auto_augment`` a RandAugment or
    AutoAugment policy in timm's notation (ImageFolder data only), random erasing of probability
    ``erase_prob`` with fill ``erase_mode`` (timm's ``const``, ``rand`` or ``pixel``)."""

    auto_augment: Optional[str] = None
    erase_prob: float = 0.0
    erase_mode: str = "pixel"


@dataclass
class Datasets:
    train: Optional[Dataset]  # None when only validation was asked for
    val: Dataset
    num_classes: int


def build_datasets(
    data: str, pretrained_cfg: dict, img_size: int, seed: int, synthetic_size: int,
    augmentation: Augmentation = Augmentation(), train: bool = True,
) -> Datasets:
    """The training (if ``train``) and validation sets of ``data``: ``"synthetic"`` or an ImageFolder tree's root.

    Synthetic: :class:`SyntheticScales`, ``synthetic_size`` training images and a quarter as many (at
    least one per class) for validation; random erasing applies to them, an ``auto_augment`` policy does
    not (DataError). ImageFolder: ``data/train`` and ``data/val`` through timm's ImageNet transforms,
    configured by the model's (or its weights') timm data configuration ``pretrained_cfg`` (interpolation,
    crop fraction, mean and std) at ``img_size``: RandomResizedCrop, horizontal flip, the policy and
    random erasing for training, a resize and centre crop for validation.
    """
    if data == "synthetic":
        if augmentation.auto_augment:
            raise DataError(
                f"--aa {augmentation.auto_augment}: the policies apply to photographs (ImageFolder data), "
                "not to --data synthetic"
            )
        val_size = max(synthetic_size // 4, SYNTHETIC_CLASSES)
        erase = _random_erasing(augmentation)
        train_set = SyntheticScales(synthetic_size, img_size, seed, train=True, transform=erase)
        return Datasets(
            train=(EpochSeeded(train_set, seed) if erase is not None else train_set) if train else None,
            val=SyntheticScales(val_size, img_size, seed, train=False),
            num_classes=SYNTHETIC_CLASSES,
        )
    return _image_folders(data, pretrained_cfg, img_size, seed, augmentation, train)


def _random_erasing(augmentation: Augmentation):
    """timm's RandomErasing for one image, or None if ``augmentation`` has none."""
    if augmentation.erase_prob == 0:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(augmentation.erase_prob, mode=augmentation.erase_mode, device="cpu")


def image_transforms(pretrained_cfg: dict, img_size: int, augmentation: Augmentation = Augmentation()):
    """timm's (training, validation) transforms of ImageFolder images at ``img_size``, for a model of timm data
    configuration ``pretrained_cfg`` (``model.pretrained_cfg``, or ``timm.models.get_pretrained_cfg(name).to_dict()``)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, img_size, img_size)}, pretrained_cfg=pretrained_cfg)
    train = create_transform(
        **config, is_training=True, color_jitter=None, auto_augment=augmentation.auto_augment,
        re_prob=augmentation.erase_prob, re_mode=augmentation.erase_mode,
    )
    return train, create_transform(**config, is_training=False)


def _image_folders(
    root: str, pretrained_cfg: dict, img_size: int, seed: int, augmentation: Augmentation, train: bool
) -> Datasets:
    try:
        from torchvision import datasets
    except ImportError:
        raise DataError(f"--data {root} needs torchvision (pip install torchvision); --data synthetic does not") from None
    folders = {split: os.path.join(root, split) for split in (("train", "val") if train else ("val",))}
    missing = [path for path in folders.values() if not os.path.isdir(path)]
    if missing:
        raise DataError(
            f"--data {root}: no folder {' or '.join(missing)}; expected train/ and val/ with one folder of images per class"
        )
    try:
        train_transform, val_transform = image_transforms(pretrained_cfg, img_size, augmentation)
    except (AssertionError, ValueError, KeyError, IndexError) as error:  # timm's parser of policy strings
        raise DataError(f"--aa {augmentation.auto_augment}: not a policy timm knows ({error})") from None
    try:
        val = datasets.ImageFolder(folders["val"], val_transform, loader=load_rgb_image)
        if not train:
            return Datasets(train=None, val=val, num_classes=len(val.classes))
        train = datasets.ImageFolder(folders["train"], train_transform, loader=load_rgb_image)
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
) -> tuple[Optional[DataLoader], DataLoader]:
    """Loaders of this rank's share: training shuffled by (seed, epoch) and cut into whole batches (every
    rank runs the same number of steps; None without a training set), validation in order.

    Call :func:`set_epoch` before each training epoch.
    """

    def loader(dataset: Dataset, sampler: Sampler, drop_last: bool) -> DataLoader:
        # Workers' seeds come from the loader's own generator: loading never draws from the global one.
        return DataLoader(
            dataset, batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers, pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),
        )

    val_loader = loader(datasets.val, ShardSampler(len(datasets.val), rank, world_size), drop_last=False)
    if datasets.train is None:
        return None, val_loader
    train_sampler = DistributedSampler(datasets.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if len(train_sampler) < batch_size:
        raise DataError(
            f"each of {world_size} process(es) gets {len(train_sampler)} of the {len(datasets.train)} training "
            f"images, less than one batch of {batch_size}: use a smaller --batch-size, or more images"
        )
    return loader(datasets.train, train_sampler, drop_last=True), val_loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Point a training loader's sample order and augmentations at ``epoch``."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
