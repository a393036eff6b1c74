"""The spectrum measurements on synthetic matrices with a planted low-rank spike plus noise."""

import math

import pytest
import torch

from lmopt.analysis import detect_spike, energy_cdf, matrix_report, ns_alignment, relative_variance, singular_values


def planted(m=64, n=96, rank=3, spike=40.0, noise=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64)).Q
    strengths = spike * torch.linspace(1.0, 0.7, rank, dtype=torch.float64)
    noise_matrix = noise * torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    return (U * strengths) @ V.mT + noise_matrix


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_detector_finds_the_planted_rank(rank):
    s = singular_values(planted(rank=rank))
    spike = detect_spike(s)
    assert spike.size == rank
    assert spike.fraction == pytest.approx(rank / 64)
    assert spike.energy_fraction > 0.9 and spike.gap_decades > 0.5


def test_energy_cdf_is_a_cdf():
    s = singular_values(planted())
    cdf = energy_cdf(s)
    assert torch.all(cdf[1:] >= cdf[:-1]) and cdf[-1].item() == pytest.approx(1.0)
    assert cdf[2].item() == pytest.approx(detect_spike(s).energy_fraction)  # rank 3: CDF(3) = spike energy
    flat = energy_cdf(torch.ones(10))
    assert torch.allclose(flat, torch.arange(1, 11, dtype=torch.float64) / 10.0, atol=1e-12)


def test_relative_variance_grows_from_spike_to_tail():
    gen = torch.Generator().manual_seed(3)
    signal = planted(noise=0.0)  # the same spike in every micro-batch, fresh noise in each
    micro = torch.stack([signal + torch.randn(64, 96, generator=gen, dtype=torch.float64) / math.sqrt(96)
                         for _ in range(32)])
    relvar, s = relative_variance(micro)
    assert relvar.shape == (64,) and torch.all(s[:-1] >= s[1:])
    assert relvar[:3].max() < 1e-3  # spike directions: signal dominates
    assert relvar[3:].min() > 10 * relvar[:3].max()  # every tail direction is noisier than any spike one
    assert relvar[-10:].mean() > 10 * relvar[3:13].mean()  # and it keeps growing down the tail
    ranks = torch.arange(64, dtype=torch.float64)
    order = relvar.argsort().argsort().double()
    assert torch.corrcoef(torch.stack([ranks, order]))[0, 1] > 0.9  # RelVar increases with k
    # exact for a constant gradient: no variance at all
    same = relative_variance(signal.expand(4, -1, -1).clone())[0]
    assert same[:3].max() < 1e-20


def spike_with_power_law_tail(seed=0):
    """Three spike values, then a tail decaying as k^-1.5 (the shape of real gradient spectra)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(96, 64, generator=gen, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([40.0, 30.0, 25.0]), 0.5 * torch.arange(1, 62) ** -1.5]).double()
    return (U * s) @ V.mT


def test_ns_alignment_keeps_the_head_and_loses_the_tail():
    G = spike_with_power_law_tail()
    alignment = ns_alignment(G)  # bf16, as Muon runs it
    assert alignment.shape == (64,)
    assert torch.all((alignment >= 0) & (alignment <= 1 + 1e-9))
    assert alignment[:3].min() > 0.999  # the spike's directions survive Newton-Schulz
    assert alignment[-20:].mean() < 0.3  # the small tail directions drown in bf16 error
    # in float64 Newton-Schulz only remaps singular values: every direction is kept
    assert ns_alignment(G, dtype=torch.float64).min() > 0.999


def test_matrix_report_has_every_measurement():
    gen = torch.Generator().manual_seed(0)
    micro = torch.stack([planted() + 0.1 * torch.randn(64, 96, generator=gen, dtype=torch.float64)
                         for _ in range(4)])
    report = matrix_report(micro, first_moment=micro.mean(0), second_moment=micro.square().mean(0))
    assert report["spike"]["size"] == 3
    assert set(report["cdf"]) == {"G", "M", "V"}
    assert len(report["relvar"]) == len(report["ns_alignment"]) == len(report["singular_values"]) == 64
