"""Analysis: gradient spectra (spike and tail, RelVar, Newton-Schulz alignment)."""

from lmopt.analysis.spectrum import (
    detect_spike,
    energy_cdf,
    matrix_report,
    ns_alignment,
    relative_variance,
    singular_values,
)

__all__ = ["detect_spike", "energy_cdf", "matrix_report", "ns_alignment", "relative_variance", "singular_values"]
