import math

import pytest
import torch

from lmopt.model import Qwen3Config, build_model, from_hf_state_dict, get_preset
from lmopt.registry import PRESETS

transformers = pytest.importorskip("transformers")


def hf_config(cfg: Qwen3Config):
    return transformers.Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.mlp_dim,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        attention_bias=False,
        use_sliding_window=False,
        hidden_act="silu",
    )


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_hugging_face_qwen3(tie):
    cfg = Qwen3Config(vocab_size=512, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=32,
                      mlp_dim=160, tie_embeddings=tie, max_seq_len=128)
    torch.manual_seed(0)
    reference = transformers.Qwen3ForCausalLM(hf_config(cfg)).float().eval()
    with torch.no_grad():  # random, not HF's init, so that norms and every weight matter
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    ours = build_model(cfg, seed=1).eval()
    missing = ours.load_state_dict(from_hf_state_dict(reference.state_dict(), cfg), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    idx = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["nano", "tiny", "qwen3-134m"])
def test_initial_loss_is_ln_vocab(name):
    cfg = get_preset(name).config
    model = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, 65), generator=gen)
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_same_seed_same_weights_bit_exact():
    cfg = get_preset("nano").config
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_init_scales_follow_the_documented_scheme():
    cfg = get_preset("tiny").config
    model = build_model(cfg, seed=0)
    std = dict((n, p.std().item()) for n, p in model.named_parameters())
    assert std["embed_tokens.weight"] == pytest.approx(0.25 / math.sqrt(cfg.d_model), rel=0.02)
    assert std["layers.0.self_attn.q_proj.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["layers.0.mlp.down_proj.weight"] == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layers), rel=0.05)


# The sizes the issue names: a nano toy, a ~5M tiny, the papers' 134.4M model, and Qwen3-0.6B; the two ladders'
# rungs as their summaries state them.
EXPECTED_PARAMS = {"nano": (1.0e6, 2.0e6), "tiny": (4.5e6, 5.5e6), "qwen3-134m": (134.35e6, 134.45e6),
                   "qwen3-0.6b": (590e6, 610e6), "micro": (3.25e6, 3.35e6), "small": (7.95e6, 8.05e6),
                   "qwen3-44m": (44.5e6, 45.0e6), "qwen3-72m": (71.5e6, 72.0e6)}


@pytest.mark.parametrize("name", PRESETS.names())
def test_preset_sizes(name):
    with torch.device("meta"):
        from lmopt.model import Qwen3
        model = Qwen3(get_preset(name).config)
    low, high = EXPECTED_PARAMS[name]
    assert low <= model.num_params() <= high


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Qwen3Config(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="must be positive"):
        Qwen3Config(d_model=0)
