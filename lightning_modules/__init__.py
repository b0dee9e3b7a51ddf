"""LightningModules and the model builders they use."""

from lightning_modules.classification import ClassificationModule
from lightning_modules.detection import DetectionModule
from lightning_modules.divergence import TrainingDiverged
from lightning_modules.models import MODELS, build_model

__all__ = ["MODELS", "ClassificationModule", "DetectionModule", "TrainingDiverged", "build_model"]
