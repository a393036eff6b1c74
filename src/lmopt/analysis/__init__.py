"""Analysis: gradient spectra (spike and tail, RelVar, Newton-Schulz alignment); :class:`SpectrumRecorder`
measures them during training (a trainer callback)."""

from lmopt.analysis.collect import SpectrumRecorder
from lmopt.analysis.spectrum import (
    detect_spike,
    energy_cdf,
    matrix_report,
    ns_alignment,
    relative_variance,
    singular_values,
)

__all__ = ["SpectrumRecorder", "detect_spike", "energy_cdf", "matrix_report", "ns_alignment", "relative_variance",
           "singular_values"]
