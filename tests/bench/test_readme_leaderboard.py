"""The README's cpu-full table quotes results/cpu-full/summary.json (which `lmopt bench report cpu-full` writes from
the run records): every number in it must be the file's, rounded as shown."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_rows(heading: str = "### Status of the results", end: str = "### The model-size ladder"
                ) -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):text.index(end)]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([a-z0-9-]+)` \|(.*)\|$", line)
        if match:
            rows[match[1]] = [cell.strip() for cell in match[2].split("|")]
    return rows


def numbers(cell: str) -> list[float]:
    return [float(x.replace("−", "-")) for x in re.findall(r"[−+-]?\d+\.\d+", cell)]


def test_readme_cpu_full_table_matches_the_summary_file():
    summary = json.loads((ROOT / "results" / "cpu-full" / "summary.json").read_text())
    rows = readme_rows()
    assert set(rows) == set(summary), "the README table lists every optimizer of the suite"
    for name, (loss, diff, speedup) in rows.items():
        entry = summary[name]
        assert numbers(loss) == [round(entry["mean"], 3), round(entry["std"], 3)], name
        if name == "adamw":
            continue
        vs = entry["vs_adamw"]
        assert numbers(diff)[:3] == [round(vs["diff"], 3), *(round(x, 3) for x in vs["ci"])], name
        assert ("*" in diff) == (vs["holm_p"] < 0.05), name
        assert numbers(speedup)[:3] == [round(x, 2) for x in vs["speedup"][:3]], name


def test_readme_ladder_table_matches_the_rungs_summary_files():
    """Each cell: the rung's speedup vs AdamW from complete runs (a bound where every seed is one)."""
    rungs = ("cpu-full", "cpu-ladder-micro", "cpu-ladder-small")
    summaries = [json.loads((ROOT / "results" / rung / "summary.json").read_text()) for rung in rungs]
    rows = readme_rows("### The model-size ladder", "## Performance")
    assert rows, "the README has the ladder table"
    for name, cells in rows.items():
        for cell, summary in zip(cells, summaries, strict=True):
            vs = summary[name]["vs_adamw"]
            point, low, high, n = vs["speedup"]
            every_bound = len(vs["bounds"]) == n
            assert numbers(cell)[:1] == [round(point, 2)], (name, cell)
            assert ("≥" in cell) <= bool(vs["bounds"]) and every_bound <= ("≥" in cell), (name, cell)
            if not every_bound:
                assert numbers(cell)[1:3] == [round(low, 2), round(high, 2)], (name, cell)
