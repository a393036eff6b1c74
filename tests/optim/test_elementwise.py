"""The compiled path of the per-tensor optimizers: the same updates as the eager path, the same state layout,
and a clear fallback where torch.compile cannot run."""

import copy
import warnings

import pytest
import torch

from lmopt.optim import build
from lmopt.optim.elementwise import ElementwiseOptimizer
from lmopt.optim.lamb import LAMB
from lmopt.optim.spec import OptionError
from lmopt.registry import OPTIMIZERS
from tests.optim import infos as info
from tests.optim.infos import Battery
from tests.optim.test_battery import make, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")

ELEMENTWISE = [name for name in OPTIMIZERS.names() if isinstance(make(name, toy_model()), ElementwiseOptimizer)]
COMPILED = [name for name in OPTIMIZERS.names() if "compiled" in OPTIMIZERS.get(name).impls]


def test_the_per_tensor_optimizers_are_elementwise_optimizers():
    assert set(ELEMENTWISE) == {"lamb", "stable-adamw", "ortho-adam", "asa", "msam", "amcs"}


def test_every_per_tensor_optimizer_has_a_compiled_path():
    assert set(ELEMENTWISE) | {"adafactor"} == set(COMPILED)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_matches_eager_and_checkpoints_move_between_them(name):
    # Tolerance: Inductor fuses each tensor's chain and may reorder fp32 arithmetic (e.g. FMA), so results
    # differ from eager by a few ulps per step; 6 steps at lr 1e-2 on O(1) weights stay within 1e-5.
    # The model is the battery's fixture (tests/optim/infos.py), whose two layouts the battery compiles anyway.
    # Both paths run the same update function, so this cannot catch a bug in it: test_references.py does.
    eager_impl = info.eager_counterpart(name, "compiled")
    eager_model, compiled_model = Battery(), Battery()
    eager = info.make(name, eager_impl, eager_model)
    compiled = info.make(name, "compiled", compiled_model)
    info.train(eager, list(eager_model.parameters()), range(4))
    info.train(compiled, list(compiled_model.parameters()), range(4))
    assert compiled.impl == "compiled"
    info.assert_equal(info.snapshot(compiled_model.parameters()), info.snapshot(eager_model.parameters()), atol=1e-5)
    # the compiled optimizer's state continues under eager exactly as the compiled one does (within the same
    # tolerance), so the state layout is shared
    resumed_model = copy.deepcopy(compiled_model)
    resumed = info.make(name, eager_impl, resumed_model, altered=False)
    resumed.load_state_dict(copy.deepcopy(compiled.state_dict()))
    info.train(compiled, list(compiled_model.parameters()), range(4, 6))
    info.train(resumed, list(resumed_model.parameters()), range(4, 6))
    assert info.impl_in_use(resumed) == eager_impl
    info.assert_equal(info.snapshot(resumed_model.parameters()), info.snapshot(compiled_model.parameters()),
                      atol=1e-5)


def test_unknown_impl_is_refused_before_training():
    with pytest.raises(ValueError, match="Invalid impl: 'fast'"):
        build("lamb", toy_model(), impl="fast")


def test_without_a_working_compiler_the_step_warns_and_runs_eagerly():
    torch.manual_seed(0)
    weights = [torch.randn(7, 13), torch.randn(13)]  # shapes no other test compiles
    reference = [w.clone() for w in weights]
    grads = [torch.randn_like(w) for w in weights]
    for w, ref, g in zip(weights, reference, grads, strict=True):
        w.grad, ref.grad = g.clone(), g.clone()
    compiled, eager = LAMB(weights, lr=1e-2, impl="compiled"), LAMB(reference, lr=1e-2)
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False})
    with no_compiler, pytest.warns(UserWarning, match=r"impl='compiled'\): torch.compile is unavailable"):
        compiled.step()
    eager.step()
    assert compiled.impl == "for-loop"
    for w, ref in zip(weights, reference, strict=True):
        assert torch.equal(w, ref)


def test_past_the_compile_limit_the_step_says_so_and_runs_eagerly(monkeypatch):
    # A limit hit must never be silent: torch.compile's own default would run the step uncompiled without a word.
    from lmopt.optim import elementwise

    monkeypatch.setattr(elementwise, "RECOMPILE_LIMIT", 1)
    torch.manual_seed(1)
    for shape in [(5, 11), (6, 11)]:  # two new layouts: at least the second is over a limit of one
        weight = torch.randn(shape)
        reference = weight.clone()
        weight.grad = reference.grad = torch.randn(shape)
        compiled, eager = LAMB([weight], lr=1e-2, impl="compiled"), LAMB([reference], lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled.step()
        eager.step()
    assert compiled.impl == "for-loop" and any("unavailable here" in str(w.message) for w in caught)
    assert torch.equal(weight, reference)  # the fallback ran the eager update


# options with their own arithmetic inside the compiled graph (the references check eager): OrthoAdam's Kronecker
# rotation (a reshape and two small products), MSAM's stability sums carried from step to step as a small state
# tensor; each with what its state must show after the steps
COMPILED_OPTIONS = {
    "ortho-adam-kronecker": ("ortho-adam", {"rotation": "kronecker"},
                             lambda opt, params: any(len(f) == 2 for f in opt._rotations.values())),
    "ortho-adam-bf16-rotation": ("ortho-adam", {"rotation_dtype": "bfloat16"},
                                 lambda opt, params: all(f.dtype == torch.bfloat16 and p.dtype == torch.float32
                                                         for fs in opt._rotations.values() for f in fs
                                                         for p in params)),
    "lamb-trust-previous": ("lamb", {"trust_from": "previous"},  # the previous step's norms in a (2,) state tensor
                            lambda opt, params: all(opt.state[p]["trust_norms"][1] > 0 for p in params)),
    "msam-gamma-current": ("msam", {"gamma_from": "current"},  # γ from this step: no sums carried over
                           lambda opt, params: all("stability_sums" not in opt.state[p] for p in params)),
}


@pytest.mark.parametrize("case", COMPILED_OPTIONS)
def test_options_compile_to_the_eager_result(case):
    name, options, state_check = COMPILED_OPTIONS[case]
    eager_model, compiled_model = Battery(), Battery()
    eager = info.make(name, "for-loop", eager_model, **options)
    compiled = info.make(name, "compiled", compiled_model, **options)
    info.train(eager, list(eager_model.parameters()), range(4))
    info.train(compiled, list(compiled_model.parameters()), range(4))
    assert compiled.impl == "compiled" and state_check(compiled, list(compiled_model.parameters()))
    info.assert_equal(info.snapshot(compiled_model.parameters()), info.snapshot(eager_model.parameters()), atol=1e-5)


def test_ortho_adam_rotates_in_bf16_within_bf16_rounding_and_auto_follows_the_device():
    """rotation_dtype="bfloat16": the products in bf16, the moments and parameters in fp32. Adam's direction
    normalises each rotated coordinate, so bf16's rounding (~4e-3 of a row's norm) flips the sign of the few
    coordinates near zero: after 3 steps of one gradient the parameters differ from the fp32 rotation's by 9.5%
    relative (measured), the size of bf16 Newton–Schulz's distance to its exact iteration (2e-2 to 2e-1,
    test_newton_schulz.py); the loss effect is measured by a cpu-full variant. "auto" is bf16 exactly where
    Muon's Newton–Schulz is, for fp32 parameters."""
    from lmopt.optim.kernels import fast_matmul_dtype
    from lmopt.optim.ortho_adam import rotation_dtype_for

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, 48, generator=gen)
    steps = {}
    for dtype in ("param", "bfloat16"):
        w = torch.nn.Parameter(torch.zeros(64, 48))
        opt = OPTIMIZERS.get("ortho-adam").cls([w], lr=1.0, weight_decay=0.0, rotation_dtype=dtype)
        for _ in range(3):
            w.grad = g.clone()
            opt.step()
        steps[dtype] = w.detach().clone()
    assert steps["bfloat16"].dtype == torch.float32 and not torch.equal(steps["bfloat16"], steps["param"])
    assert 1e-3 < (steps["bfloat16"] - steps["param"]).norm() / steps["param"].norm() < 0.2
    cpu = torch.device("cpu")
    assert rotation_dtype_for("auto", torch.float32, cpu) == fast_matmul_dtype(cpu)
    assert rotation_dtype_for("auto", torch.float64, cpu) == torch.float64  # tests' precision is kept
    assert rotation_dtype_for("param", torch.float32, cpu) == torch.float32
    with pytest.raises(OptionError, match="rotation_dtype"):
        OPTIMIZERS.get("ortho-adam").cls([torch.nn.Parameter(torch.zeros(4, 4))], rotation_dtype="fp8")


def test_adafactor_fused_kernels_match_torch_in_float32_and_fall_back_where_they_cannot_build(monkeypatch):
    # float32 sums in a different order (per row, then blocks of 256 rows) than torch's reductions: a few ulps
    torch_model, fused_model = Battery(), Battery()
    reference = info.make("adafactor", "foreach", torch_model)
    fused = info.make("adafactor", "fused", fused_model)
    assert fused.impl == "fused"
    info.train(reference, list(torch_model.parameters()), range(6))
    info.train(fused, list(fused_model.parameters()), range(6))
    info.assert_equal(info.snapshot(fused_model.parameters()), info.snapshot(torch_model.parameters()), atol=1e-5)

    from lmopt.optim import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    with pytest.warns(UserWarning, match="Adafactor\\(impl='fused'\\): the C\\+\\+ kernels cannot be built"):
        fallback = info.make("adafactor", "fused", Battery())
    assert fallback.impl == "compiled"


FOREACH = [name for name in ELEMENTWISE if "foreach" in OPTIMIZERS.get(name).impls]


def test_every_per_tensor_optimizer_but_ortho_adam_has_a_multi_tensor_path():
    assert set(FOREACH) == set(ELEMENTWISE) - {"ortho-adam"}


@pytest.mark.parametrize("name", FOREACH)
def test_foreach_takes_what_it_can_and_leaves_the_rest_to_the_loop(name):
    """impl "foreach" over groups with different hyper-parameters and roles (ASA's power iterations on the
    attention group's matrices), a second step count (a parameter that joined
    later), fp64 and bf16 parameters beside fp32 ones (each dtype its own set of calls; MSAM leaves bf16 to the
    loop) and, for LAMB, a group trusting the previous step (left to the loop), for MSAM one measuring γ on this
    step: the for-loop's weights and state after several steps, within
    fp32 rounding (bf16: within one bf16 step, the two orders of its rounded intermediates)."""
    results = {}
    for impl in ("for-loop", "foreach"):
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((8, 6), (6,), (4, 4), (5, 3), (7,))]
        double = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
        low = torch.nn.Parameter(torch.randn(6, 4).bfloat16())
        late = torch.nn.Parameter(torch.randn(3, 3))
        groups = [{"params": [*weights[:2], double]},
                  {"params": weights[2:4], "lr": 5e-3, "weight_decay": 0.0, "role": "attn_q"},
                  {"params": [weights[4], low]}]
        extra = {"lamb": {"trust_from": "previous"}, "msam": {"gamma_from": "current"}}.get(name, {})
        spec = OPTIMIZERS.get(name)
        opt = spec.cls(groups, impl=impl, **({"total_steps": 20} if spec.needs_total_steps else {}))
        opt.add_param_group({"params": [late], **extra})
        everything = [*weights, double, low, late]
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            for p in everything:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            if step < 2:
                late.grad = None  # joins at the third step: its step count differs from the others'
            opt.step()
        results[impl] = (opt, [p.detach().clone() for p in everything])
    assert results["foreach"][0].impl == "foreach"
    for a, b in zip(results["foreach"][1], results["for-loop"][1], strict=True):
        bf16 = a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=1e-2 if bf16 else 1e-6, rtol=2**-7 if bf16 else 1e-5)
    state = {impl: opt.state_dict()["state"] for impl, (opt, _) in results.items()}
    for key, value in state["for-loop"].items():
        for field, tensor in value.items():
            bf16 = isinstance(tensor, torch.Tensor) and tensor.dtype == torch.bfloat16
            torch.testing.assert_close(state["foreach"][key][field], tensor, atol=1e-2 if bf16 else 1e-6,
                                       rtol=2**-7 if bf16 else 1e-5)
