"""The frame of the matrix optimizers (Muon, Spectra): they own 2-D hidden matrices and hand every other
parameter (embeddings, head, norms) to AdamW inside the same ``torch.optim.Optimizer``, as modded-nanogpt's
and Keller Jordan's ``MuonWithAuxAdam`` do. One object means one ``state_dict``, one lr scheduler and one
``zero_grad`` for the whole model.

A parameter group with ``matrix=True`` is stepped by the subclass' ``_matrix_step``; a group with
``matrix=False`` by AdamW with the group's ``adamw_betas`` and ``eps``. Groups without the key default to
``matrix = all parameters are 2-D``.
"""

from __future__ import annotations

from collections import defaultdict

from torch import Tensor, nn

from lmopt.optim.common import LmoptOptimizer, adamw_step_
from lmopt.optim.roles import HIDDEN_MATRIX_ROLES, RoleRules, role_param_groups


def matrix_param_groups(model: nn.Module, weight_decay: float, matrix_roles=HIDDEN_MATRIX_ROLES,
                        rules: RoleRules | None = None) -> list[dict]:
    """Role groups, each marked ``matrix`` when its role is a hidden-matrix role and its tensors are 2-D."""
    groups = []
    for group in role_param_groups(model, weight_decay, rules):
        matrices = [p for p in group["params"] if p.dim() == 2 and group["role"] in matrix_roles]
        others = [p for p in group["params"] if not (p.dim() == 2 and group["role"] in matrix_roles)]
        if matrices:
            groups.append(group | {"params": matrices, "matrix": True})
        if others:
            groups.append(group | {"params": others, "matrix": False})
    return groups


def by_shape_indices(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (shape, dtype, device), in first-seen order, for batched matrix work."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(tuple(t.shape), t.dtype, t.device)].append(i)
    return list(groups.values())


class MatrixOptimizer(LmoptOptimizer):
    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("matrix", all(p.dim() == 2 for p in group["params"]))
            if group["matrix"]:
                bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if bad:
                    raise ValueError(f"{type(self).__name__} matrix groups take 2-D parameters only; got {bad}")

    def add_param_group(self, param_group: dict) -> None:
        """torch's, plus the ``matrix`` flag that the constructor gives its own groups (a group added later
        without it is a matrix group when all its tensors are 2-D)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("matrix", all(p.dim() == 2 for p in group["params"]))
        if group["matrix"] and any(p.dim() != 2 for p in group["params"]):
            self.param_groups.pop()
            raise ValueError(f"{type(self).__name__} matrix groups take 2-D parameters only; got "
                             f"{[tuple(p.shape) for p in group['params']]}")

    def _step_group(self, group: dict) -> None:
        params = self.params_with_grad(group)
        if not params:
            return
        if group["matrix"]:
            self._matrix_step(group, params)
        else:
            adamw_step_(params, [self.state[p] for p in params], group["lr"], group["adamw_betas"], group["eps"],
                        group["weight_decay"])

    def _matrix_step(self, group: dict, params: list[Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
