"""Optimizers, each a ``torch.optim.Optimizer``, and the role-aware builder.

This layer imports nothing from lmopt but the registry, so it can be used on any model::

    from lmopt.optim import build
    opt = build("adamw", model, lr=3e-3)
"""

from lmopt.optim import adamw  # noqa: F401  (registers)
from lmopt.optim.roles import ROLES, decay_groups, param_role, param_roles, role_groups
from lmopt.optim.spec import OptimizerSpec, OptionError, build, validate_options

__all__ = ["ROLES", "OptimizerSpec", "OptionError", "build", "decay_groups", "param_role", "param_roles",
           "role_groups", "validate_options"]
