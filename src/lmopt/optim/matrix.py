"""The frame of the matrix optimizers (Muon, Spectra): they own 2-D hidden matrices and hand every other
parameter (embeddings, head, norms) to AdamW inside the same ``torch.optim.Optimizer``, as modded-nanogpt's
and Keller Jordan's ``MuonWithAuxAdam`` do. One object means one ``state_dict``, one lr scheduler and one
``zero_grad`` for the whole model.

A parameter group with ``matrix=True`` is stepped by the subclass' ``_matrix_step``; a group with
``matrix=False`` by AdamW with the group's ``adamw_betas`` and ``eps``. A group without the key is a matrix
group, and must hold 2-D tensors only: ``Muon(model.parameters())`` raises (as ``torch.optim.Muon`` does) instead
of quietly running AdamW on biases and norms; :func:`lmopt.optim.build` or :func:`matrix_param_groups` make the
split. A 2-D tensor that looks like an embedding or output head (its role says so, or one side is 16x the other
and at least 1,000 long) warns in a matrix group: orthogonalising it is rarely what was meant.
"""

from __future__ import annotations

import warnings
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


def looks_like_embedding_or_head(group: dict, p: Tensor) -> bool:
    if group.get("role") in ("embedding", "head"):
        return True
    short, long = sorted(p.shape)
    return group.get("role") is None and long >= 1000 and long >= 16 * short


class MatrixOptimizer(LmoptOptimizer):
    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, defaults)  # torch calls add_param_group for each group

    def add_param_group(self, param_group: dict) -> None:
        """torch's, plus the ``matrix`` flag: a group without it is a matrix group (2-D tensors only)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("matrix", True)
        if not group["matrix"]:
            return
        bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
        if bad:
            self.param_groups.pop()
            raise ValueError(
                f"{type(self).__name__} orthogonalises 2-D matrices only, and was given parameters of shapes "
                f"{sorted(set(bad))}. Use lmopt.optim.build({type(self).__name__.lower()!r}, model) (or "
                f"{type(self).__name__}(lmopt.optim.matrix_param_groups(model, weight_decay))), which puts the "
                "hidden matrices on it and every other parameter on its AdamW part (a group with matrix=False), "
                "or pass only the hidden 2-D weights")
        suspicious = [tuple(p.shape) for p in group["params"] if looks_like_embedding_or_head(group, p)]
        if suspicious:
            warnings.warn(f"{type(self).__name__}: the matrices of shapes {suspicious} look like an embedding or "
                          "output head; these are usually trained with AdamW (lmopt.optim.build does so). Put them "
                          "in a group with matrix=False if that was not meant", stacklevel=3)

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
