"""lmopt's optimizers on models from other code: HF transformers (Qwen3 tied and untied, GPT-2, Llama), a
nanoGPT-style module and an nn.TransformerEncoder LM. The split is read from the structure (what a practitioner
would choose), every optimizer trains each model (12 steps memorising a small batch at its default lr), and one
trains through HF's Trainer."""

import math
import warnings

import pytest
import torch
from torch import nn

from lmopt.optim import build, param_roles, split_table
from lmopt.registry import OPTIMIZERS

transformers = pytest.importorskip("transformers")
VOCAB, D = 101, 32


def hf_qwen3(tied: bool) -> nn.Module:
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      tie_word_embeddings=tied, max_position_embeddings=64)
    return transformers.Qwen3ForCausalLM(config)


def hf_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def hf_llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


class CausalSelfAttention(nn.Module):  # nanoGPT's names: c_attn (fused q, k, v), c_proj
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(D, dim=2)
        shape = (*x.shape[:2], 4, D // 4)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(x.shape))


class NanoBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(D), CausalSelfAttention(), nn.LayerNorm(D)
        self.mlp = nn.Sequential()
        self.mlp.c_fc, self.mlp.gelu, self.mlp.c_proj = nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(VOCAB, D), wpe=nn.Embedding(64, D),
                                              h=nn.ModuleList([NanoBlock(), NanoBlock()]), ln_f=nn.LayerNorm(D)))
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


class EncoderLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 4, 64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.out(self.encoder(self.embed(idx), mask=mask, is_causal=True))


MODELS = {"hf-qwen3-tied": lambda: hf_qwen3(True), "hf-qwen3-untied": lambda: hf_qwen3(False),
          "hf-gpt2": hf_gpt2, "hf-llama": hf_llama, "nanogpt": NanoGPT, "encoder": EncoderLM}


def logits(model, idx):
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def role_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for role in param_roles(model).values():
        counts[role] = counts.get(role, 0) + 1
    return counts


@pytest.mark.parametrize("name", list(MODELS))
def test_the_split_is_what_a_practitioner_would_choose(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    roles = param_roles(model)
    assert set(roles) == {n for n, _ in model.named_parameters()}  # tied parameters once, no KeyError
    shapes = dict(model.named_parameters())
    matrices = {n for n, r in roles.items() if r in ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "mlp")}
    # every hidden matrix, and only hidden matrices, would go to a matrix optimizer
    assert matrices and all(shapes[n].dim() == 2 for n in matrices)
    assert all(VOCAB not in shapes[n].shape for n in matrices)
    assert role_counts(model).get("embedding", 0) >= 1
    untied_head = name in ("hf-qwen3-untied", "hf-llama", "encoder")
    assert (role_counts(model).get("head", 0) == 1) == untied_head
    assert all(r in ("norm", "other") for n, r in roles.items() if shapes[n].dim() == 1)
    if name.startswith("hf-qwen3") or name == "hf-llama":
        assert roles["model.layers.0.self_attn.q_proj.weight"] == "attn_q"
        assert roles["model.layers.1.mlp.down_proj.weight"] == "mlp"
    if name == "nanogpt":
        assert roles["transformer.wte.weight"] == "embedding" and roles["transformer.h.0.attn.c_attn.weight"] == \
            "attn_qkv"
        assert roles["transformer.h.0.attn.c_proj.weight"] == "attn_o"
        assert roles["transformer.h.0.mlp.c_proj.weight"] == "mlp"
    opt = build("muon", model)
    assert "tied: lm_head.weight" in split_table(opt, model) or name not in ("nanogpt", "hf-gpt2", "hf-qwen3-tied")


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_every_optimizer_trains_every_model(optimizer):
    data = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "no hidden matrix" warning: every model's matrices were found
            warnings.filterwarnings("ignore", message="ASM: .* fused q/k/v")  # expected on GPT-2's c_attn
            opt = build(optimizer, model, total_steps=12)  # its registered default lr
        losses = []
        for _ in range(12):
            loss = nn.functional.cross_entropy(logits(model, data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert all(math.isfinite(x) for x in losses), (name, losses)
        assert losses[-1] < losses[0] - 0.2, (name, optimizer, losses[0], losses[-1])


def test_a_model_whose_matrices_cannot_be_found_warns():
    class Opaque(nn.Module):  # raw parameters, no Linear: nothing a matrix optimizer can recognise
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

    with pytest.warns(UserWarning, match="no parameter of this model was recognised as a hidden matrix"):
        build("muon", Opaque())


def test_hf_trainer_with_an_lmopt_optimizer(tmp_path):
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = hf_qwen3(tied=True)
    data = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(2))
    dataset = [{"input_ids": row, "labels": row} for row in data]
    optimizer = build("spectra", model, lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                          logging_steps=4, report_to=[], use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, schedule))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
