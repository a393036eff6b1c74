"""The loss without whole-batch logits, activation checkpointing, and the memory estimate they make possible."""

import pytest
import torch
import torch.nn.functional as F

from lmopt.model import Qwen3Config, build_model, get_preset
from lmopt.model.qwen3 import chunked_cross_entropy
from lmopt.train.memory import (
    activation_bytes_per_token,
    auto_micro_batch,
    estimate_memory,
    measure_saved_bytes,
    peak_flops,
)

SMALL = Qwen3Config(vocab_size=1000, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, mlp_dim=80)


def plain_and_chunked(autocast: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=gen, requires_grad=True)
    w = (torch.randn(1000, 48, generator=gen) * 0.3).requires_grad_()
    t = torch.randint(0, 1000, (300,), generator=gen)
    results = []
    for loss_fn in (lambda: F.cross_entropy(F.linear(x, w).float(), t), lambda: chunked_cross_entropy(x, w, t, 64)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        results.append((loss, *torch.autograd.grad(loss, (x, w))))
    return results


def test_chunked_cross_entropy_equals_the_plain_one_in_fp32():
    (loss, gx, gw), (chunked, cx, cw) = plain_and_chunked(autocast=False)
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(cx, gx, rtol=0, atol=1e-6 * gx.abs().max().item())
    torch.testing.assert_close(cw, gw, rtol=0, atol=1e-6 * gw.abs().max().item())


def test_chunked_cross_entropy_under_bf16_autocast():
    """bf16 matmuls as autocast's, softmax in fp32: the loss to fp32 rounding; dx nearly the same bits (both round
    the same bf16 products, but a GEMM may sum them in another order for 64 rows than for 300, which can move a
    result across a bf16 rounding boundary: at most one bf16 step, seen once in a CI run on an AMX CPU); dhead to
    bf16 rounding (the plain version rounds one product, this one each chunk's, whose partial sums can exceed the
    total: 2^-7 of the largest entry)."""
    (loss, gx, gw), (chunked, cx, cw) = plain_and_chunked(autocast=True)
    assert chunked.dtype == cx.dtype == cw.dtype == torch.float32
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=0)
    bf16_step = torch.ldexp((gx != 0).float(), torch.frexp(gx).exponent - 8)  # |gx| = m 2^e, m in [0.5, 1)
    assert ((cx - gx).abs() <= bf16_step).all()
    assert (cx == gx).float().mean() >= 0.999
    torch.testing.assert_close(cw, gw, rtol=0, atol=2**-7 * gw.abs().max().item())


def model_loss_and_grads(checkpointing: bool, chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = build_model(SMALL, seed=0)
    model.activation_checkpointing, model.loss_chunk_tokens = checkpointing, chunk
    idx = torch.randint(0, SMALL.vocab_size, (3, 41), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize(("checkpointing", "chunk"), [(False, 32), (True, 4096), (True, 32)])
def test_model_gradients_do_not_depend_on_chunks_or_recomputation(checkpointing, chunk):
    loss, grads = model_loss_and_grads(False, 4096)  # 120 tokens: the plain loss
    other_loss, other_grads = model_loss_and_grads(checkpointing, chunk)
    torch.testing.assert_close(other_loss, loss, rtol=1e-6, atol=0)
    for g, h in zip(grads, other_grads, strict=True):
        torch.testing.assert_close(h, g, rtol=0, atol=1e-6 * g.abs().max().item())


def saved_bytes_per_token(cfg: Qwen3Config, autocast: bool, checkpointing: bool) -> float:
    """The slope of the saved bytes between 2 and 4 sequences (weights' bf16 copies are the intercept)."""
    model = build_model(cfg, seed=0)
    model.activation_checkpointing, model.loss_chunk_tokens = checkpointing, 16  # the chunked loss, as on a GPU
    idx = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    dtype = torch.bfloat16 if autocast else None
    two, four = (measure_saved_bytes(model, idx[:b, :-1], idx[:b, 1:], dtype) for b in (2, 4))
    return (four - two) / (2 * 32)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_what_autograd_saves(dtype, checkpointing):
    measured = saved_bytes_per_token(SMALL, dtype == "bf16", checkpointing)
    formula = activation_bytes_per_token(SMALL, dtype, checkpointing)["total"]
    assert measured == pytest.approx(formula, rel=0.01)


def test_gpu_134m_fits_an_80_gb_gpu_in_8_micro_batches():
    for optimizer in ("adamw", "muon", "spectra"):
        estimate = estimate_memory("qwen3-134m", 1024, 32, optimizer, "bf16", False)
        assert 15 < estimate["total_gib"] < 40
        assert estimate["activation_bytes_per_token"] == activation_bytes_per_token(
            get_preset("qwen3-134m").config)["total"]
    whole_batch = estimate_memory("qwen3-134m", 1024, 256, "adamw", "bf16", False)
    assert whole_batch["total_gib"] > 80  # why gpu-134m accumulates gradients
    assert auto_micro_batch("qwen3-134m", 1024, 256, "adamw", "bf16", False, 80 * 2**30) in (32, 64)
    checkpointed = estimate_memory("qwen3-134m", 1024, 256, "adamw", "bf16", True)
    assert checkpointed["total_gib"] < 60  # recomputation makes even the whole batch fit


def test_fsdp_shards_the_static_memory():
    one = estimate_memory("qwen3-0.6b", 1024, 8, "adamw", "bf16", False)
    eight = estimate_memory("qwen3-0.6b", 1024, 8, "adamw", "bf16", False, fsdp_ranks=8)
    assert eight["optimizer_state"] == one["optimizer_state"] // 8 and eight["unsharded"] > 0
    assert eight["total"] < one["total"]


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Intel Xeon") is None
