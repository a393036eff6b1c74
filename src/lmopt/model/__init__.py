"""The Qwen3 model and its presets."""

from lmopt.model.presets import Preset, get_preset
from lmopt.model.qwen3 import Qwen3, Qwen3Config, build_model, from_hf_state_dict

__all__ = ["Preset", "Qwen3", "Qwen3Config", "build_model", "from_hf_state_dict", "get_preset"]
