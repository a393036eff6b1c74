"""What the registry knows about an optimizer, and how options are checked before anything runs."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lmopt.optim.roles import role_param_groups
from lmopt.registry import OPTIMIZERS, UnknownNameError


class OptionError(ValueError):
    """An unknown optimizer option or an invalid value; the message lists the valid options."""


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    summary: str
    source: str
    # builder(model, lr, weight_decay, **options) -> Optimizer, with role-aware parameter groups
    builder: Callable[..., Optimizer]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_lr: float = 1e-3
    default_weight_decay: float = 0.1
    state_bytes_per_param: float = 8.0  # fp32 state per parameter, on the matrices it owns
    kind: str = "elementwise"  # "elementwise" or "matrix"
    needs_total_steps: bool = False  # the builder takes total_steps (the trainer passes the run's length)
    impls: tuple[str, ...] = ()  # implementations of the same update (option ``impl``); the first is the default
    cls: type[Optimizer] | None = None  # the class whose signature the defaults were read from (see class_spec)
    # options that take more than one form (e.g. Muon's ns_coefficients: a triple, a schedule or a name): the
    # class checks their values itself, so they are not held to their default's type here
    own_checks: tuple[str, ...] = ()


_NOT_OPTIONS = ("self", "params", "lr", "weight_decay", "total_steps")
_OPTION_TYPES = (bool, int, float, str, tuple, list)


def signature_defaults(cls: type[Optimizer]) -> dict[str, Any]:
    """The keyword defaults of ``cls.__init__`` (``lr``, ``weight_decay`` and ``total_steps`` included when they
    have one); parameters without a default, ``*args``/``**kwargs`` and non-literal defaults are left out."""
    out = {}
    for key, p in inspect.signature(cls.__init__).parameters.items():
        if key in ("self", "params") or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        if p.default is not inspect.Parameter.empty and isinstance(p.default, _OPTION_TYPES):
            out[key] = p.default
    return out


def class_spec(cls: type[Optimizer], name: str, summary: str = "", source: str = "",
               groups: Callable[..., list[dict]] | None = None, **fields: Any) -> OptimizerSpec:
    """The :class:`OptimizerSpec` of an optimizer class: its defaults, default lr and weight decay are read from
    the class signature, so they are written once (in the class) and the registry cannot disagree with it.

    The builder is ``cls(groups(model, weight_decay), lr=..., weight_decay=..., **options)`` with ``groups``
    :func:`lmopt.optim.roles.role_param_groups` unless given (matrix optimizers pass
    :func:`lmopt.optim.matrix.matrix_param_groups`); a class without a ``weight_decay`` parameter still gets the
    groups' per-role weight decay, and one with ``total_steps`` gets the run's length. ``fields`` are the other
    :class:`OptimizerSpec` fields (``state_bytes_per_param``, ``kind``, ``impls``).
    """
    defaults = signature_defaults(cls)
    parameters = inspect.signature(cls.__init__).parameters
    takes_wd = "weight_decay" in parameters
    make_groups = groups or role_param_groups

    def builder(model: nn.Module, lr: float, weight_decay: float, **options: Any) -> Optimizer:
        extra = {"weight_decay": weight_decay} if takes_wd else {}
        return cls(make_groups(model, weight_decay), lr=lr, **extra, **options)

    number = (int, float)
    lr, wd = defaults.pop("lr", None), defaults.pop("weight_decay", None)
    defaults.pop("total_steps", None)
    doc = (inspect.getdoc(cls) or "").split("\n")[0]
    return OptimizerSpec(
        name=name, summary=summary or doc or f"{cls.__module__}.{cls.__qualname__}",
        source=source or f"{cls.__module__}:{cls.__qualname__}", builder=builder, defaults=defaults,
        default_lr=lr if isinstance(lr, number) and not isinstance(lr, bool) else 1e-3,
        default_weight_decay=wd if isinstance(wd, number) and not isinstance(wd, bool) else 0.0,
        needs_total_steps="total_steps" in parameters, cls=cls, **fields,
    )


def register(spec: OptimizerSpec) -> OptimizerSpec:
    return OPTIMIZERS.register(spec.name, spec, spec.summary)


def register_class(cls: type[Optimizer], name: str, summary: str, source: str, **fields: Any) -> OptimizerSpec:
    """Register ``cls`` under ``name`` with :func:`class_spec` (its defaults read from its signature)."""
    return register(class_spec(cls, name, summary, source, **fields))


# averaging coefficients in [0, 1): beta1, betas, qk_beta1, momentum, ema_momentum; not Adafactor's beta2_decay
COEFFICIENT = re.compile(r"(\w+_)?(betas?\d*|momentum)")


def _check_value(name: str, value: Any, default: Any) -> None:
    numeric = (int, float)
    if isinstance(default, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(default, bool):
            raise OptionError(f"Invalid {name}: expected a boolean, got {value!r}")
        return
    if isinstance(default, numeric) and not isinstance(value, numeric):
        raise OptionError(f"Invalid {name}: expected a number, got {value!r}")
    if isinstance(default, tuple | list):
        if not isinstance(value, tuple | list) or len(value) != len(default):
            raise OptionError(f"Invalid {name}: expected {len(default)} values like {default!r}, got {value!r}")
        for i, (v, d) in enumerate(zip(value, default, strict=True)):
            _check_value(f"{name}[{i}]", v, d)
        return
    if isinstance(default, str) and not isinstance(value, str):
        raise OptionError(f"Invalid {name}: expected a string, got {value!r}")
    if isinstance(value, numeric):
        short = name.split("[")[0]
        if COEFFICIENT.fullmatch(short):
            if not 0.0 <= value < 1.0:
                raise OptionError(f"Invalid {name}: {value} must lie in [0, 1)")
        elif (short in ("eps", "lr", "weight_decay") or short.endswith(("_lr", "_scale"))) and (
            value < 0 or (short == "eps" and value == 0)
        ):
            raise OptionError(f"Invalid {name}: {value} must be {'positive' if short == 'eps' else 'non-negative'}")


def validate_options(spec: OptimizerSpec, options: Mapping[str, Any], choices: Mapping[str, tuple] = {}) -> dict:
    """Defaults overlaid with ``options``; unknown keys and bad values raise :class:`OptionError`."""
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "(none)"
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for optimizer {spec.name!r}; valid options: {valid}")
    merged = dict(spec.defaults)
    for key, value in options.items():
        if key not in spec.own_checks:
            _check_value(key, value, spec.defaults[key])
        if key in choices and value not in choices[key]:
            raise OptionError(f"Invalid {key}: {value!r}; choose one of {', '.join(map(repr, choices[key]))}")
        merged[key] = tuple(value) if isinstance(value, list) else value
    return merged


def build(name: str, model: nn.Module, lr: float | None = None, weight_decay: float | None = None,
          total_steps: int | None = None, verbose: bool = False, **options: Any) -> Optimizer:
    """The registered optimizer ``name`` over ``model``'s parameters, grouped by role.

    ``lr`` and ``weight_decay`` default to the optimizer's own defaults; ``options`` are checked against
    the registry entry (``lmopt optimizers`` lists them). ``total_steps`` is passed to optimizers whose
    update depends on the run's length (AMCS) and ignored by the others. ``verbose`` prints the split
    (:func:`split_table`). A matrix optimizer that receives no hidden matrix warns: the roles missed them.
    """
    optimizer = _build(name, model, lr, weight_decay, total_steps, **options)
    if OPTIMIZERS.get(name).kind == "matrix" and not any(g.get("matrix") and g["params"]
                                                          for g in optimizer.param_groups):
        warnings.warn(f"{name}: no parameter of this model was recognised as a hidden matrix, so every parameter "
                      "runs on the AdamW fallback; check lmopt.optim.split_table(optimizer, model) and pass role "
                      "rules (lmopt.optim.matrix_param_groups(model, wd, rules=...)) if the split is wrong",
                      stacklevel=2)
    if verbose:
        print(split_table(optimizer, model))
    return optimizer


def split_table(optimizer: Optimizer, model: nn.Module) -> str:
    """A Markdown table of how ``optimizer``'s groups split ``model``: role, shapes, parameter count, which
    update (matrix or elementwise), weight decay and the group's lr relative to the base lr (role scales an
    optimizer applies inside its step, e.g. AMCS's and ASA's, are in its docstring); tied parameters noted."""
    names = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    base_lr = optimizer.defaults.get("lr", 1.0) or 1.0
    rows = ["| role | parameters | shapes | count | update | weight decay | group lr / base lr |",
            "|---|---|---|---|---|---|---|"]
    for group in optimizer.param_groups:
        params = group["params"]
        if not params:
            continue
        shapes = sorted({tuple(p.shape) for p in params})
        shown = ", ".join("x".join(map(str, s)) for s in shapes[:3]) + (" ..." if len(shapes) > 3 else "")
        tied = [f"{names[id(p)]} (tied: {', '.join(aliases[id(p)][1:])})" for p in params if len(aliases[id(p)]) > 1]
        update = "matrix" if group.get("matrix") else ("AdamW fallback" if "matrix" in group else "elementwise")
        label = f"{len(params)}" + (f"; {'; '.join(tied)}" if tied else "")
        rows.append(f"| {group.get('role', '—')} | {label} | {shown} | {sum(p.numel() for p in params):,} | "
                    f"{update} | {group.get('weight_decay', 0.0):g} | {group.get('lr', base_lr) / base_lr:g} |")
    return "\n".join(rows)


def _build(name: str, model: nn.Module, lr: float | None, weight_decay: float | None, total_steps: int | None,
           **options: Any) -> Optimizer:
    spec: OptimizerSpec = OPTIMIZERS.get(name)
    lr = spec.default_lr if lr is None else lr
    weight_decay = spec.default_weight_decay if weight_decay is None else weight_decay
    if lr < 0:
        raise OptionError(f"Invalid lr: {lr} must be non-negative")
    if weight_decay < 0:
        raise OptionError(f"Invalid weight_decay: {weight_decay} must be non-negative")
    if spec.needs_total_steps and total_steps is None:
        raise OptionError(f"optimizer {name!r} needs total_steps (the number of optimizer steps of the run)")
    extra = {"total_steps": total_steps} if spec.needs_total_steps else {}
    choices = {"impl": spec.impls} if spec.impls else {}
    return spec.builder(model, lr=lr, weight_decay=weight_decay, **extra, **validate_options(spec, options, choices))


# --- a user's own optimizer -------------------------------------------------------------------------------------


def spec_from_class(cls: type[Optimizer], name: str) -> OptimizerSpec:
    """An :class:`OptimizerSpec` for any ``torch.optim.Optimizer`` subclass (a user's own): :func:`class_spec`
    with lmopt's role groups (each carries its ``weight_decay``: 0 on embeddings, norms and 1-D parameters)."""
    return class_spec(cls, name)


def resolve_reference(reference: str, name: str) -> OptimizerSpec:
    """``package.module:Name`` -> a spec: an :class:`OptimizerSpec`, a ``torch.optim.Optimizer`` subclass, or a
    function with no arguments returning a spec."""
    module_name, _, attribute = reference.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise UnknownNameError(f"cannot load optimizer {reference!r}: {err}; the module must be importable "
                               "(installed, or on PYTHONPATH) and define that name") from None
    if isinstance(obj, type) and issubclass(obj, Optimizer):
        return spec_from_class(obj, name)
    if callable(obj) and not isinstance(obj, type):
        obj = obj()
    if isinstance(obj, OptimizerSpec):
        return replace(obj, name=name)
    raise UnknownNameError(f"{reference!r} is {type(obj).__name__}, not a torch.optim.Optimizer subclass, an "
                           "lmopt.optim.OptimizerSpec or a function returning one")


OPTIMIZERS.resolver = resolve_reference
