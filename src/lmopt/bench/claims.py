"""The papers' claims, as reported, to set beside our measurement of the same comparison.

Every number here is copied from ``shared/papers/`` (the page is named); none is ours. The papers trained a
134M Qwen model on FineWeb; a CPU suite trains a much smaller model on the Brown corpus, so a verdict says
what our measurement shows at our scale, never that the paper's number is wrong at theirs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    paper: str
    optimizer: str
    versus: str
    reported: str
    kind: str  # "lower_loss": optimizer beats versus; "comparable": no better, no much worse;
    #            "speedup": tokens-to-target ratio vs versus; "untestable": needs what this suite lacks
    value: float | None = None  # reported speedup or loss gap, where the kind needs one


CLAIMS = (
    Claim("ASM", "asm", "adamw", "val loss 4.85 vs AdamW 4.93 (134M, FineWeb, 640 steps)", "lower_loss"),
    Claim("ASM (Table 1)", "muon", "adamw", "Muon 3.54 vs AdamW 4.93", "lower_loss"),
    Claim("ASM (Table 1)", "ortho-adam", "adamw", "OrthoAdam 3.81 vs AdamW 4.93", "lower_loss"),
    Claim("ASA", "asa", "adamw", "val loss 4.5487 vs AdamW 4.9266 (7.67% better; 2.9B tokens)", "lower_loss"),
    Claim("MSAM", "msam", "adamw", "val loss 4.860 vs AdamW 4.927 (400 steps)", "lower_loss"),
    Claim("MSAM (Table 1)", "lamb", "adamw", "LAMB 4.901 vs AdamW 4.927", "lower_loss"),
    Claim("MSAM (Table 1)", "adafactor", "adamw", "AdaFactor 4.915 vs AdamW 4.927", "lower_loss"),
    Claim("AMCS", "amcs", "adamw", "val loss 4.957 vs AdamW 4.927 (comparable, slightly worse)", "comparable"),
    Claim("AMCS (Table 1)", "stable-adamw", "adamw", "StableAdam 3.888 vs AdamW 4.927", "lower_loss"),
    Claim("Spectra", "spectra", "adamw", "reaches AdamW's target loss 30% faster (LLaMA3 8B, 50B tokens)",
          "speedup", 1.3),
    Claim("Spectra", "spectra", "muon", "lower final loss than Muon", "lower_loss"),
    Claim("Spectra", "spectra", "adamw", "+1.62% average downstream accuracy (8B)", "untestable"),
)
