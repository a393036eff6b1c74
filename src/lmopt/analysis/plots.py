"""PNG plots of spectrum reports (one figure per measurement, one panel per matrix)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _ylabel(axes: list, label: str) -> None:
    """The y label on the first panel of every row (the grid has up to 4 columns)."""
    for i, ax in enumerate(axes):
        if i % 4 == 0:
            ax.set_ylabel(label, fontsize=8)


def _mark_spike(ax, m: dict, rank: int, relative: bool = True) -> None:
    """A red dashed line at the spike's cut-off k (as a fraction of the rank when ``relative``)."""
    k = m["spike"]["size"]
    ax.axvline(k / rank if relative else k, color="red", ls="--", lw=0.8, label=f"spike cut-off k={k}")


def _short(name: str) -> str:
    return name.removesuffix(".weight").replace("self_attn.", "").replace("mlp.", "")


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """spectra.png, cdf.png, relvar.png, alignment.png for one checkpoint's report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(report["matrices"])
    title = f"{report['run']} step {report['step']} ({report['optimizer']})"
    paths = []

    plt, fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=True):
        m = report["matrices"][name]
        s = np.asarray(m["singular_values"])
        x = np.arange(1, len(s) + 1) / len(s)
        ax.semilogy(x, s / s[0], lw=1.2)
        k = m["spike"]["size"]
        ax.axvline(k / len(s), color="red", ls="--", lw=0.8,
                   label=f"spike {k} ({m['spike']['fraction']:.1%}), {m['spike']['energy_fraction']:.0%} energy")
        ax.set_title(_short(name), fontsize=9)
        ax.set_xlabel("k / rank", fontsize=8)
        ax.legend(fontsize=7)
    _ylabel(axes, "s_k / s_1")
    fig.suptitle(f"gradient singular values: {title}", fontsize=10)
    paths.append(_save(plt, fig, out_dir / "spectra.png"))

    plt, fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=True):
        for key, cdf in report["matrices"][name]["cdf"].items():
            c = np.asarray(cdf)
            ax.plot(np.arange(1, len(c) + 1) / len(c), c, label={"G": "gradient G", "M": "first moment M",
                                                                   "V": "second moment V"}[key])
        m = report["matrices"][name]
        _mark_spike(ax, m, len(m["singular_values"]))
        ax.set_xscale("log")
        ax.set_title(_short(name), fontsize=9)
        ax.set_xlabel("k / rank", fontsize=8)
        ax.legend(fontsize=7)
    _ylabel(axes, "cumulative spectral energy")
    fig.suptitle(f"spectral energy CDF (Fig. 3): {title}", fontsize=10)
    paths.append(_save(plt, fig, out_dir / "cdf.png"))

    if all("relvar" in report["matrices"][n] for n in names):
        plt, fig, axes = _grid(len(names))
        for ax, name in zip(axes, names, strict=True):
            r = np.asarray(report["matrices"][name]["relvar"])
            ax.semilogy(np.arange(1, len(r) + 1), r, lw=1)
            _mark_spike(ax, report["matrices"][name], len(r), relative=False)
            ax.legend(fontsize=7)
            ax.set_title(_short(name), fontsize=9)
            ax.set_xlabel("k", fontsize=8)
        _ylabel(axes, "RelVar(k) = Var(a_k) / s_k²")
        fig.suptitle(f"relative variance along singular directions (Fig. 4): {title}", fontsize=10)
        paths.append(_save(plt, fig, out_dir / "relvar.png"))

    plt, fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=True):
        a = np.asarray(report["matrices"][name]["ns_alignment"])
        ax.plot(np.arange(1, len(a) + 1), a, lw=0.8)
        _mark_spike(ax, report["matrices"][name], len(a), relative=False)
        ax.legend(fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(_short(name), fontsize=9)
        ax.set_xlabel("k", fontsize=8)
    _ylabel(axes, "|<u_k(G), u_k(NS(G))>|")
    fig.suptitle(f"singular directions kept by Newton-Schulz (Fig. 5): {title}", fontsize=10)
    paths.append(_save(plt, fig, out_dir / "alignment.png"))
    return paths


def plot_compare(reports: list[dict], out_path: Path) -> Path:
    """The spectra of the same matrices at several training stages, overlaid (as Figure 1)."""
    names = list(reports[0]["matrices"])
    plt, fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=True):
        for report in reports:
            s = np.asarray(report["matrices"][name]["singular_values"])
            ax.semilogy(np.arange(1, len(s) + 1) / len(s), s / s[0], lw=1, label=f"step {report['step']}")
        ax.set_title(_short(name), fontsize=9)
        ax.set_xlabel("k / rank", fontsize=8)
        ax.legend(fontsize=7)
    _ylabel(axes, "s_k / s_1")
    fig.suptitle(f"gradient spectra across training: {reports[0]['run']}", fontsize=10)
    return _save(plt, fig, out_path)


def replot(folder: Path) -> list[Path]:
    """Redraw every measurement stored under ``folder`` (``*/summary.json``) and their comparison plot."""
    import json

    reports = [json.loads(f.read_text()) for f in sorted(Path(folder).glob("*/summary.json"))]
    if not reports:
        raise FileNotFoundError(f"no */summary.json under {folder}; measure with `lmopt spectrum CHECKPOINT...`")
    paths = [p for f, r in zip(sorted(Path(folder).glob("*/summary.json")), reports, strict=True)
             for p in plot_report(r, f.parent)]
    if len(reports) > 1:
        paths.append(plot_compare(sorted(reports, key=lambda r: r["step"]), Path(folder) / "compare.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
