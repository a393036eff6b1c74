"""Where LAMB's fused step goes on this CPU: the embedding against the other tensors, one C++ call against a call
per tensor, the paper's trust ratio against the previous step's.

    python scripts/lamb_cpu_probe.py [--repeats 11] [--threads 2] [--out results/step/lamb-cpu-probe.md]

Writes a markdown file (naming this command, the commit and the CPU) with qwen3-134m's parameters split in two
(the 152k x 512 embedding; the other 133 tensors) in the groups training uses (``role_param_groups``: weight
decay 0.01 on the hidden matrices, none on the embedding and the norms), each stepped by torch's fused AdamW and
by lmopt's LAMB ``impl="fused"`` as it runs (one ``lamb_steps_`` call for every tensor), the same without the
kernels' software prefetch (``set_prefetch(False)``), with w read whole in pass 1 (weight decay 1e-300 in place
of the groups' 0), with the same kernel called once per tensor from Python (a lower bound on the design before
commit a4ddd3c, which also ran the trust ratio and a few small torch operations in Python between each tensor's
two passes), with ``reuse_grad=True`` (the direction kept in the gradient's buffer between the two passes) and
with ``trust_from="previous"``; then a pure read/write reference on the embedding (``p *= c``: one read and one
write; ``p += g``: two reads, one write), from which the cost of a read and a write is solved. Interleaved
medians; speed only, nothing asserted (tests check the numerics).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmopt.bench.step import interleaved_medians, probe_arguments, write_probe
from lmopt.model import build_model, get_preset
from lmopt.optim import cpu_kernels, role_param_groups
from lmopt.optim.lamb import LAMB


class TensorByTensorLAMB(LAMB):
    """LAMB's fused step with one ``lamb_steps_`` call per tensor from Python (see the module docstring)."""

    def fused_updates(self, params, grads, tensors, scalars, constants) -> list[bool]:
        return [super(TensorByTensorLAMB, self).fused_updates(*([x[i]] for x in (params, grads, tensors, scalars,
                                                                                 constants)))[0]
                for i in range(len(params))]


class WithoutPrefetch:
    """An optimizer stepping with the kernels' software prefetch off (``set_prefetch(False)``) and back on after."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        kernels = cpu_kernels.kernels()
        kernels.set_prefetch(False)
        try:
            self.optimizer.step()
        finally:
            kernels.set_prefetch(True)


class OwnGradients:
    """An optimizer stepping on its own copy of the gradients (reuse_grad writes over them), swapped in and out
    around each step, so the other optimizers keep the gradients they share."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grads = [p.grad.clone() for p in self.params]

    def step(self) -> None:
        shared = [p.grad for p in self.params]
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        self.optimizer.step()
        for p, g in zip(self.params, shared, strict=True):
            p.grad = g


def step_timings(repeats: int) -> dict[tuple[str, str], float]:
    model = build_model(get_preset("qwen3-134m").config, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    embedding = model.embed_tokens.weight
    parts = {"embedding": lambda p: p is embedding, "other 133 tensors": lambda p: p is not embedding}
    steps = {}
    for part, takes in parts.items():
        def groups(takes=takes, no_decay: float = 0.0) -> list[dict]:
            """The part's parameters in the groups training uses (weight decay on matrices, not the embedding);
            ``no_decay`` in place of the groups' 0 (1e-300: not 0, so pass 1 reads w, but 0 in fp32)."""
            chosen = [{**g, "params": [p for p in g["params"] if takes(p)],
                       "weight_decay": g["weight_decay"] or no_decay} for g in role_param_groups(model, 0.01)]
            return [g for g in chosen if g["params"]]

        optimizers = {"fused AdamW": torch.optim.AdamW(groups(), fused=True),
                      "LAMB, one call": LAMB(groups(), impl="fused"),
                      "LAMB, one call, without software prefetch": WithoutPrefetch(LAMB(groups(), impl="fused")),
                      "LAMB, one call, w read whole in pass 1 (weight decay 1e-300, not 0)": LAMB(
                          groups(no_decay=1e-300), impl="fused"),
                      "LAMB, one call per tensor": TensorByTensorLAMB(groups(), impl="fused"),
                      "LAMB reuse_grad (direction in the gradient), one call": OwnGradients(
                          LAMB(groups(), impl="fused", reuse_grad=True)),
                      "LAMB trust_from=previous, one call": LAMB(groups(), impl="fused", trust_from="previous")}
        steps |= {(part, name): opt.step for name, opt in optimizers.items()}
    return interleaved_medians(steps, repeats)


def read_write_timings(repeats: int) -> dict[str, float]:
    p, g = torch.randn(151936 * 512), torch.randn(151936 * 512)
    return interleaved_medians({"p *= c (1 read, 1 write)": lambda: p.mul_(0.9999),
                                "p += g (2 reads, 1 write)": lambda: p.add_(g, alpha=1e-9)}, repeats)


def main(argv: list[str] | None = None) -> Path:
    args = probe_arguments(__doc__, "results/step/lamb-cpu-probe.md", 11, argv)
    steps, rw = step_timings(args.repeats), read_write_timings(args.repeats)
    lines = ["## One step on qwen3-134m's parameters", "", "| parameters | optimizer | ms | vs fused AdamW |",
             "|---|---|---:|---:|"]
    for (part, name), ms in steps.items():
        lines.append(f"| {part} | {name} | {ms:.1f} | {ms / steps[(part, 'fused AdamW')]:.2f}x |")
    (one, two) = rw.values()
    read, write = two - one, 2 * one - two  # one = r + w, two = 2r + w
    lines += ["", "## Reads and writes of the embedding-sized array (77.8M fp32)", "", "| pass | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in rw.items()]
    lines += [f"| a read (solved) | {read:.1f} |", f"| a write (solved) | {write:.1f} |", "",
              f"At these costs fused AdamW's 4 reads and 3 writes take {4 * read + 3 * write:.0f} ms on the embedding. "
              f"LAMB's two passes there (no weight decay: pass 1 reads w only until its clipped norm is known, 3 "
              f"reads and 2 writes, then 3 reads and 1 write) take {6 * read + 3 * write:.0f} ms: "
              f"{(6 * read + 3 * write) / (4 * read + 3 * write):.2f}x (an estimate: these costs come from plain "
              f"torch passes, without the kernels' prefetch); with weight "
              f"decay pass 1 reads w too: {7 * read + 3 * write:.0f} ms, "
              f"{(7 * read + 3 * write) / (4 * read + 3 * write):.2f}x. With ``reuse_grad`` (3 reads and 3 writes, "
              f"then 2 reads and 1 write) {5 * read + 4 * write:.0f} ms: "
              f"{(5 * read + 4 * write) / (4 * read + 3 * write):.2f}x by this count; it also spares pass 2 the "
              f"square root and division."]
    return write_probe("scripts/lamb_cpu_probe.py", argv, args, "LAMB's fused step on this CPU", lines)


if __name__ == "__main__":
    main()
