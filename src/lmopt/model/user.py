"""A user's own language model in lmopt's training loop: ``--model package.module:factory``.

The factory returns an ``nn.Module`` that maps token ids ``(B, T)`` to logits ``(B, T, V)`` (a tensor, a tuple
whose first item is the logits, or an object with ``.logits`` such as a Hugging Face output). It is called as
``factory(vocab_size=V)`` when it takes a ``vocab_size`` argument (V: the tokenizer's vocabulary), else
``factory()``, after ``torch.manual_seed(seed)`` so that the initial weights follow the run's seed.
:class:`UserLM` adapts it to the interface lmopt's trainer uses (``forward(idx, targets) -> (logits, loss)``,
``num_params``, ``estimate_mfu``, ``layers`` for FSDP2's per-block sharding); the vocabulary is read from the
module's first ``nn.Embedding``.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn


class UserModelError(ValueError):
    """The model reference cannot be loaded, or what it returns is not a usable language model."""


class UserLM(nn.Module):
    """A user's ids -> logits module with lmopt's language-model interface (mean fp32 cross-entropy)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
        if not embeddings:
            raise UserModelError("the model has no nn.Embedding, so its vocabulary cannot be read; lmopt's "
                                 "trainer needs a token-id model with an embedding table")
        self.__dict__["embedding"] = embeddings[0]  # a reference, not a second registration of the submodule
        self.vocab_size = embeddings[0].num_embeddings
        self.activation_checkpointing = False

    @property
    def layers(self) -> nn.ModuleList:
        """The largest ``nn.ModuleList`` of the module (its transformer blocks, for FSDP2), or an empty one."""
        lists = [m for m in self.module.modules() if isinstance(m, nn.ModuleList)]
        return max(lists, key=len) if lists else nn.ModuleList()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        out = self.module(idx)
        logits = getattr(out, "logits", out)
        if isinstance(logits, tuple | list):
            logits = logits[0]
        if logits.dim() != 3 or logits.shape[:2] != idx.shape:
            raise UserModelError(f"the model must return logits of shape (B, T, V) = ({idx.shape[0]}, "
                                 f"{idx.shape[1]}, V); got {tuple(logits.shape)}")
        if targets is None:
            return logits, None
        return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied ones once); ``non_embedding`` leaves out the embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if non_embedding else n

    def estimate_mfu(self, tokens_per_second: float, seq_len: int, peak_flops: float) -> float:
        """6 FLOPs per non-embedding parameter and token, plus the output projection (attention not counted)."""
        flops = 6 * (self.num_params(non_embedding=True) + self.embedding.weight.numel())
        return flops * tokens_per_second / peak_flops


def load_factory(reference: str):
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise UserModelError(f"model {reference!r} must be package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise UserModelError(f"cannot load model {reference!r}: {err}; the module must be importable (installed, "
                             "or on PYTHONPATH) and define that name") from None
    if not callable(factory):
        raise UserModelError(f"model {reference!r} is {type(factory).__name__}, not a function or class")
    return factory


def build_user_model(reference: str, vocab_size: int, seed: int, device: str | torch.device = "cpu") -> UserLM:
    """The module ``reference`` returns, seeded, on ``device``, wrapped as a :class:`UserLM`."""
    factory = load_factory(reference)
    try:
        takes_vocab = "vocab_size" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_vocab = False
    torch.manual_seed(seed)
    module = factory(vocab_size=vocab_size) if takes_vocab else factory()
    if not isinstance(module, nn.Module):
        raise UserModelError(f"model {reference!r} returned {type(module).__name__}, not a torch.nn.Module")
    model = UserLM(module.to(device))
    if model.vocab_size < vocab_size:
        raise UserModelError(f"model {reference!r} has a vocabulary of {model.vocab_size} < the tokenizer's "
                             f"{vocab_size}")
    return model
