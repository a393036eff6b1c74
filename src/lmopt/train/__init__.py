"""Training: config, schedule, checkpoints, metrics and the loop."""

from lmopt.train.callbacks import Callback
from lmopt.train.config import ConfigError, TrainConfig
from lmopt.train.trainer import Trainer, TrainingDiverged, train

__all__ = ["Callback", "ConfigError", "TrainConfig", "Trainer", "TrainingDiverged", "train"]
