"""DataModules: CIFAR-10/100, the embedded digits default, and (under corruptions/) the corruption engine."""

from datamodules.base import ArrayImageDataset, ImageClassificationDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.errors import DataError

__all__ = [
    "ArrayImageDataset",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataError",
    "DigitsDataModule",
    "ImageClassificationDataModule",
]
