"""The README's view of a ``lmopt bench step`` results file: the fastest implementation of every optimizer and
issue 8's targets, each computed from the JSON (nothing typed by hand).

    python -m lmopt.bench.step_summary results/step/cpu-2threads-qwen3-134m.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmopt.bench.step import LAMB_PREVIOUS, LAMB_REUSE, LMOPT_MUON_FUSED, SPECTRA_MATRICES
from lmopt.registry import OPTIMIZERS

BASELINE = "adamw (fused)"
TORCH_MUON, LMOPT_MUON = "torch.optim.Muon (matrices only)", "lmopt muon (matrices only)"
SPECTRA_REFRESHED = "spectra (refresh every 10)"
REFERENCE_ROWS = ("adamw (for-loop)", TORCH_MUON, LMOPT_MUON, LMOPT_MUON_FUSED, SPECTRA_REFRESHED,
                  "spectra (fused, refresh every 10)", "spectra (fused, refresh after the step)")
PER_TENSOR = ("asm", "asa", "amcs", "stable-adamw", "msam", "lamb", "adafactor")
ORTHO_KRONECKER = "ortho-adam (kronecker, compiled)"
ORTHO_FP32 = "ortho-adam (fp32 rotations, compiled)"
LIMIT = 1.5


def fastest_rows(results: dict) -> dict[str, str]:
    """Registered optimizer -> the name of its fastest measured row at its default settings: the default row or
    ``NAME (IMPL)`` for another implementation it declares (not the per-tensor "for-loop" reference); rows of
    other settings (``muon (standard Newton–Schulz)``, ``spectra (refresh every 10)``) are not its defaults."""
    out = {}
    for name in OPTIMIZERS.names():
        impls = [i for i in OPTIMIZERS.get(name).impls if i != "for-loop"]
        rows = [row for row in results if row == name or row in {f"{name} ({impl})" for impl in impls}]
        if name == "adamw":
            rows = [BASELINE] if BASELINE in results else rows
        if rows:
            out[name] = min(rows, key=lambda row: results[row]["time_vs_fused_adamw"])
    return out


def step_table(results: dict) -> str:
    rows = list(dict.fromkeys([*fastest_rows(results).values(), *(r for r in REFERENCE_ROWS if r in results)]))
    rows.sort(key=lambda row: results[row]["time_vs_fused_adamw"])
    lines = ["| optimizer (fastest implementation) | step | vs fused AdamW | state vs AdamW |", "|---|---:|---:|---:|"]
    for row in rows:
        r = results[row]
        lines.append(f"| {row} | {r['step_seconds'] * 1e3:.0f} ms | {r['time_vs_fused_adamw']:.2f}x "
                     f"| {r['state_vs_adamw']:.2f}x |")
    return "\n".join(lines)


def muon_pair_scale(data: dict) -> float:
    """layers / the layers the Muon pair was timed on (1 when it ran on every layer's matrices)."""
    return data.get("layers", 1) / data.get("muon_pair_layers", data.get("layers", 1))


def spectra_matrix_state_ratio(results: dict, scale: float = 1.0) -> float | None:
    """Spectra's state on the hidden matrices it owns, over AdamW's on the same matrices. lmopt's Muon on the
    matrices only keeps one fp32 buffer per entry, which counts the matrix entries (x ``scale`` when it ran on
    some layers only)."""
    if not all(row in results for row in ("spectra", BASELINE, LMOPT_MUON)):
        return None
    matrix_entries = results[LMOPT_MUON]["state_bytes"] / 4 * scale
    adamw_rest = results[BASELINE]["state_bytes"] - 8 * matrix_entries
    return (results["spectra"]["state_bytes"] - adamw_rest) / (8 * matrix_entries)


def _spectra_defaults() -> str:
    import inspect

    from lmopt.optim.spectra import Spectra

    defaults = inspect.signature(Spectra).parameters
    interval, timing = defaults["refresh_interval"].default, defaults["refresh_timing"].default
    refined = {"before": "the basis refined before shaping", "after": "the basis refined after the step"}[timing]
    return f"refresh every {'step' if interval == 1 else f'{interval} steps'}, {refined}"


def _spectra_settings(results: dict) -> dict[str, str]:
    """Spectra's other refresh settings measured: label -> the fastest row of that setting (any implementation)."""
    out = {}
    for label, setting in (("refreshing every 10 steps", "refresh every 10"),
                           ("refreshing after the step", "refresh after the step")):
        rows = [row for row in results if row.startswith("spectra (") and row.endswith(f"{setting})")]
        if rows:
            out[label] = min(rows, key=lambda row: results[row]["time_vs_fused_adamw"])
    return out


def _verdict(ok: bool) -> str:
    return "yes" if ok else "no"


def targets_table(data: dict) -> str:
    results = data["results"]
    fastest = fastest_rows(results)
    scale = muon_pair_scale(data)
    on = "" if scale == 1 else (f" (timed on {data['muon_pair_layers']} of {data['layers']} layers' matrices; "
                                f"torch's Muon works matrix by matrix, so its whole-model time is x{scale:g})")
    lines = ["| target (issues 8 and 19) | measured | met? |", "|---|---|---|"]
    per_tensor = [(name, results[fastest[name]]["time_vs_fused_adamw"]) for name in PER_TENSOR if name in fastest]
    missed = [name for name, ratio in per_tensor if ratio > LIMIT]
    options = {label: results[row]["time_vs_fused_adamw"] for label, row in
               (("`reuse_grad=True` (our option, the paper's timing)", LAMB_REUSE),
                ("`trust_from=\"previous\"` (our option)", LAMB_PREVIOUS)) if row in results}
    option_text = "".join(f"; lamb with {label} {ratio:.2f}x" for label, ratio in options.items())
    verdict = "all" if not missed else "no: " + ", ".join(missed)
    met_by = [label.split(" (")[0] for label, ratio in options.items() if ratio <= LIMIT]
    if missed == ["lamb"] and met_by:
        verdict += f" at its defaults (yes with {' or '.join(met_by)})"
    lines.append("| per-tensor optimizers ≤ 1.5x fused AdamW | "
                 + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in sorted(per_tensor, key=lambda x: x[1]))
                 + f"{option_text} | {verdict} |")
    if "spectra" in results:
        spectra = results[fastest["spectra"]]["time_vs_fused_adamw"]
        others = "".join(f"; {results[row]['time_vs_fused_adamw']:.2f}x {label}"
                         for label, row in _spectra_settings(results).items())
        lines.append(f"| Spectra ≤ 1.5x fused AdamW (defaults: {_spectra_defaults()}) | {spectra:.2f}x "
                     f"(`{fastest['spectra']}`){others} | {_verdict(spectra <= LIMIT)} |")
        matrix_state = spectra_matrix_state_ratio(results, scale)
        whole = results["spectra"]["state_vs_adamw"]
        lines.append(f"| Spectra state ≤ 0.55x AdamW's | {matrix_state:.2f}x on the hidden matrices it owns; "
                     f"{whole:.2f}x for the whole model (AdamW keeps the embedding's) "
                     f"| {_verdict(matrix_state <= 0.55)} on its matrices |")
    if TORCH_MUON in results and "spectra" in results:
        torch_muon = results[TORCH_MUON]["step_seconds"] * scale
        every = torch_muon / results[fastest["spectra"]]["step_seconds"]
        others = "".join(f", {torch_muon / results[row]['step_seconds']:.1f}x ({label})"
                         for label, row in _spectra_settings(results).items())
        whole = f"{every:.1f}x (its defaults){others}{on}"
        same = [row for row in SPECTRA_MATRICES if row in results]
        if same:  # the two on the same matrices, in one set: the whole-model ratio charges Spectra alone with
            # AdamW's step on the embedding and norms (torch's Muon takes the matrices only)
            row = min(same, key=lambda r: results[r]["step_seconds"])
            ratio = results[TORCH_MUON]["step_seconds"] / results[row]["step_seconds"]
            lines.append(f"| Spectra ≥ 10x faster than `torch.optim.Muon` | {ratio:.1f}x on the same matrices "
                         f"(`{row}`, one set); whole model {whole}, which charges Spectra with AdamW's step on the "
                         f"embedding and norms and torch's Muon with nothing for them | {_verdict(ratio >= 10)} on "
                         "the same matrices |")
        else:
            lines.append(f"| Spectra ≥ 10x faster than `torch.optim.Muon` | {whole} | {_verdict(every >= 10)} |")
    if "ortho-adam" in fastest and "muon" in fastest:
        ortho, muon = (results[fastest[n]]["step_seconds"] for n in ("ortho-adam", "muon"))
        kronecker = results.get(ORTHO_KRONECKER, {}).get("step_seconds")
        alternative = f"; {kronecker / muon:.2f}x with `rotation=\"kronecker\"`" if kronecker else ""
        fp32 = results.get(ORTHO_FP32, {}).get("step_seconds")
        alternative += f"; {fp32 / muon:.2f}x with `rotation_dtype=\"param\"` (fp32)" if fp32 else ""
        lines.append(f"| OrthoAdam's step ≤ Muon's | {ortho / muon:.2f}x Muon's (Haar rotation, the default)"
                     f"{alternative} | {_verdict(ortho <= muon)} |")
    if TORCH_MUON in results and LMOPT_MUON in results:
        speedups = {row: results[TORCH_MUON]["step_seconds"] / results[row]["step_seconds"]
                    for row in (LMOPT_MUON, LMOPT_MUON_FUSED) if row in results}
        fused = f"; {speedups[LMOPT_MUON_FUSED]:.2f}x with `impl=\"fused\"`" if LMOPT_MUON_FUSED in speedups else ""
        lines.append(f"| lmopt Muon ≥ 1.5x faster than `torch.optim.Muon` | {speedups[LMOPT_MUON]:.2f}x{fused}{on} "
                     f"| {_verdict(max(speedups.values()) >= 1.5)} |")
    overhead = data.get("trainer_overhead")
    if overhead:
        spread = (f" (rounds {overhead['ratio_min']:.2f}–{overhead['ratio_max']:.2f})" if "ratio_min" in overhead
                  else "")
        lines.append(f"| `lmopt train` ≥ 0.95x a bare loop's throughput | {overhead['ratio']:.2f}x{spread} "
                     f"| {_verdict(overhead['ratio'] >= 0.95)} |")
    return "\n".join(lines)


def summary(data: dict) -> str:
    return f"{step_table(data['results'])}\n\n{targets_table(data)}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results/step/*.json file")
    args = parser.parse_args(argv)
    print(summary(json.loads(args.results.read_text())), end="")


if __name__ == "__main__":
    main()
