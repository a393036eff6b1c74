"""A Qwen3 decoder in one file.

Architecture (as in Hugging Face ``Qwen3ForCausalLM``, so weights load one-to-one):
pre-norm blocks of RMSNorm -> grouped-query attention -> residual, RMSNorm -> SwiGLU MLP -> residual;
per-head RMSNorm on q and k before rotary embeddings (theta 1e6); no biases; a final RMSNorm; output
projection tied to the input embedding unless ``tie_embeddings=False``.

Initialisation (seeded, bit-exact for a given seed, independent of the device):
- every hidden matrix (q, k, v, gate, up): N(0, init_std), init_std = 0.02;
- the two projections that write into the residual stream (o_proj, down_proj): N(0, init_std / sqrt(2 n_layers)),
  as GPT-2 does, so the residual stream's variance does not grow with depth;
- the embedding: N(0, 0.25 / sqrt(d_model)). With the tied output the logits at initialisation then have
  standard deviation 0.25 whatever the width (hidden states leave the final RMSNorm with unit RMS), so the
  initial loss is ln(vocab) + ~0.03 for every preset;
- an untied head, when configured: as the embedding; all RMSNorm weights: 1.
Values are drawn on the CPU from one ``torch.Generator`` in ``named_parameters()`` order, then copied to the
model's device.

Memory (see docs/gpu-memory.md): with targets, the loss is computed by :func:`chunked_cross_entropy`, so the
(tokens x vocab) logits never exist in fp32 for more than ``loss_chunk_tokens`` tokens at a time, and no logits
are kept for backward; ``activation_checkpointing`` recomputes each block in backward instead of keeping its
activations (only the block inputs are kept).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Tokens whose logits exist at once in the loss: 4096 x 151,936 in fp32 is 2.5 GB, and each chunk's head matmul
# (4096 x 512 x 151,936 for qwen3-134m) is still large enough to run at full speed.
LOSS_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    mlp_dim: int = 768
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Invalid model config: {field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"Invalid model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"Invalid model config: head_dim must be even for RoPE, got {self.head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as Qwen3 does) and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin tables of shape (T, head_dim) in float32, halves repeated (the rotate-half convention)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    """Parameter names follow Hugging Face's Qwen3 (without the ``model.`` prefix)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # recompute each block in backward (saves its activations)
        self.loss_chunk_tokens = LOSS_CHUNK_TOKENS

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets: (B, T) token ids.

        Without targets: (logits (B, T, V), None). With targets: (None, mean cross-entropy in fp32); the logits
        are not returned, as they are never materialised for the whole batch (:func:`chunked_cross_entropy`).
        """
        T = idx.shape[1]
        if self.config.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = rotary_cos_sin(T, self.config.head_dim, self.config.rope_theta, idx.device)
        x = self.embed_tokens(idx)  # (B, T, d)
        for block in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if targets is None:
            return F.linear(x, head), None  # (B, T, V)
        return None, chunked_cross_entropy(x.flatten(0, 1), head, targets.flatten(), self.loss_chunk_tokens)

    # --- initialisation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic initialisation (see the module docstring)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        cfg = self.config
        embed_std = 0.25 / math.sqrt(cfg.d_model)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            else:
                if name.startswith(("embed_tokens", "lm_head")):
                    std = embed_std
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    std = residual_std
                else:
                    std = cfg.init_std
                value = torch.empty(p.shape).normal_(0.0, std, generator=gen)
            p.copy_(value.to(dtype=p.dtype))

    # --- accounting -----------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight used in a matmul plus the attention scores (PaLM appendix B)."""
        cfg = self.config
        matmul_params = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model  # the head's matmul
        attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
        return 6 * matmul_params + attention

    def estimate_mfu(self, tokens_per_second: float, seq_len: int, peak_flops: float) -> float:
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops


def chunked_cross_entropy(x: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy (fp32) of the logits ``x @ headᵀ``: x (N, d), head (V, d), targets (N,).

    Up to ``chunk_tokens`` tokens this is the plain ``F.cross_entropy(logits.float())``. Beyond, the logits are
    computed ``chunk_tokens`` rows at a time, in forward and again in backward (:class:`_ChunkedCrossEntropy`),
    in the matmul dtype autocast would use (bf16 under bf16 autocast) with the softmax in fp32, exactly as the
    plain version; nothing of size N x V is kept for backward.
    """
    if x.shape[0] <= chunk_tokens:
        return F.cross_entropy(F.linear(x, head).float(), targets)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    return _ChunkedCrossEntropy.apply(x, head, targets, chunk_tokens, dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """loss = mean_i (logsumexp(z_i) - z_i[t_i]) with z = x headᵀ; ∂loss/∂z = (softmax(z) - onehot(t)) / N.

    Forward keeps x, head, targets and the N log-sum-exps; backward recomputes each chunk's logits, turns them
    into ∂loss/∂z in place and accumulates ∂x and ∂head (the head's in fp32) chunk by chunk.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        w = head.to(dtype)
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for lo in range(0, x.shape[0], chunk):
            logits = (x[lo:lo + chunk].to(dtype) @ w.mT).float()  # (n, V)
            total -= logits.gather(1, targets[lo:lo + chunk, None]).sum()
            top = logits.amax(dim=-1, keepdim=True)
            lse[lo:lo + chunk] = logits.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(-1)  # in place: no copy
            total += lse[lo:lo + chunk].sum()
        ctx.save_for_backward(x, head, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total / x.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, head, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = head.to(dtype)
        grad_x = torch.empty_like(x)
        grad_head = torch.zeros_like(head, dtype=torch.float32)
        scale = grad.float() / x.shape[0]
        for lo in range(0, x.shape[0], chunk):
            xc, tc = x[lo:lo + chunk].to(dtype), targets[lo:lo + chunk]
            dz = (xc @ w.mT).float().sub_(lse[lo:lo + chunk, None]).exp_()  # softmax, (n, V)
            dz[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
            dz = dz.mul_(scale).to(dtype)
            grad_x[lo:lo + chunk] = dz @ w
            grad_head += (dz.mT @ xc).float()
        return grad_x, grad_head.to(head.dtype), None, None, None


def build_model(cfg: Qwen3Config, seed: int, device: str | torch.device = "cpu") -> Qwen3:
    """Construct on the meta device (no memory touched), materialise on ``device``, initialise from ``seed``."""
    with torch.device("meta"):
        model = Qwen3(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``Qwen3ForCausalLM`` state dict to ours (drops ``model.``, and a tied ``lm_head``)."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[key] = value
            continue
        out[key.removeprefix("model.")] = value
    return out
