"""The papers' claims, as reported, to set beside our measurement of the same comparison.

Every number here is copied from the papers (ASM, ASA, MSAM and AMCS: Aardvark 2025, four short reports;
Spectra: its abstract and figure captions); none is ours. The papers trained a 134M Qwen model on FineWeb (Spectra
also LLaMA3 8B); a CPU suite trains a much smaller model on the Brown corpus, so a verdict says what our
measurement shows at our scale, of lmopt's reading of each paper (docs/optimizers.md), never that the paper's
number is wrong at theirs.

``effect`` is the size of the claimed effect, used for the verdict and for the power of our test to detect it:
for ``lower_loss`` the reported loss gap (baseline minus optimizer, nats); for ``noninferior`` the reported
disadvantage taken as the margin (the optimizer is at most this much worse); for ``speedup`` the reported
tokens-to-target ratio. ``None``: the paper gives no number (the report shows the smallest effect our test
detects with 80% power instead).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    paper: str
    optimizer: str
    versus: str
    reported: str
    kind: str  # "lower_loss" | "noninferior" | "speedup" | "untestable"
    effect: float | None = None


CLAIMS = (
    Claim("ASM", "asm", "adamw", "val loss 4.85 vs AdamW 4.93 (134M, FineWeb, 640 steps)", "lower_loss", 0.08),
    Claim("ASM (Table 1)", "muon", "adamw", "Muon 3.54 vs AdamW 4.93", "lower_loss", 1.39),
    Claim("ASM (Table 1)", "ortho-adam", "adamw", "OrthoAdam 3.81 vs AdamW 4.93", "lower_loss", 1.12),
    Claim("ASA", "asa", "adamw", "val loss 4.5487 vs AdamW 4.9266 (7.67% better; 2.9B tokens)", "lower_loss", 0.378),
    Claim("MSAM", "msam", "adamw", "val loss 4.860 vs AdamW 4.927 (400 steps)", "lower_loss", 0.067),
    Claim("MSAM (Table 1)", "lamb", "adamw", "LAMB 4.901 vs AdamW 4.927", "lower_loss", 0.026),
    Claim("MSAM (Table 1)", "adafactor", "adamw", "AdaFactor 4.915 vs AdamW 4.927", "lower_loss", 0.012),
    Claim("AMCS", "amcs", "adamw", "val loss 4.957 vs AdamW 4.927 (comparable, slightly worse)", "noninferior",
          0.03),
    Claim("AMCS (Table 1)", "stable-adamw", "adamw", "StableAdam 3.888 vs AdamW 4.927", "lower_loss", 1.039),
    Claim("Spectra", "spectra", "adamw", "reaches AdamW's target loss 30% faster (LLaMA3 8B, 50B tokens)",
          "speedup", 1.3),
    Claim("Spectra", "spectra", "muon", "lower final loss than Muon", "lower_loss", None),
    Claim("Spectra", "spectra", "adamw", "+1.62% average downstream accuracy (8B)", "untestable"),
)
