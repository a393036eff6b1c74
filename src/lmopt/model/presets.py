"""Model presets, from a CPU toy to the papers' 134M model and the official Qwen3-0.6B shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmopt.model.qwen3 import Qwen3, Qwen3Config
from lmopt.registry import PRESETS


@dataclass(frozen=True)
class Preset:
    name: str
    config: Qwen3Config
    tokenizer: str  # the registry name of the tokenizer this preset is meant for
    summary: str

    def param_counts(self) -> tuple[int, int]:
        """(all parameters, non-embedding parameters), counted on the meta device (nothing allocated)."""
        with torch.device("meta"):
            model = Qwen3(self.config)
        return model.num_params(), model.num_params(non_embedding=True)


def _register(name: str, tokenizer: str, summary: str, **shape) -> None:
    PRESETS.register(name, Preset(name, Qwen3Config(**shape), tokenizer, summary), summary)


_register(
    "nano", "bpe-8192", "~1.5M params: tests and quick CPU smoke runs",
    vocab_size=8192, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=512,
)
_register(
    "tiny", "bpe-8192", "~5M params: the default CPU preset for training and CPU benchmarks",
    vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=768,
)
_register(
    "micro", "bpe-8192", "~3.3M params (1.7M non-embedding): the CPU ladder's middle rung",
    vocab_size=8192, d_model=192, n_layers=4, n_heads=3, n_kv_heads=1, head_dim=64, mlp_dim=576,
)
_register(
    "small", "bpe-8192", "~8.0M params (5.9M non-embedding, 74%): the CPU ladder's top rung",
    vocab_size=8192, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=1024,
)
_register(
    "qwen3-44m", "qwen3", "~44M params (5.4M non-embedding): the GPU ladder's first rung (d 256, 6 layers)",
    vocab_size=151936, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=1024,
)
_register(
    "qwen3-72m", "qwen3", "~72M params (13.3M non-embedding): the GPU ladder's middle rung (d 384, 6 layers)",
    vocab_size=151936, d_model=384, n_layers=6, n_heads=6, n_kv_heads=3, head_dim=64, mlp_dim=1536,
)
_register(
    "qwen3-134m", "qwen3", "134.4M params: the model size the optimizer papers train (d 512, 12 layers)",
    vocab_size=151936, d_model=512, n_layers=12, n_heads=8, n_kv_heads=4, head_dim=128, mlp_dim=2048,
)
_register(
    "qwen3-0.6b", "qwen3", "the official Qwen3-0.6B shape (d 1024, 28 layers, 16/8 heads)",
    vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, mlp_dim=3072,
    max_seq_len=40960,
)


def get_preset(name: str) -> Preset:
    return PRESETS.get(name)
