"""The generic battery: every registered optimizer, every implementation it declares (tests/optim/infos.py), in
the manner of torch's OptimizerInfo tests. Equalities are bitwise unless said otherwise: the runs compared do the
same arithmetic in the same order, so any difference is a bug, not rounding."""

import copy
import pickle

import pytest
import torch

from lmopt.model import Qwen3Config, build_model
from lmopt.optim import build, param_roles
from lmopt.registry import OPTIMIZERS
from tests.optim import infos as info
from tests.optim.infos import CASE_IDS, CASES, Battery

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the toy Qwen3 and its helpers, used by test_papers.py, test_elementwise.py and test_roles_and_build.py --------

NAMES = OPTIMIZERS.names()
TOY = Qwen3Config(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32)


def toy_model(seed=0, dtype=torch.float32):
    return build_model(TOY, seed=seed).to(dtype)


def batch(step, n=4, t=12):
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, TOY.vocab_size, (n, t + 1), generator=gen)
    return idx[:, :-1], idx[:, 1:]


def make(name, model, **kw):
    return build(name, model, lr=kw.pop("lr", 1e-2), total_steps=20, **kw)


def run(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# --- the battery ---------------------------------------------------------------------------------------------------

cases = pytest.mark.parametrize(("name", "impl"), CASES, ids=CASE_IDS)


def fixture(name, impl, **kw):
    model = Battery()
    return model, info.make(name, impl, model, **kw)


def test_every_registered_optimizer_and_implementation_is_a_case():
    for name in NAMES:
        impls = OPTIMIZERS.get(name).impls or (None,)
        assert [(n, i) for n, i in CASES if n == name] == [(name, i) for i in impls]
    assert len(CASES) >= len(NAMES)


def test_the_fixture_has_the_roles_it_claims():
    assert param_roles(Battery()) == info.FIXTURE_ROLES
    assert list(param_roles(Battery(with_mlp=False))) == list(info.FIXTURE_ROLES)[:3]


@cases
def test_the_implementation_asked_for_is_the_one_that_runs(name, impl):
    model, opt = fixture(name, impl)
    info.train(opt, list(model.parameters()), range(2))
    assert info.impl_in_use(opt) == impl  # a compiled path that fell back to eager would say "for-loop" here


@cases
def test_step_with_closure_returns_the_loss_and_uses_its_gradients(name, impl):
    model, opt = fixture(name, impl)
    ps = list(model.parameters())
    expected_model, expected_opt = fixture(name, impl)
    calls = []
    for step in range(3):
        with torch.no_grad():  # the loss at the parameters the step starts from
            expected_loss = sum((p * info.synthetic(step, tuple(p.shape))).sum() + 0.25 * p.square().sum()
                                for p in ps).item()
        loss = opt.step(info.closure_for(ps, step, calls))
        assert torch.is_tensor(loss) and loss.requires_grad  # the closure's own return value, with its graph
        assert loss.item() == expected_loss
        info.train(expected_opt, list(expected_model.parameters()), range(step, step + 1))
    assert calls == [True, True, True]  # once per step, with gradients enabled
    info.assert_equal(info.snapshot(ps), info.snapshot(expected_model.parameters()))


@cases
def test_step_pre_and_post_hooks_run_once_per_step(name, impl):
    model, opt = fixture(name, impl)
    # torch wraps a class's step with the hook runner when the class is first instantiated: instantiate every
    # torch.optim base class first, so that an lmopt subclass calling a wrapped base step would run hooks twice
    for cls in type(opt).__mro__[1:]:
        if cls.__module__.startswith("torch.optim") and cls is not torch.optim.Optimizer:
            cls([torch.nn.Parameter(torch.zeros(2))])
    ps = list(model.parameters())
    seen = []

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        seen.append(("pre", [p.detach().clone() for p in ps]))

    def post(optimizer, args, kwargs):
        assert optimizer is opt
        seen.append(("post", [p.detach().clone() for p in ps]))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    before = info.snapshot(ps)
    info.train(opt, ps, range(1))
    assert [kind for kind, _ in seen] == ["pre", "post"]
    info.assert_equal(seen[0][1], before)  # the pre-hook sees the parameters before the update
    info.assert_equal(seen[1][1], info.snapshot(ps))  # the post-hook after it
    assert any(not torch.equal(a, b) for a, b in zip(before, ps, strict=True))
    for handle in handles:
        handle.remove()
    info.train(opt, ps, range(1, 2))
    assert len(seen) == 2


@cases
def test_zero_grad_set_to_none_or_to_zeros(name, impl):
    model, opt = fixture(name, impl)
    ps = list(model.parameters())
    info.train(opt, ps, range(2))
    grads = [p.grad for p in ps]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(ps, grads, strict=True))  # zeroed in place
    opt.zero_grad()  # set_to_none=True is torch's default
    assert all(p.grad is None for p in ps)
    before, states = info.snapshot(ps), [info.state_snapshot(opt, p) for p in ps]
    opt.step()  # no gradient anywhere: nothing moves, no state advances
    info.assert_equal(info.snapshot(ps), before)
    for p, state in zip(ps, states, strict=True):
        info.assert_state_equal(info.state_snapshot(opt, p), state)


@cases
def test_zero_gradients_only_decay_the_weights(name, impl):
    # From a fresh state, g = 0 gives no update beyond weight decay: each tensor is only rescaled, W' = c W with
    # 0 < c <= 1, and stays finite (a 0/0 in a normalisation would show here).
    model, opt = fixture(name, impl)
    ps = list(model.parameters())
    before = info.snapshot(ps)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    for new, old in zip(ps, before, strict=True):
        assert torch.isfinite(new).all()
        c = (new.detach() * old).sum() / old.square().sum()
        assert 0 < c <= 1
        torch.testing.assert_close(new.detach(), c * old, rtol=0, atol=1e-6)


@cases
def test_lr_zero_leaves_parameters_unchanged(name, impl):
    model, opt = fixture(name, impl, lr=0.0)
    ps = list(model.parameters())
    before = info.snapshot(ps)
    info.train(opt, ps, range(3))
    info.assert_equal(info.snapshot(ps), before)


@cases
def test_same_seed_gives_bit_identical_results(name, impl):
    results = []
    for _ in range(2):
        model, opt = fixture(name, impl)
        info.train(opt, list(model.parameters()), range(4))
        results.append(info.snapshot(model.parameters()))
    info.assert_equal(*results)


@cases
def test_per_group_lr_scales_the_first_update_and_is_kept_per_group(name, impl):
    runs = {}
    for label, q_lr in (("base", info.LR), ("double q", 2 * info.LR)):
        model, opt = fixture(name, impl)
        q_group = info.group_of(opt, model.self_attn.q_proj.weight)
        q_group["lr"] *= q_lr / info.LR  # a scheduler's way: the group's own lr (ASM's q group keeps its x7/6)
        ps = list(model.parameters())
        before = info.snapshot(ps)
        info.train(opt, ps, range(1))
        runs[label] = [new - old for new, old in zip(info.snapshot(ps), before, strict=True)]
    base, double = runs["base"], runs["double q"]
    # every registered update is linear in the lr at the first step (Adafactor's min(lr, 1/sqrt(t)) = lr here)
    # (updates are differences of fp32 weights of size ~1: each carries up to one ulp, 1.2e-7, of rounding)
    torch.testing.assert_close(double[1], 2 * base[1], rtol=1e-5, atol=5e-7)
    assert base[1].abs().max() > 0
    info.assert_equal([double[i] for i in (0, 2, 3)], [base[i] for i in (0, 2, 3)], msg="other groups")


@cases
def test_per_group_lr_over_several_steps_equals_that_lr_everywhere(name, impl):
    def trajectory(q_factor, all_factor):
        model, opt = fixture(name, impl)
        for g in opt.param_groups:
            g["lr"] *= all_factor
        info.group_of(opt, model.self_attn.q_proj.weight)["lr"] *= q_factor
        info.train(opt, list(model.parameters()), range(4))
        return info.snapshot(model.parameters())

    mixed, base, everywhere = trajectory(3.0, 1.0), trajectory(1.0, 1.0), trajectory(1.0, 3.0)
    assert torch.equal(mixed[1], everywhere[1])
    info.assert_equal([mixed[i] for i in (0, 2, 3)], [base[i] for i in (0, 2, 3)])


@cases
def test_per_group_betas_are_honoured(name, impl):
    # The fixture gives the attn_q and norm groups their own betas (momentum for Muon and Spectra, beta2_decay
    # for Adafactor); they must follow them, and only them.
    def trajectory(altered_roles, impl_):
        model = Battery()
        opt = info.make(name, impl_, model, altered=False)
        if altered_roles != ():
            info.alter_betas(opt, altered_roles)  # None: every group
        info.train(opt, list(model.parameters()), range(4))
        return info.snapshot(model.parameters())

    _, opt = fixture(name, impl)
    assert all(info.beta_keys(g) for g in opt.param_groups if g.get("role") in info.ALTERED_ROLES), \
        "the optimizer has no beta-like hyper-parameter in its groups (rename or extend tests/optim/infos.beta_keys)"
    reference_impl = info.eager_counterpart(name, impl)
    mixed = trajectory(info.ALTERED_ROLES, impl)
    if info.uses_compiler(impl):  # the compiled path honours per-group betas as its eager counterpart does
        info.assert_equal(mixed, trajectory(info.ALTERED_ROLES, reference_impl), atol=1e-5)
        return
    plain, everywhere = trajectory((), impl), trajectory(None, impl)
    altered = [1, 2]  # q_proj and norm, in the fixture's parameter order
    info.assert_equal([mixed[i] for i in altered], [everywhere[i] for i in altered], msg="altered groups")
    info.assert_equal([mixed[i] for i in (0, 3)], [plain[i] for i in (0, 3)], msg="other groups")
    assert not torch.equal(mixed[1], plain[1]) and not torch.equal(mixed[2], plain[2]), "betas had no effect"


@cases
def test_parameters_without_gradients_are_untouched_and_their_state_is_not_advanced(name, impl):
    model, opt = fixture(name, impl)
    ps = list(model.parameters())
    w = model.mlp_weight
    grad_steps = {2, 4}  # the MLP matrix has a gradient at steps 2 and 4 only, the others at every step
    skip = lambda step: () if step in grad_steps else (w,)  # noqa: E731
    start = w.detach().clone()
    info.train(opt, ps, range(2), skip)
    assert torch.equal(w, start) and len(opt.state[w]) == 0  # no state before its first gradient
    info.train(opt, ps, range(2, 3), skip)
    assert not torch.equal(w, start) and len(opt.state[w]) > 0
    held, state = w.detach().clone(), info.state_snapshot(opt, w)
    info.train(opt, ps, range(3, 4), skip)
    assert torch.equal(w, held)
    info.assert_state_equal(info.state_snapshot(opt, w), state)
    info.train(opt, ps, range(4, 6), skip)

    # The others move exactly as they do in an optimizer that never had the MLP matrix.
    alone = Battery(with_mlp=False)
    alone_opt = info.make(name, impl, alone)
    info.train(alone_opt, list(alone.parameters()), range(6))
    info.assert_equal(info.snapshot(ps[:3]), info.snapshot(alone.parameters()))


@cases
def test_add_param_group(name, impl):
    # Three steps on three tensors, then the MLP matrix joins as a new group of its own: the same as an optimizer
    # that had it from the start, with no gradient for three steps. The new group takes the defaults.
    late = Battery(with_mlp=False)
    late_opt = info.make(name, impl, late)
    info.train(late_opt, list(late.parameters()), range(3))
    w = torch.nn.Parameter(Battery().mlp_weight.detach().clone())
    late_opt.add_param_group({"params": [w], "role": "mlp", "weight_decay": info.WEIGHT_DECAY})
    info.train(late_opt, [*late.parameters(), w], range(3, 6))

    model, opt = fixture(name, impl)
    info.train(opt, list(model.parameters()), range(6), lambda step: (model.mlp_weight,) if step < 3 else ())
    info.assert_equal(info.snapshot([*late.parameters(), w]), info.snapshot(model.parameters()))
    info.assert_state_equal(info.state_snapshot(late_opt, w), info.state_snapshot(opt, model.mlp_weight))
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        late_opt.add_param_group({"params": [w]})


@cases
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_as_the_original(name, impl, how):
    model, opt = fixture(name, impl)
    ps = list(model.parameters())
    info.train(opt, ps, range(2))
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_ps = [p for g in twin.param_groups for p in g["params"]]
    order = [p for g in opt.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(twin_ps, order, strict=True))  # its own parameters and state
    info.assert_equal(info.snapshot(twin_ps), info.snapshot(order))
    info.train(opt, order, range(2, 5))
    info.train(twin, twin_ps, range(2, 5))
    assert info.impl_in_use(twin) == info.impl_in_use(opt)
    info.assert_equal(info.snapshot(twin_ps), info.snapshot(order))
    for a, b in zip(twin_ps, order, strict=True):
        info.assert_state_equal(info.state_snapshot(twin, a), info.state_snapshot(opt, b))


@cases
def test_state_dict_into_a_fresh_optimizer_continues_as_uninterrupted_training(name, impl):
    model, opt = fixture(name, impl)
    info.train(opt, list(model.parameters()), range(6))
    expected = info.snapshot(model.parameters())

    first, first_opt = fixture(name, impl)
    info.train(first_opt, list(first.parameters()), range(3))
    saved = info.through_bytes(first_opt.state_dict())
    weights = info.through_bytes(first.state_dict())
    del first, first_opt  # nothing of the first run is used below: a new process could do the rest

    resumed = Battery(seed=123)
    resumed.load_state_dict(weights)
    fresh = info.make(name, impl, resumed, altered=False)  # the saved groups' own betas come from the state_dict
    fresh.load_state_dict(saved)
    assert [info.beta_keys(g) and {k: g[k] for k in info.beta_keys(g)} for g in fresh.param_groups] == \
        [info.beta_keys(g) and {k: g[k] for k in info.beta_keys(g)} for g in opt.param_groups]
    info.train(fresh, list(resumed.parameters()), range(3, 6))
    info.assert_equal(info.snapshot(resumed.parameters()), expected)


@cases
def test_sparse_gradients_are_refused_before_anything_changes(name, impl):
    model, opt = fixture(name, impl)
    ps = list(model.parameters())
    info.train(opt, ps, range(1))
    info.set_grads(ps, 1)
    embedding = model.embed_tokens.weight  # where sparse gradients come from (nn.Embedding(sparse=True))
    embedding.grad = embedding.grad.to_sparse()
    before, states = info.snapshot(ps), [info.state_snapshot(opt, p) for p in ps]
    with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"):
        opt.step()
    info.assert_equal(info.snapshot(ps), before)
    for p, state in zip(ps, states, strict=True):
        info.assert_state_equal(info.state_snapshot(opt, p), state)


@cases
def test_complex_parameters_are_refused(name, impl):
    model = Battery(dtype=torch.complex64)
    opt = info.make(name, impl, model)
    ps = list(model.parameters())
    before = info.snapshot(ps)
    info.set_grads(ps, 0)
    with pytest.raises((RuntimeError, ValueError), match="(?i)complex"):
        opt.step()
    info.assert_equal(info.snapshot(ps), before)
