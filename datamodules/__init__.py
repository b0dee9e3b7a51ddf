"""DataModules: CIFAR-10/100, the embedded digits default, Pascal VOC detection and synthetic rectangles, and
(under corruptions/) the corruption engine."""

from datamodules.base import ArrayImageDataset, ImageClassificationDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.detection import DetectionDataModule
from datamodules.digits import DigitsDataModule
from datamodules.errors import DataError
from datamodules.synthetic_boxes import RectanglesDataModule
from datamodules.voc import VOCDataModule

__all__ = [
    "ArrayImageDataset",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataError",
    "DetectionDataModule",
    "DigitsDataModule",
    "ImageClassificationDataModule",
    "RectanglesDataModule",
    "VOCDataModule",
]
