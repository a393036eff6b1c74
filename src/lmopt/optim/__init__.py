"""Optimizers, each a ``torch.optim.Optimizer``, and the role-aware builder.

This layer imports nothing from lmopt but the registry, so it serves any model::

    from lmopt.optim import build, Spectra, matrix_param_groups
    opt = build("spectra", model, lr=3e-3)                                 # role-aware groups, AdamW for the rest
    opt = Spectra(matrix_param_groups(model, weight_decay=0.1), lr=3e-3)   # the same, by hand
    opt = Spectra([block.mlp.up_proj.weight, ...], lr=3e-3)  # hidden matrices only (else it raises)
"""

# Importing each module registers it; the order is the order `lmopt optimizers` lists them in.
from lmopt.optim import adamw, adafactor, lamb, stable_adamw, ortho_adam, muon  # noqa: F401, I001
from lmopt.optim import asm, asa, msam, amcs, spectra  # noqa: F401
from lmopt.optim.adafactor import Adafactor
from lmopt.optim.adamw import AdamW
from lmopt.optim.amcs import AMCS
from lmopt.optim.asa import ASA
from lmopt.optim.asm import ASM
from lmopt.optim.lamb import LAMB
from lmopt.optim.matrix import matrix_param_groups
from lmopt.optim.msam import MSAM
from lmopt.optim.muon import Muon
from lmopt.optim.ortho_adam import OrthoAdam
from lmopt.optim.roles import ROLES, param_role, param_roles, role_groups, role_param_groups
from lmopt.optim.spec import OptimizerSpec, OptionError, build, split_table, validate_options
from lmopt.optim.spectra import Spectra
from lmopt.optim.stable_adamw import StableAdamW

__all__ = [
           "AMCS",
           "ASA",
           "ASM",
           "LAMB",
           "MSAM",
           "ROLES",
           "Adafactor",
           "AdamW",
           "Muon",
           "OptimizerSpec",
           "OptionError",
           "OrthoAdam",
           "Spectra",
           "StableAdamW",
           "build",
           "matrix_param_groups",
           "param_role",
           "param_roles",
           "role_groups",
           "role_param_groups",
           "split_table",
           "validate_options",
]
