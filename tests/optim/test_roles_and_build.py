import pytest
import torch

from lmopt.data import BatchLoader, eval_batches, load_prepared
from lmopt.model import Qwen3, Qwen3Config, build_model, get_preset
from lmopt.optim import OptionError, build, matrix_param_groups, param_roles
from lmopt.registry import OPTIMIZERS, PRESETS, UnknownNameError
from tests.optim.infos import impl_in_use
from tests.optim.test_battery import batch, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_ROLE = {
    "embed_tokens.weight": "embedding",
    "norm.weight": "norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_o",
    "self_attn.q_norm.weight": "norm",
    "self_attn.k_norm.weight": "norm",
    "input_layernorm.weight": "norm",
    "post_attention_layernorm.weight": "norm",
    "mlp.gate_proj.weight": "mlp",
    "mlp.up_proj.weight": "mlp",
    "mlp.down_proj.weight": "mlp",
    "lm_head.weight": "head",
}


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_parameter_of_every_preset_has_its_role(name):
    with torch.device("meta"):
        model = Qwen3(get_preset(name).config)
    roles = param_roles(model)
    assert set(roles) == {n for n, _ in model.named_parameters()}
    for param_name, role in roles.items():
        key = param_name.split(".", 2)[-1] if param_name.startswith("layers.") else param_name
        assert role == EXPECTED_ROLE[key], param_name


def test_untied_head_and_custom_modules():
    with torch.device("meta"):
        model = Qwen3(Qwen3Config(vocab_size=32, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                                  mlp_dim=16, tie_embeddings=False))
    assert param_roles(model)["lm_head.weight"] == "head"
    custom = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    # by structure: the Linear is a hidden matrix (its output size is not the vocabulary's 5), its bias "other"
    assert param_roles(custom) == {"0.weight": "embedding", "1.weight": "norm", "1.bias": "norm",
                                   "2.weight": "mlp", "2.bias": "other"}
    head = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5))
    assert param_roles(head)["1.weight"] == "head"
    # name rules override the structure
    assert param_roles(custom, rules=[(r"^2\.weight$", "attn_v")])["2.weight"] == "attn_v"


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_build_places_every_parameter_in_exactly_one_group(name):
    model = toy_model()
    opt = build(name, model, total_steps=10)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    for group in opt.param_groups:
        if group["role"] in ("embedding", "norm"):
            assert group["weight_decay"] == 0.0
    if OPTIMIZERS.get(name).kind == "matrix":
        for group in opt.param_groups:
            assert group["matrix"] == (group["role"] in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp"))


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_the_registry_entry_describes_what_build_makes(name):
    """What ``lmopt optimizers`` prints from the registry (summary, defaults, impls, state bytes) is what
    ``build`` makes."""
    spec = OPTIMIZERS.get(name)
    assert OPTIMIZERS.entry(name).summary == spec.summary != "" and spec.source
    if spec.impls:  # the first implementation is the default one
        assert spec.defaults["impl"] == spec.impls[0]
    else:
        assert "impl" not in spec.defaults
    model = toy_model()
    opt = build(name, model, total_steps=10)
    assert opt.defaults["lr"] == spec.default_lr
    assert max(g["weight_decay"] for g in opt.param_groups) == spec.default_weight_decay
    for key, value in spec.defaults.items():
        if key == "impl":
            assert impl_in_use(opt) == value
        elif key in opt.defaults:  # options the class keeps under their own name (not ASM's q/k overrides)
            assert opt.defaults[key] == value, key
    # state bytes per parameter, on the tensors the optimizer steps itself (a matrix optimizer's hidden matrices)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    owned = [p for g in opt.param_groups if g.get("matrix", True) for p in g["params"]]
    state_bytes = sum(t.numel() * t.element_size() for p in owned for t in opt.state[p].values()
                      if torch.is_tensor(t) and t.dim() > 0)
    assert state_bytes / sum(p.numel() for p in owned) == pytest.approx(spec.state_bytes_per_param, abs=0.5)


def test_a_name_registers_once():
    spec = OPTIMIZERS.get("adamw")
    with pytest.raises(ValueError, match="registered twice"):
        OPTIMIZERS.register("adamw", spec, spec.summary)


def test_matrix_groups_hold_only_hidden_matrices():
    groups = matrix_param_groups(toy_model(), 0.1)
    for g in groups:
        assert all(p.dim() == 2 for p in g["params"]) or not g["matrix"]
    assert {g["role"] for g in groups if not g["matrix"]} == {"embedding", "norm"}


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("adamw", {"beta": 0.9}, r"unknown option\(s\) beta for optimizer 'adamw'; valid options: betas="),
        ("adamw", {"betas": (0.9, 1.0)}, r"Invalid betas\[1\]: 1.0 must lie in \[0, 1\)"),
        ("muon", {"momentum": 1.5}, r"Invalid momentum: 1.5"),
        ("spectra", {"shaping": "soft"}, "Invalid shaping 'soft'; choose one of clip, remove, scale"),
        ("spectra", {"rank_fraction": 0.0}, "Invalid rank_fraction"),
        ("msam", {"stability": "entropy"}, "Invalid stability"),
        ("msam", {"gamma_from": "later"}, "Invalid gamma_from"),
        ("adamw", {"impl": "cuda"}, "Invalid impl"),
        ("adafactor", {"impl": "cuda"}, "Invalid impl: 'cuda'; choose one of 'foreach', 'for-loop'"),
        ("lamb", {"eps": 0.0}, "Invalid eps"),
        ("adafactor", {"beta2_decay": 0.5}, r"Invalid beta2_decay: 0.5 must be <= 0"),
        ("spectra", {"momentum": -0.1}, r"Invalid momentum: -0.1 must lie in \[0, 1\)"),
    ],
)
def test_bad_options_fail_with_the_valid_ones(name, options, message):
    with pytest.raises((OptionError, ValueError), match=message):
        build(name, toy_model(), total_steps=10, **options)


def test_a_decay_exponent_is_not_mistaken_for_an_averaging_coefficient():
    # Adafactor's beta2_decay is an exponent (beta2_t = 1 - t^beta2_decay, <= 0), not a beta in [0, 1)
    optimizer = build("adafactor", toy_model(), total_steps=10, beta2_decay=-0.5)
    assert optimizer.param_groups[0]["beta2_decay"] == -0.5


def test_unknown_optimizer_and_bad_lr():
    with pytest.raises(UnknownNameError, match="valid optimizers: adamw, adafactor"):
        build("adam", toy_model())
    with pytest.raises(OptionError, match="Invalid lr"):
        build("adamw", toy_model(), lr=-1.0)


@pytest.mark.parametrize(("name", "impls"), [("adamw", ("fused", "foreach", "for-loop")),
                                             ("asm", ("fused", "foreach", "for-loop")),
                                             ("adafactor", ("foreach", "for-loop"))])
def test_multi_tensor_paths_agree_with_the_for_loop(name, impls):
    results = {}
    for impl in impls:
        model = toy_model()
        opt = build(name, model, impl=impl)
        for step in range(5):
            x, y = batch(step)
            opt.zero_grad()
            model(x, y)[1].backward()
            opt.step()
        results[impl] = [p.detach() for p in model.parameters()]
    for impl in impls[:-1]:
        for a, b in zip(results[impl], results["for-loop"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


LOSS_TEST_LR = {"lamb": 2e-2, "adafactor": 2e-2}


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_each_optimizer_lowers_the_loss_on_real_text(name):
    """A small Qwen3 on the Brown corpus: 150 steps must take the validation loss well below ln(8192)."""
    data = load_prepared("brown", "bpe-8192")
    cfg = Qwen3Config(vocab_size=8192, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, mlp_dim=128)
    model = build_model(cfg, seed=0)
    steps = 150
    opt = build(name, model, lr=LOSS_TEST_LR.get(name, 1e-2), total_steps=steps)
    loader = BatchLoader(data.train, seq_len=32, batch_size=8, seed=0)  # 8 x 32 tokens: every drop >= 1.6 nats
    val = list(eval_batches(data.val, 32, 16, max_tokens=32 * 64))

    def val_loss():
        with torch.no_grad():
            return sum(model(x, y)[1].item() for x, y in val) / len(val)

    start = val_loss()
    for _ in range(steps):
        x, y = loader.next_batch()
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    end = val_loss()
    assert end < start - 1.5, f"{name}: {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_each_optimizers_defaults_are_written_once_in_its_class(name):
    """The registry reads lr, weight decay and options from the class signature: both sides always agree, and a
    class constructed with no arguments has the settings `build` uses."""
    from lmopt.optim.spec import signature_defaults

    spec = OPTIMIZERS.get(name)
    assert spec.cls is not None, f"{name} is registered without its class"
    signature = signature_defaults(spec.cls)
    assert spec.default_lr == signature.pop("lr") and spec.default_weight_decay == signature.pop("weight_decay")
    assert dict(spec.defaults) == signature
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    built = build(name, model, total_steps=10)
    params = [p for p in model.parameters() if p.dim() == 2] if spec.kind == "matrix" else model.parameters()
    direct = spec.cls(params, **({"total_steps": 10} if spec.needs_total_steps else {}))
    shared = set(built.defaults) & set(direct.defaults)
    assert "lr" in shared
    assert {k: built.defaults[k] for k in shared} == {k: direct.defaults[k] for k in shared}


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS.names() if OPTIMIZERS.get(n).kind == "matrix"])
def test_a_matrix_optimizer_given_every_parameter_refuses_and_one_given_an_embedding_warns(name):
    cls = OPTIMIZERS.get(name).cls
    model = torch.nn.Sequential(torch.nn.Embedding(2000, 32), torch.nn.Linear(32, 32), torch.nn.LayerNorm(32))
    with pytest.raises(ValueError, match=r"2-D matrices only.*lmopt.optim.build"):
        cls(model.parameters())
    with pytest.warns(UserWarning, match=r"\(2000, 32\)\] look like an embedding"):
        cls([p for p in model.parameters() if p.dim() == 2])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls([model[1].weight])  # the hidden matrix alone: silent
        build(name, model)  # the split: the embedding and the norm go to the AdamW part, silently
