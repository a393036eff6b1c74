"""Training: config, schedule, checkpoints, metrics and the loop."""

from lmopt.train.config import ConfigError, TrainConfig
from lmopt.train.trainer import Trainer, TrainingDiverged, train

__all__ = ["ConfigError", "TrainConfig", "Trainer", "TrainingDiverged", "train"]
