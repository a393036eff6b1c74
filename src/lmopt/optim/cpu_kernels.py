"""Fused CPU kernels (C++ with OpenMP, built on first use by ``torch.utils.cpp_extension.load_inline``).

Some optimizer steps are a few reductions and one update over a large matrix. On a CPU, each separate torch
op (or Inductor kernel) is a full pass over memory, and a reduction over a matrix's columns reads it with a
stride: Adafactor's step on qwen3-134m's 152k x 512 embedding took ~3.5x fused AdamW's, which does all its
work in one pass. The kernels here read each operand the fewest times an exact algorithm allows, in row order,
with per-thread column partials and float64 accumulators. The passes that stream several full-size arrays at once
(the Adam family's) also ask for each array 4 KB ahead in software (``prefetch_ahead`` in the source;
``set_prefetch(False)`` turns it off for a probe).

The build needs a C++ compiler with OpenMP (and ninja); :func:`kernels` returns None, with the reason in
:func:`unavailable_reason`, where it fails, and callers fall back to their other implementations. The build is
cached by torch (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Torch's build lock is a plain
file that a killed build leaves behind, after which every later load waits on it forever; lmopt's builds take an
OS lock first (released by the kernel when a process dies) and, holding it, remove such a stale file
(:func:`stale_torch_lock_cleared`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from lmopt.optim.distributed import is_dtensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <numeric>
#include <limits>
#include <memory>
#include <vector>
#include <atomic>

// Column sums over many rows run in the tensor's precision over at most kBlock rows (they vectorize), then in
// float64: per thread, in its own slice of a threads x size float64 array, summed over threads at the end.
constexpr int64_t kBlock = 256;

template <typename T>
struct BlockedPartials {
  std::vector<T> block;
  double* total;
  int64_t rows = 0;
  BlockedPartials(int64_t size, double* total_) : block(size, T(0)), total(total_) {}
  T* data() { return block.data(); }
  void rows_added(int64_t count) {
    rows += count;
    if (rows >= kBlock) flush();
  }
  void flush() {
    for (size_t j = 0; j < block.size(); ++j) { total[j] += block[j]; block[j] = 0; }
    rows = 0;
  }
};

// this thread's `size` entries of per-thread partials
inline double* own_slice(std::vector<double>& partial, int64_t size) {
  return partial.data() + static_cast<size_t>(omp_get_thread_num()) * size;
}

template <typename T>
void sum_partials(const std::vector<double>& partial, int threads, int64_t size, T* out) {
  for (int64_t j = 0; j < size; ++j) {
    double s = 0.0;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * size + j];
    out[j] = static_cast<T>(s);
  }
}

// Software prefetch for the kernels that stream several full-size arrays at once (the Adam family's passes). On
// this project's CPU (a 2-vCPU VM) the hardware prefetchers kept too few lines in flight for 3-6 streams. Walking
// each thread's range in blocks of kStreamBlockBytes and asking, at each block, for the block `ahead_bytes`
// further on in every array took LAMB's step ~10% faster (scripts/lamb_cpu_probe.py times it both ways). A
// prefetch changes no value (on or off, the same bits; tested); the blocks reordered the reductions' partial sums
// (last-bit differences from the builds before them). Near an array's end the addresses run past it: a prefetch
// never faults, and they are formed as integers (no out-of-range pointer). No branch around the prefetches: with a
// bounds test, or an on/off test, GCC 12 at -O3 dropped them; set_prefetch(false) asks for the block about to be
// read instead (a no-op).
constexpr int64_t kStreamBlockBytes = 256;
static std::atomic<int64_t> ahead_bytes{4096};  // atomic: set_prefetch may run beside a step

void set_prefetch(bool on) { ahead_bytes.store(on ? 4096 : 0, std::memory_order_relaxed); }

template <typename T>
constexpr int64_t kStreamBlock = kStreamBlockBytes / static_cast<int64_t>(sizeof(T));

// the block `ahead_bytes` after element j of each array (kWrite: to be written; a hint only)
template <typename T, bool kWrite = false, typename... Arrays>
inline void prefetch_ahead(int64_t j, const Arrays*... arrays) {
  const uintptr_t ahead = static_cast<uintptr_t>(ahead_bytes.load(std::memory_order_relaxed));
  for (int64_t q = 0; q < kStreamBlockBytes; q += 64)
    (__builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(arrays + j) + ahead + q),
                        kWrite, 3), ...);
}

// body(first, last) over [0, n) in kStreamBlock blocks, the range split in contiguous parts over torch's threads,
// the block `ahead_bytes` on from each prefetched in `read` arrays and, for writing, in `written` ones
template <typename T, typename Body, typename... Read>
void streamed(int64_t n, std::initializer_list<const T*> written, Body body, const Read*... read) {
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t b = 0; b < n; b += kStreamBlock<T>) {
    prefetch_ahead<T>(b, read...);
    for (const T* w : written) prefetch_ahead<T, true>(b, w);
    body(b, std::min(n, b + kStreamBlock<T>));
  }
}

// Adafactor, pass 1: sum_j g_ij^2 per row, sum_i g_ij^2 per column, sum_ij p_ij^2 (one read of g and p).
template <typename T>
void factored_stats(const T* p, const T* g, int64_t m, int64_t n, double* row, double* col, double* p_sq) {
  const int threads = at::get_num_threads();  // torch's setting (torch.set_num_threads), not OpenMP's default
  std::vector<double> partial(static_cast<size_t>(threads) * n, 0.0);
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    BlockedPartials<T> columns(n, own_slice(partial, n));
    T* b = columns.data();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      const T* gi = g + i * n;
      const T* pi = p + i * n;
      T r = 0, s = 0;
#pragma omp simd reduction(+ : r, s)
      for (int64_t j = 0; j < n; ++j) {
        const T x = gi[j];
        r += x * x;
        b[j] += x * x;
        s += pi[j] * pi[j];
      }
      row[i] = r;
      total += s;
      columns.rows_added(1);
    }
    columns.flush();
  }
  sum_partials(partial, threads, n, col);
  *p_sq = total;
}

// v_ij = max(f_i c_j, floor) with f_i = r_i / row_scale (`row_factor`). Where f_i min_j c_j >= floor (every row
// in practice) no clamp acts and 1 / v_ij = (1 / f_i)(1 / c_j): the inner loops multiply by per-column
// reciprocals in the tensor's own precision (they vectorize); other rows take the exact per-element path.
template <typename T>
struct ColumnFactors {
  std::vector<T> inverse, inverse_sqrt;
  double min_col = INFINITY;
  ColumnFactors(const double* col, int64_t n) : inverse(n), inverse_sqrt(n) {
    for (int64_t j = 0; j < n; ++j) {
      inverse[j] = static_cast<T>(1.0 / col[j]);
      inverse_sqrt[j] = static_cast<T>(1.0 / std::sqrt(col[j]));
      min_col = std::min(min_col, col[j]);
    }
  }
  bool unclamped(double f, double floor) const { return min_col > 0 && f * min_col >= floor; }
};

// Pass 2: sum_ij g_ij^2 / v_ij (one read of g).
template <typename T>
double inverse_variance_sum(const T* g, int64_t m, int64_t n, const double* row_factor, const double* col,
                            double floor) {
  const ColumnFactors<T> cf(col, n);
  const T* inv = cf.inverse.data();
  double total = 0.0;
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static) reduction(+ : total)
  for (int64_t i = 0; i < m; ++i) {
    const T* gi = g + i * n;
    const double f = row_factor[i];
    if (cf.unclamped(f, floor)) {
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < n; ++j) s += gi[j] * gi[j] * inv[j];
      total += static_cast<double>(s) / f;
    } else {
      double s = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        const double x = gi[j];
        s += x * x / std::max(f * col[j], floor);
      }
      total += s;
    }
  }
  return total;
}

// Pass 3: p <- p * decay - step * g / sqrt(v) (one read of p and g, one write of p).
template <typename T>
void factored_update(T* p, const T* g, int64_t m, int64_t n, const double* row_factor, const double* col,
                     double floor, double decay, double step) {
  const ColumnFactors<T> cf(col, n);
  const T* inv_sqrt = cf.inverse_sqrt.data();
  const T d = static_cast<T>(decay);
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    T* pi = p + i * n;
    const T* gi = g + i * n;
    const double f = row_factor[i];
    if (cf.unclamped(f, floor)) {
      const T a = static_cast<T>(step / std::sqrt(f));
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) pi[j] = pi[j] * d - a * gi[j] * inv_sqrt[j];
    } else {
      for (int64_t j = 0; j < n; ++j)
        pi[j] = static_cast<T>(pi[j] * decay - step * gi[j] / std::sqrt(std::max(f * col[j], floor)));
    }
  }
}

// LAMB: Adam's moments in place, and sum r^2, sum w^2 for r = m_hat / (sqrt(v_hat) + eps) + wd w (w before any update;
// one read of g, m, v, w; one write of m, v). kApply (trust_from="previous"): the same pass also writes
// w <- w decay - step m_hat / (sqrt(v_hat) + eps) with the previous step's trust ratio in `step`, so the sums are
// for the next step's ratio (fused AdamW's streams); without it, the paper's pass 1, before lamb_apply.
// kStore (the paper's pass 1 only): the direction m_hat / (sqrt(v_hat) + eps) is also written over g, in place of
// the gradient just read (one write, no extra read), so pass 2 (lamb_apply_direction) reads it and w, not m, v, w.
// kReadW false (the paper's pass 1 with wd = 0, where ||w|| is known otherwise: lamb_steps_): r is the direction
// alone and w is not read (sum w^2 is left 0).
template <typename T, bool kApply, bool kStore = false, bool kReadW = true>
void lamb_pass(T* p, T* g, T* m, T* v, int64_t n, double beta1, double beta2, double bias1, double bias2,
               double eps, double wd, double decay, double step, double* out) {
  const T b2 = static_cast<T>(beta2), ib1 = static_cast<T>(1.0 / bias1);
  const T a1 = static_cast<T>(1.0 - beta1), a2 = static_cast<T>(1.0 - beta2);  // exact weights: 1 - 0.999f is not 0.001
  const T ib2 = static_cast<T>(1.0 / bias2), e = static_cast<T>(eps), w = static_cast<T>(wd);
  const T d = static_cast<T>(decay), s = static_cast<T>(step);
  double r_sq = 0.0, p_sq = 0.0;
  const int64_t chunk = 4096;
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static) reduction(+ : r_sq, p_sq)
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t end = std::min(n, start + chunk);
    T rs = 0, ps = 0;
    for (int64_t b = start; b < end; b += kStreamBlock<T>) {
      if constexpr (kReadW) prefetch_ahead<T, kApply>(b, p);
      prefetch_ahead<T, kStore>(b, g);
      prefetch_ahead<T, true>(b, m, v);
      const int64_t block_end = std::min(end, b + kStreamBlock<T>);
#pragma omp simd reduction(+ : rs, ps)
    for (int64_t j = b; j < block_end; ++j) {
      const T x = g[j];
      const T mj = m[j] + a1 * (x - m[j]);
      const T vj = v[j] * b2 + a2 * x * x;
      m[j] = mj;
      v[j] = vj;
      const T direction = (mj * ib1) / (std::sqrt(vj * ib2) + e);
      if constexpr (kReadW) {
        const T pj = p[j];
        const T r = direction + w * pj;
        rs += r * r;
        ps += pj * pj;
        if constexpr (kApply) p[j] = pj * d - s * direction;
      } else {
        rs += direction * direction;
      }
      if constexpr (kStore) g[j] = direction;
    }
    }
    r_sq += rs;
    p_sq += ps;
  }
  out[0] = r_sq;
  out[1] = p_sq;
}

// StableAdamW, pass 1: Adam's moments in place, and sum g^2 / max(v_hat, eps^2) with the new v (one read of g, m, v;
// one write of m, v). Its pass 2 is lamb_apply with decay 1 - lr wd and step lr / max(1, RMS).
template <typename T>
double clipped_moments(const T* g, T* m, T* v, int64_t n, double beta1, double beta2, double bias2, double eps) {
  const T b2 = static_cast<T>(beta2), ib2 = static_cast<T>(1.0 / bias2), floor = static_cast<T>(eps * eps);
  const T a1 = static_cast<T>(1.0 - beta1), a2 = static_cast<T>(1.0 - beta2);
  double total = 0.0;
  const int64_t chunk = 4096;
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static) reduction(+ : total)
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t end = std::min(n, start + chunk);
    T ratios = 0;
    for (int64_t b = start; b < end; b += kStreamBlock<T>) {
      prefetch_ahead<T>(b, g);
      prefetch_ahead<T, true>(b, m, v);
      const int64_t block_end = std::min(end, b + kStreamBlock<T>);
#pragma omp simd reduction(+ : ratios)
    for (int64_t j = b; j < block_end; ++j) {
      const T x = g[j];
      const T vj = v[j] * b2 + a2 * x * x;
      m[j] = m[j] + a1 * (x - m[j]);
      v[j] = vj;
      const T v_hat = vj * ib2;
      ratios += x * x / (v_hat < floor ? floor : v_hat);  // std::max here kept GCC from vectorizing the loop
    }
    }
    total += ratios;
  }
  return total;
}

// LAMB, pass 2: w <- w (1 - step wd) - step m_hat / (sqrt(v_hat) + eps) (one read of m, v, w; one write of w).
template <typename T>
void lamb_apply(T* p, const T* m, const T* v, int64_t n, double bias1, double bias2, double eps, double decay,
                double step) {
  const T ib1 = static_cast<T>(1.0 / bias1), ib2 = static_cast<T>(1.0 / bias2), e = static_cast<T>(eps);
  const T d = static_cast<T>(decay), s = static_cast<T>(step);
  streamed<T>(n, {p}, [&](int64_t first, int64_t last) {
#pragma omp simd
    for (int64_t j = first; j < last; ++j) p[j] = p[j] * d - s * ((m[j] * ib1) / (std::sqrt(v[j] * ib2) + e));
  }, m, v);
}

// LAMB, pass 2 from the direction lamb_pass<T, false, true> stored: w <- w (1 - step wd) - step direction (one
// read of direction and w; one write of w), the same values as lamb_apply from m and v.
template <typename T>
void lamb_apply_direction(T* p, const T* direction, int64_t n, double decay, double step) {
  const T d = static_cast<T>(decay), s = static_cast<T>(step);
  streamed<T>(n, {p}, [&](int64_t first, int64_t last) {
#pragma omp simd
    for (int64_t j = first; j < last; ++j) p[j] = p[j] * d - s * direction[j];
  }, direction);
}

// The multi-tensor steps' check of each parameter's companions: contiguous CPU tensors of its dtype, each with as
// many elements as it (`numel` < 0) or exactly `numel` (a per-tensor statistic)
void check_like(const torch::Tensor& p, std::initializer_list<torch::Tensor> others, const char* name,
                int64_t numel = -1) {
  for (const auto& t : others) {
    TORCH_CHECK(p.device().is_cpu() && t.device().is_cpu() && p.is_contiguous() && t.is_contiguous() &&
                    t.scalar_type() == p.scalar_type() && t.numel() == (numel < 0 ? p.numel() : numel),
                name, ": every tensor must be a contiguous CPU tensor of its parameter's dtype and size");
  }
}

// The Adam family's multi-tensor steps: every input checked before any tensor is stepped (one g, m, v and, where
// given, a (2,) statistic per parameter, each a contiguous CPU tensor of its dtype; a float64 settings table with
// one row of `columns` per tensor); returns the table's rows
const double* checked_settings(const char* name, const std::vector<torch::Tensor>& p,
                               const std::vector<torch::Tensor>& g, const std::vector<torch::Tensor>& m,
                               const std::vector<torch::Tensor>& v, const std::vector<torch::Tensor>& previous,
                               const torch::Tensor& settings, int64_t columns) {
  TORCH_CHECK(settings.device().is_cpu() && settings.scalar_type() == torch::kFloat64 && settings.dim() == 2 &&
                  settings.size(1) == columns && settings.size(0) == static_cast<int64_t>(p.size()) &&
                  settings.is_contiguous(),
              name, " takes a contiguous float64 (tensors x ", columns, ") settings table");
  TORCH_CHECK(g.size() == p.size() && m.size() == p.size() && v.size() == p.size() &&
                  (previous.empty() || previous.size() == p.size()), name, ": one g, m, v (and norms) per p");
  for (size_t i = 0; i < p.size(); ++i) {
    check_like(p[i], {g[i], m[i], v[i]}, name);
    if (!previous.empty()) check_like(p[i], {previous[i]}, name, 2);
  }
  return settings.data_ptr<double>();
}

// sum w^2 over w's first elements, in order, stopping as soon as it reaches `enough` or after `most` elements:
// LAMB's numerator min(||w||, max_trust) is max_trust once sum w^2 >= max_trust^2, whatever the rest of a finite w
// holds (for qwen3-134m's embedding at its initial scale, ||w|| = 97, after 1% of it). Single-threaded: it reads
// little.
template <typename T>
double squares_until(const T* w, int64_t n, double enough, int64_t most) {
  double total = 0.0;
  const int64_t stop = std::min(n, most);
  for (int64_t start = 0; start < stop && total < enough; start += kStreamBlock<T>) {
    const int64_t end = std::min(stop, start + kStreamBlock<T>);
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = start; j < end; ++j) s += w[j] * w[j];
    total += s;
  }
  return total;
}

// how far squares_until looks before LAMB's pass 1 reads w after all: the larger of an eighth of w and 2^16
// elements (all of a smaller tensor); where it fails, a large tensor's look costs about a quarter of pass 1's read
// of w (one thread of two)
constexpr int64_t kLookMin = 1 << 16, kLookShare = 8;

// LAMB's trust ratio min(||w||, max_trust) / ||r|| from ||w||^2 and ||r||^2 (1 where either norm is 0), in the
// precision of its inputs, as lamb.py's trust_from_norms
template <typename T>
T lamb_trust(T w_sq, T r_sq, double max_trust) {
  const T w = std::min(std::sqrt(w_sq), static_cast<T>(max_trust)), r = std::sqrt(r_sq);
  return (w > 0 && r > 0) ? w / r : T(1);
}

// A whole LAMB step of many tensors in one call (no Python between tensors): per tensor the paper's two passes
// with the trust ratio between them, or, where `previous` holds the previous step's [||w||^2, ||r||^2] (one (2,)
// tensor per parameter, trust_from="previous"), one pass stepping by the previous ratio; `previous` then
// receives this step's norms. `settings`: one float64 row per tensor: lr, beta1, beta2, 1 - beta1^t,
// 1 - beta2^t, eps, weight_decay, max_trust. `direction_in_grad` (the paper's timing only): pass 1 leaves the
// direction m_hat / (sqrt(v_hat) + eps) in g and pass 2 reads it instead of m and v (g's values are then lost).
void lamb_steps_(std::vector<torch::Tensor> p, std::vector<torch::Tensor> g, std::vector<torch::Tensor> m,
                 std::vector<torch::Tensor> v, std::vector<torch::Tensor> previous, torch::Tensor settings,
                 bool direction_in_grad) {
  const double* rows = checked_settings("lamb_steps_", p, g, m, v, previous, settings, 8);
  for (size_t i = 0; i < p.size(); ++i) {
    const double* s = rows + 8 * i;
    const double lr = s[0], beta1 = s[1], beta2 = s[2], bias1 = s[3], bias2 = s[4], eps = s[5], wd = s[6];
    AT_DISPATCH_FLOATING_TYPES(p[i].scalar_type(), "lamb_steps", [&] {
      scalar_t* w = p[i].data_ptr<scalar_t>();
      scalar_t* grad = g[i].data_ptr<scalar_t>();
      scalar_t *mi = m[i].data_ptr<scalar_t>(), *vi = v[i].data_ptr<scalar_t>();
      scalar_t* norms = previous.empty() ? nullptr : previous[i].data_ptr<scalar_t>();
      const int64_t n = p[i].numel();
      double sums[2];  // ||r||^2, ||w||^2 of this step
      if (norms != nullptr && norms[1] > 0) {
        const double step = lr * static_cast<double>(lamb_trust<scalar_t>(norms[0], norms[1], s[7]));
        lamb_pass<scalar_t, true>(w, grad, mi, vi, n, beta1, beta2, bias1, bias2, eps, wd, 1 - step * wd, step, sums);
      } else {
        // Without weight decay r needs no w, and where w's first elements already reach max_trust^2 neither does
        // the numerator: pass 1 then skips w (3 full-size reads, not 4). For finite w the trust ratio is the same,
        // up to summation rounding where ||w|| is within rounding of max_trust (a NaN in w past the look would
        // have made the ratio 1; here it is max_trust / ||r||).
        // (max_trust^2 must be a positive finite number: an infinite clip never acts, one whose square underflows
        // would be reached at once)
        const double enough = s[7] * s[7];
        const bool may_skip = wd == 0.0 && norms == nullptr && enough > 0.0 && std::isfinite(enough);
        const int64_t look = std::max(kLookMin, n / kLookShare);
        const bool skip_w = may_skip && squares_until(w, n, enough, look) >= enough;
        if (direction_in_grad && skip_w)
          lamb_pass<scalar_t, false, true, false>(w, grad, mi, vi, n, beta1, beta2, bias1, bias2, eps, wd, 1.0, 0.0,
                                                  sums);
        else if (direction_in_grad)
          lamb_pass<scalar_t, false, true>(w, grad, mi, vi, n, beta1, beta2, bias1, bias2, eps, wd, 1.0, 0.0, sums);
        else if (skip_w)
          lamb_pass<scalar_t, false, false, false>(w, grad, mi, vi, n, beta1, beta2, bias1, bias2, eps, wd, 1.0, 0.0,
                                                   sums);
        else
          lamb_pass<scalar_t, false>(w, grad, mi, vi, n, beta1, beta2, bias1, bias2, eps, wd, 1.0, 0.0, sums);
        const double w_sq = skip_w ? std::numeric_limits<double>::infinity() : sums[1];  // skip: min(., mt) = mt
        const double step = lr * lamb_trust<double>(w_sq, sums[0], s[7]);
        if (direction_in_grad)
          lamb_apply_direction<scalar_t>(w, grad, n, 1 - step * wd, step);
        else
          lamb_apply<scalar_t>(w, mi, vi, n, bias1, bias2, eps, 1 - step * wd, step);
      }
      if (norms != nullptr) {
        norms[0] = static_cast<scalar_t>(sums[1]);
        norms[1] = static_cast<scalar_t>(sums[0]);
      }
    });
  }
}

// A whole StableAdamW step of many tensors in one call: per tensor the moments with sum g^2 / max(v_hat, eps^2),
// then LAMB's step pass with decay 1 - lr wd and step lr / max(1, RMS). `settings`: one float64 row per tensor:
// lr, beta1, beta2, 1 - beta1^t, 1 - beta2^t, eps, weight_decay.
void stable_adamw_steps_(std::vector<torch::Tensor> p, std::vector<torch::Tensor> g, std::vector<torch::Tensor> m,
                         std::vector<torch::Tensor> v, torch::Tensor settings) {
  const double* rows = checked_settings("stable_adamw_steps_", p, g, m, v, {}, settings, 7);
  for (size_t i = 0; i < p.size(); ++i) {
    const double* s = rows + 7 * i;
    const double lr = s[0], bias1 = s[3], bias2 = s[4], eps = s[5], wd = s[6];
    AT_DISPATCH_FLOATING_TYPES(p[i].scalar_type(), "stable_adamw_steps", [&] {
      scalar_t *mi = m[i].data_ptr<scalar_t>(), *vi = v[i].data_ptr<scalar_t>();
      const int64_t n = p[i].numel();
      const double ratios = clipped_moments<scalar_t>(g[i].data_ptr<scalar_t>(), mi, vi, n, s[1], s[2], bias2, eps);
      const double clip = std::max(1.0, std::sqrt(ratios / static_cast<double>(n)));
      lamb_apply<scalar_t>(p[i].data_ptr<scalar_t>(), mi, vi, n, bias1, bias2, eps, 1 - lr * wd, lr / clip);
    });
  }
}

// MSAM, pass 1: a.b, a.a, b.b (one read of a and b).
template <typename T>
void dot_norms(const T* a, const T* b, int64_t n, double* out) {
  double ab = 0.0, aa = 0.0, bb = 0.0;
  const int64_t chunk = 4096;
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static) reduction(+ : ab, aa, bb)
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t end = std::min(n, start + chunk);
    T x = 0, y = 0, z = 0;
#pragma omp simd reduction(+ : x, y, z)
    for (int64_t j = start; j < end; ++j) {
      x += a[j] * b[j];
      y += a[j] * a[j];
      z += b[j] * b[j];
    }
    ab += x;
    aa += y;
    bb += z;
  }
  out[0] = ab;
  out[1] = aa;
  out[2] = bb;
}

// MSAM, pass 2: both momenta and the second moment in place, then w <- w decay - lr m / (sqrt(v c_v) + eps) with
// m = c_f fast + c_s slow (c_f = alpha / bias_fast, c_s = (1 - alpha) / bias_slow, c_v = 1 / bias_v); from the same
// reads, dot_norms' three sums of g and the slow momentum before its update (the next step's gamma, for
// gamma_from="previous").
template <typename T>
void msam_apply(T* p, const T* g, T* fast, T* slow, T* v, int64_t n, double beta_fast, double beta_slow,
                double beta_v, double c_fast, double c_slow, double c_v, double eps, double decay, double lr,
                double* sums) {
  const T bv = static_cast<T>(beta_v), af = static_cast<T>(1.0 - beta_fast), as = static_cast<T>(1.0 - beta_slow);
  const T av = static_cast<T>(1.0 - beta_v);
  const T cf = static_cast<T>(c_fast), cs = static_cast<T>(c_slow), cv = static_cast<T>(c_v);
  const T e = static_cast<T>(eps), d = static_cast<T>(decay), l = static_cast<T>(lr);
  double gs = 0.0, gg = 0.0, ss = 0.0;
  const int64_t chunk = 4096;
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static) reduction(+ : gs, gg, ss)
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t end = std::min(n, start + chunk);
    T x_s = 0, x_x = 0, s_s = 0;
    for (int64_t b = start; b < end; b += kStreamBlock<T>) {
      prefetch_ahead<T>(b, g);
      prefetch_ahead<T, true>(b, fast, slow, v, p);
      const int64_t block_end = std::min(end, b + kStreamBlock<T>);
#pragma omp simd reduction(+ : x_s, x_x, s_s)
    for (int64_t j = b; j < block_end; ++j) {
      const T x = g[j], old = slow[j];
      x_s += x * old;
      x_x += x * x;
      s_s += old * old;
      const T f = fast[j] + af * (x - fast[j]);
      const T s = old + as * (x - old);
      const T vj = v[j] * bv + av * x * x;
      fast[j] = f;
      slow[j] = s;
      v[j] = vj;
      p[j] = p[j] * d - l * (f * cf + s * cs) / (std::sqrt(vj * cv) + e);
    }
    }
    gs += x_s;
    gg += x_x;
    ss += s_s;
  }
  sums[0] = gs;
  sums[1] = gg;
  sums[2] = ss;
}

torch::Tensor dot_norms_(torch::Tensor a, torch::Tensor b) {
  auto out = torch::empty({3}, a.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dot_norms", [&] {
    dot_norms<scalar_t>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.numel(), out.data_ptr<double>());
  });
  return out;
}

torch::Tensor msam_apply_(torch::Tensor p, torch::Tensor g, torch::Tensor fast, torch::Tensor slow, torch::Tensor v,
                          double beta_fast, double beta_slow, double beta_v, double c_fast, double c_slow, double c_v,
                          double eps, double decay, double lr) {
  auto sums = torch::empty({3}, p.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "msam_apply", [&] {
    msam_apply<scalar_t>(p.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), fast.data_ptr<scalar_t>(),
                         slow.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), p.numel(), beta_fast, beta_slow, beta_v,
                         c_fast, c_slow, c_v, eps, decay, lr, sums.data_ptr<double>());
  });
  return sums;
}

// Spectra. Row-major M (m x n); a rank-k factor is applied on the rows' side ("left": U^T M, k x n, a reduction
// over rows, in per-thread partials) or on the columns' side ("right": M V, m x k, k dot products per row).

// acc[a][j] += sum_r coef[r][a] rows[r][j] for `count` (<= 4) consecutive rows: one read of acc per 4 rows
template <typename T>
inline void accumulate_rows(T* acc, const T* rows, int64_t count, int64_t n, const T* coef, int64_t k) {
  constexpr int64_t kColumns = 512;  // a column chunk of the rows stays in L1 across the k passes
  for (int64_t j0 = 0; j0 < n; j0 += kColumns) {
    const int64_t j1 = std::min(n, j0 + kColumns);
    for (int64_t a = 0; a < k; ++a) {
      T* out = acc + a * n;
      if (count == 4) {
        const T c0 = coef[a], c1 = coef[k + a], c2 = coef[2 * k + a], c3 = coef[3 * k + a];
        const T *r0 = rows, *r1 = rows + n, *r2 = rows + 2 * n, *r3 = rows + 3 * n;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) out[j] += c0 * r0[j] + c1 * r1[j] + c2 * r2[j] + c3 * r3[j];
      } else {
        for (int64_t r = 0; r < count; ++r) {
          const T c = coef[r * k + a];
          const T* row = rows + r * n;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) out[j] += c * row[j];
        }
      }
    }
  }
}

template <typename T>
inline void project_tail(const T* row, int64_t n, const T* vt, int64_t from, int64_t k, T* out) {
  for (int64_t a = from; a < k; ++a) {
    const T* v = vt + a * n;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += row[j] * v[j];
    out[a] = s;
  }
}

// out[a] = sum_j row[j] vt[a][j] (vt: k x n): four dot products per pass over the row, so that four
// independent accumulators hide the FMA latency
template <typename T>
inline void project_row(const T* row, int64_t n, const T* vt, int64_t k, T* out) {
  int64_t a = 0;
  for (; a + 4 <= k; a += 4) {
    const T *v0 = vt + a * n, *v1 = v0 + n, *v2 = v1 + n, *v3 = v2 + n;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < n; ++j) {
      const T x = row[j];
      s0 += x * v0[j];
      s1 += x * v1[j];
      s2 += x * v2[j];
      s3 += x * v3[j];
    }
    out[a] = s0;
    out[a + 1] = s1;
    out[a + 2] = s2;
    out[a + 3] = s3;
  }
  project_tail(row, n, vt, a, k, out);
}

// row[j] += sum_a c[a] q[a][j] (q: k x n), four rows of q per pass over the row
template <typename T>
inline void add_combination(T* row, int64_t n, const T* q, const T* c, int64_t k) {
  int64_t a = 0;
  for (; a + 4 <= k; a += 4) {
    const T c0 = c[a], c1 = c[a + 1], c2 = c[a + 2], c3 = c[a + 3];
    const T *q0 = q + a * n, *q1 = q0 + n, *q2 = q1 + n, *q3 = q2 + n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] += c0 * q0[j] + c1 * q1[j] + c2 * q2[j] + c3 * q3[j];
  }
  for (; a < k; ++a) {
    const T ca = c[a];
    const T* qa = q + a * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] += ca * qa[j];
  }
}

// project_row for `count` (<= 4) consecutive rows; two rows at a time share each load of vt
template <typename T>
inline void project_rows(const T* rows, int64_t count, int64_t n, const T* vt, int64_t k, T* out) {
  int64_t r = 0;
  for (; r + 2 <= count; r += 2) {
    const T *x0 = rows + r * n, *x1 = x0 + n;
    T* o0 = out + r * k;
    T* o1 = o0 + k;
    int64_t a = 0;
    for (; a + 4 <= k; a += 4) {
      const T *v0 = vt + a * n, *v1 = v0 + n, *v2 = v1 + n, *v3 = v2 + n;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0, t0 = 0, t1 = 0, t2 = 0, t3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, t0, t1, t2, t3)
      for (int64_t j = 0; j < n; ++j) {
        const T y0 = x0[j], y1 = x1[j], w0 = v0[j], w1 = v1[j], w2 = v2[j], w3 = v3[j];
        s0 += y0 * w0;
        s1 += y0 * w1;
        s2 += y0 * w2;
        s3 += y0 * w3;
        t0 += y1 * w0;
        t1 += y1 * w1;
        t2 += y1 * w2;
        t3 += y1 * w3;
      }
      o0[a] = s0;
      o0[a + 1] = s1;
      o0[a + 2] = s2;
      o0[a + 3] = s3;
      o1[a] = t0;
      o1[a + 1] = t1;
      o1[a + 2] = t2;
      o1[a + 3] = t3;
    }
    if (a < k) {
      project_tail(x0, n, vt, a, k, o0);
      project_tail(x1, n, vt, a, k, o1);
    }
  }
  if (r < count) project_row(rows + r * n, n, vt, k, out + r * k);
}

// M's row <- M + w (g - M), returning its sum of squares, with the row's first 8 dot products with vt's rows
// (out[0..7]) taken in the same loop: the products hide under the row's memory traffic instead of following it
template <typename T>
inline T lerp_row_project8(T* mi, const T* gi, int64_t n, T w, const T* vt, T* out) {
  const T *v0 = vt, *v1 = v0 + n, *v2 = v1 + n, *v3 = v2 + n, *v4 = v3 + n, *v5 = v4 + n, *v6 = v5 + n, *v7 = v6 + n;
  T sq = 0, s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : sq, s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t j = 0; j < n; ++j) {
    const T x = mi[j] + w * (gi[j] - mi[j]);
    mi[j] = x;
    sq += x * x;
    s0 += x * v0[j];
    s1 += x * v1[j];
    s2 += x * v2[j];
    s3 += x * v3[j];
    s4 += x * v4[j];
    s5 += x * v5[j];
    s6 += x * v6[j];
    s7 += x * v7[j];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
  out[4] = s4;
  out[5] = s5;
  out[6] = s6;
  out[7] = s7;
  return sq;
}

// Per-thread k x n partials of a left product (see BlockedPartials)
template <typename T>
struct LeftPartials : BlockedPartials<T> {
  int64_t k, n;
  LeftPartials(int64_t k_, int64_t n_, double* total_) : BlockedPartials<T>(k_ * n_, total_), k(k_), n(n_) {}
  void add(const T* rows, int64_t count, const T* coef) {
    accumulate_rows(this->data(), rows, count, n, coef, k);
    this->rows_added(count);
  }
};

// Pass 1: M <- M + w (g - M) in place (one read of g and M, one write of M); sum M^2; and the spike's coordinates
// from the same reads: U^T M (k x n, `left`, basis = U, m x k) or M V (m x k, basis = V^T, k x n). With g null:
// the product only (one read of M).
template <typename T>
double spectra_momentum(T* M, const T* g, int64_t m, int64_t n, double weight, const T* basis, int64_t k,
                        bool left, T* proj) {
  const int threads = at::get_num_threads();
  const T w = static_cast<T>(weight);
  std::vector<double> partial(left ? static_cast<size_t>(threads) * k * n : 0, 0.0);
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    std::unique_ptr<LeftPartials<T>> acc;
    if (left) acc = std::make_unique<LeftPartials<T>>(k, n, own_slice(partial, k * n));
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
      const int64_t count = std::min<int64_t>(4, m - i0);
      for (int64_t i = i0; i < i0 + count; ++i) {
        T* mi = M + i * n;
        if (g != nullptr && !left && k >= 8) {
          total += lerp_row_project8(mi, g + i * n, n, w, basis, proj + i * k);
          project_tail(mi, n, basis, 8, k, proj + i * k);
        } else if (g != nullptr) {
          const T* gi = g + i * n;
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < n; ++j) {
            const T x = mi[j] + w * (gi[j] - mi[j]);
            mi[j] = x;
            s += x * x;
          }
          total += s;
        }
      }
      if (left) acc->add(M + i0 * n, count, basis + i0 * k);
      else if (g == nullptr || k < 8) project_rows(M + i0 * n, count, n, basis, k, proj + i0 * k);
    }
    if (left) acc->flush();
  }
  if (left) sum_partials(partial, threads, k * n, proj);
  return total;
}

// Pass 2: W <- decay W + scale M + P Q (P m x k, Q k x n; one read of W and M, one write of W); from the same reads
// of M, `grow` 1: M Q^T (m x k), 2: P^T M (k x n), the next basis's power-iteration product.
template <typename T>
void spectra_apply(T* W, const T* M, int64_t m, int64_t n, const T* P, const T* Q, int64_t k, double decay,
                   double scale, int64_t grow, T* out) {
  const int threads = at::get_num_threads();
  const T d = static_cast<T>(decay), s = static_cast<T>(scale);
  std::vector<double> partial(grow == 2 ? static_cast<size_t>(threads) * k * n : 0, 0.0);
#pragma omp parallel num_threads(threads)
  {
    std::unique_ptr<LeftPartials<T>> acc;
    if (grow == 2) acc = std::make_unique<LeftPartials<T>>(k, n, own_slice(partial, k * n));
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
      const int64_t count = std::min<int64_t>(4, m - i0);
      for (int64_t i = i0; i < i0 + count; ++i) {
        T* wi = W + i * n;
        const T* mi = M + i * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) wi[j] = d * wi[j] + s * mi[j];
        add_combination(wi, n, Q, P + i * k, k);
      }
      if (grow == 1) project_rows(M + i0 * n, count, n, Q, k, out + i0 * k);
      if (grow == 2) acc->add(M + i0 * n, count, P + i0 * k);
    }
    if (grow == 2) acc->flush();
  }
  if (grow == 2) sum_partials(partial, threads, k * n, out);
}

// A rank-k factor of the m x n matrix M: m x k on the rows' side (`left`), k x n on the columns' side.
void check_factor(const torch::Tensor& M, const torch::Tensor& factor, bool left) {
  TORCH_CHECK(M.dim() == 2 && M.is_contiguous() && factor.dim() == 2 && factor.scalar_type() == M.scalar_type(),
              "spectra kernels take contiguous 2-D matrices and factors of their dtype");
  TORCH_CHECK(left ? factor.size(0) == M.size(0) : factor.size(1) == M.size(1), "factor of shape ", factor.sizes(),
              " does not fit a ", M.sizes(), " matrix on its ", left ? "rows'" : "columns'", " side");
}

// One pass over M, updating it from g where g is defined: the coordinates, and sum M^2 in `sum_sq` (see
// spectra_momentum)
torch::Tensor spectra_product(torch::Tensor M, const torch::Tensor& g, double weight, torch::Tensor basis, bool left,
                              double* sum_sq = nullptr) {
  basis = basis.contiguous();
  const int64_t m = M.size(0), n = M.size(1), k = left ? basis.size(1) : basis.size(0);
  check_factor(M, basis, left);
  TORCH_CHECK(!g.defined() || (g.sizes() == M.sizes() && g.scalar_type() == M.scalar_type() && g.is_contiguous()),
              "g must match M");
  auto proj = left ? torch::empty({k, n}, M.options()) : torch::empty({m, k}, M.options());
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "spectra_product", [&] {
    total = spectra_momentum<scalar_t>(M.data_ptr<scalar_t>(), g.defined() ? g.data_ptr<scalar_t>() : nullptr, m, n,
                                       weight, basis.data_ptr<scalar_t>(), k, left, proj.data_ptr<scalar_t>());
  });
  if (sum_sq != nullptr) *sum_sq = total;
  return proj;
}

std::vector<torch::Tensor> spectra_momentum_(torch::Tensor M, torch::Tensor g, double weight, torch::Tensor basis,
                                             bool left) {
  double sum_sq = 0.0;
  auto proj = spectra_product(M, g, weight, basis, left, &sum_sq);
  return {proj, torch::full({}, sum_sq, M.options().dtype(torch::kFloat64))};
}

torch::Tensor spectra_project(torch::Tensor M, torch::Tensor basis, bool left) {
  return spectra_product(M, torch::Tensor(), 0.0, basis, left);
}

torch::Tensor spectra_apply_(torch::Tensor W, torch::Tensor M, torch::Tensor P, torch::Tensor Q, double decay,
                             double scale, int64_t grow) {
  P = P.contiguous();
  Q = Q.contiguous();
  const int64_t m = W.size(0), n = W.size(1), k = P.size(1);
  TORCH_CHECK(M.sizes() == W.sizes() && M.scalar_type() == W.scalar_type() && M.is_contiguous() && W.is_contiguous(),
              "M must match W");
  check_factor(W, P, true);
  check_factor(W, Q, false);
  TORCH_CHECK(Q.size(0) == k && grow >= 0 && grow <= 2, "P (m x k) and Q (k x n) must share k; grow is 0, 1 or 2");
  auto out = grow == 1 ? torch::empty({m, k}, W.options()) : grow == 2 ? torch::empty({k, n}, W.options())
                                                                         : torch::empty({0}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "spectra_apply", [&] {
    spectra_apply<scalar_t>(W.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), m, n, P.data_ptr<scalar_t>(),
                            Q.data_ptr<scalar_t>(), k, decay, scale, grow, out.data_ptr<scalar_t>());
  });
  return out;
}

// Eigenvalues (a's diagonal on return) and eigenvectors (v's columns) of a symmetric k x k float64 matrix a
// (row-major), by cyclic Jacobi rotations: for the k <= a few dozen of a spike's Gram matrix, far cheaper than a
// LAPACK call, and accurate to rounding.
void symmetric_eigen(std::vector<double>& a, std::vector<double>& v, int64_t k) {
  v.assign(k * k, 0.0);
  for (int64_t i = 0; i < k; ++i) v[i * k + i] = 1.0;
  for (int sweep = 0; sweep < 64; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      diag += a[i * k + i] * a[i * k + i];
      for (int64_t j = i + 1; j < k; ++j) off += a[i * k + j] * a[i * k + j];
    }
    if (off <= 1e-32 * diag || off == 0.0) return;
    for (int64_t p = 0; p < k; ++p)
      for (int64_t q = p + 1; q < k; ++q) {
        const double apq = a[p * k + q];
        if (apq == 0.0) continue;
        // the rotation (c, s) that zeroes a[p][q]: t = tan of its angle, the smaller root of t^2 + 2 t theta = 1
        const double theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int64_t r = 0; r < k; ++r) {  // a <- a J, v <- v J
          const double arp = a[r * k + p], arq = a[r * k + q], vrp = v[r * k + p], vrq = v[r * k + q];
          a[r * k + p] = c * arp - s * arq;
          a[r * k + q] = s * arp + c * arq;
          v[r * k + p] = c * vrp - s * vrq;
          v[r * k + q] = s * vrp + c * vrq;
        }
        for (int64_t r = 0; r < k; ++r) {  // a <- J^T a
          const double apr = a[p * k + r], aqr = a[q * k + r];
          a[p * k + r] = c * apr - s * aqr;
          a[q * k + r] = s * apr + c * aqr;
        }
      }
  }
}

// The spike operator of spectra.py's spike_operator for one matrix, from its coordinates (C, k x c, as `proj`:
// C itself when `wide`, else C^T, c x k) and sum M^2: K = A diag((shape(s) - s) / s) A^T (k x k) from the
// eigenproblem of C C^T = A diag(s^2) A^T, and the RMS of the shaped momentum, sqrt((sum M^2 - sum s^2 +
// sum shape(s)^2) / (r c)). All in float64.
template <typename T>
double spike_operator(const T* proj, bool wide, int64_t k, int64_t r, int64_t c, double energy, int64_t shaping,
                      double spike_scale, std::vector<double>& K) {
  std::vector<double> C(k * c), gram(k * k), A;
  for (int64_t a = 0; a < k; ++a)
    for (int64_t j = 0; j < c; ++j) C[a * c + j] = wide ? proj[a * c + j] : proj[j * k + a];
  for (int64_t a = 0; a < k; ++a)
    for (int64_t b = 0; b <= a; ++b) {
      const double *x = C.data() + a * c, *y = C.data() + b * c;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < c; ++j) sum += x[j] * y[j];
      gram[a * k + b] = gram[b * k + a] = sum;
    }
  symmetric_eigen(gram, A, k);
  std::vector<double> s(k), factor(k);
  double s_sq = 0.0, target_sq = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    s[i] = std::sqrt(std::max(gram[i * k + i], 0.0));
    s_sq += s[i] * s[i];
  }
  const double tau = r > k ? std::sqrt(std::max(energy - s_sq, 0.0) / (r - k)) : INFINITY;
  for (int64_t i = 0; i < k; ++i) {
    const double target = shaping == 0 ? std::min(s[i], tau) : shaping == 1 ? 0.0 : spike_scale * s[i];
    target_sq += target * target;
    factor[i] = s[i] > 0 ? (target - s[i]) / std::max(s[i], std::numeric_limits<double>::min()) : 0.0;
  }
  K.assign(k * k, 0.0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      double sum = 0.0;
      for (int64_t l = 0; l < k; ++l) sum += A[i * k + l] * factor[l] * A[j * k + l];
      K[i * k + j] = sum;
    }
  return std::sqrt(std::max(energy - s_sq + target_sq, 0.0) / (static_cast<double>(r) * c));
}

// scale U K (r x k; U: r x k), into out as it is (`transpose` false) or transposed (k x r)
template <typename T>
void scaled_basis_product(const T* U, int64_t r, int64_t k, const std::vector<double>& K, double scale,
                          bool transpose, T* out) {
  std::vector<T> Ks(k * k);
  for (int64_t i = 0; i < k * k; ++i) Ks[i] = static_cast<T>(K[i] * scale);
  std::vector<T> row(k);
  for (int64_t i = 0; i < r; ++i) {
    std::fill(row.begin(), row.end(), T(0));
    for (int64_t a = 0; a < k; ++a) {
      const T u = U[i * k + a];
      const T* Ka = Ks.data() + a * k;
#pragma omp simd
      for (int64_t b = 0; b < k; ++b) row[b] += u * Ka[b];
    }
    for (int64_t b = 0; b < k; ++b) (transpose ? out[b * r + i] : out[i * k + b]) = row[b];
  }
}

// A whole Spectra step of one matrix W (m x n), in the order of spectra.py's docstring, with M's passes back to back
// so that a matrix's M stays in cache between them: M <- M + w (g - M) with C = U^T M; with `refresh`,
// `power_iters` block power iterations U <- qr(M (M^T U)).Q (shaping with the new U when `before`, else with the old
// one); the spike operator K; W <- decay W - step (M + U K C) / RMS. `basis` U is r x k in the wide orientation
// (r = min(m, n)); returns the basis for the next step. With `before` false and one power iteration, the next
// basis's product M C^T comes from the update's own pass (one read of M fewer).
void check_step(const torch::Tensor& W, const torch::Tensor& g, const torch::Tensor& M, const torch::Tensor& basis,
                int64_t power_iters, int64_t shaping) {
  TORCH_CHECK(W.dim() == 2 && M.sizes() == W.sizes() && M.scalar_type() == W.scalar_type() && M.is_contiguous() &&
              W.is_contiguous(), "M must match W");
  TORCH_CHECK(g.sizes() == W.sizes() && g.scalar_type() == W.scalar_type() && g.is_contiguous(), "g must match W");
  TORCH_CHECK(power_iters >= 1 && shaping >= 0 && shaping <= 2, "power_iters >= 1; shaping 0 (clip), 1, 2");
  const int64_t r = std::min(W.size(0), W.size(1));
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == r && basis.scalar_type() == W.scalar_type(), "basis of shape ",
              basis.sizes(), " for a ", W.sizes(), " matrix: expected (", r, ", k) of its dtype");
}

torch::Tensor spectra_step_(torch::Tensor W, torch::Tensor g, torch::Tensor M, torch::Tensor basis, bool refresh,
                            double weight, int64_t power_iters, bool before, int64_t shaping, double spike_scale,
                            double step, double decay) {
  check_step(W, g, M, basis, power_iters, shaping);
  const int64_t m = W.size(0), n = W.size(1), r = std::min(m, n), c = std::max(m, n);
  const bool wide = m <= n;
  // the factor on M's rows' side (wide: U, m x k) or columns' side (tall: U^T, k x n)
  auto oriented = [&](const torch::Tensor& U) { return wide ? U : U.t().contiguous(); };
  // proj: C (k x n) for a wide M, C^T = M U (m x k) for a tall one
  double energy = 0.0;
  auto proj = spectra_product(M, g, weight, oriented(basis), wide, &energy);
  auto used = basis, next = basis;
  const bool grow_in_apply = refresh && !before && power_iters == 1;
  if (refresh && !grow_in_apply) {
    auto coords = proj;
    for (int64_t it = 0; it < power_iters; ++it) {
      // M C^T (m x k) for a wide M; (C^T)^T M = (M^T M U)^T (k x n) for a tall one
      auto grown = spectra_product(M, torch::Tensor(), 0.0, coords, !wide);
      next = std::get<0>(at::linalg_qr(wide ? grown : grown.t())).contiguous();
      if (before || it + 1 < power_iters) coords = spectra_product(M, torch::Tensor(), 0.0, oriented(next), wide);
    }
    if (before) {
      used = next;
      proj = coords;
    }
  }
  if (M.scalar_type() == torch::kFloat32) energy = static_cast<float>(energy);  // as the foreach path's fp32 sum
  used = used.contiguous();
  const int64_t k = used.size(1);
  auto left = wide ? torch::empty({r, k}, M.options()) : torch::empty({k, r}, M.options());  // P, or Q = P^T
  double scale = 0.0;
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "spectra_step", [&] {
    std::vector<double> K;
    const double rms = spike_operator<scalar_t>(proj.data_ptr<scalar_t>(), wide, k, r, c, energy, shaping,
                                                spike_scale, K);
    scale = -step / std::max(rms, 1e-30);
    scaled_basis_product<scalar_t>(used.data_ptr<scalar_t>(), r, k, K, scale, !wide, left.data_ptr<scalar_t>());
  });
  const auto P = wide ? left : proj, Q = wide ? proj : left;
  const int64_t grow = grow_in_apply ? (wide ? 1 : 2) : 0;
  auto grown = spectra_apply_(W, M, P, Q, decay, scale, grow);
  if (grow_in_apply) next = std::get<0>(at::linalg_qr(wide ? grown : grown.t())).contiguous();
  return next;
}

// spectra_step_ for many matrices at once, one matrix per thread (largest first): the small work of one matrix
// (its QR, eigenproblem and products of size k) overlaps another's passes, and each matrix stays in its thread's
// cache between its passes. Returns the bases for the next step.
std::vector<torch::Tensor> spectra_steps_(std::vector<torch::Tensor> W, std::vector<torch::Tensor> g,
                                          std::vector<torch::Tensor> M, std::vector<torch::Tensor> basis,
                                          std::vector<bool> refresh, double weight, int64_t power_iters, bool before,
                                          int64_t shaping, double spike_scale, double step, double decay) {
  const int64_t count = static_cast<int64_t>(W.size());
  TORCH_CHECK(g.size() == W.size() && M.size() == W.size() && basis.size() == W.size() && refresh.size() == W.size(),
              "one gradient, momentum, basis and refresh flag per matrix");
  for (int64_t i = 0; i < count; ++i) check_step(W[i], g[i], M[i], basis[i], power_iters, shaping);
  std::vector<int64_t> order(count);
  for (int64_t i = 0; i < count; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return W[a].numel() > W[b].numel(); });
  std::vector<torch::Tensor> next(count);
  std::exception_ptr failure = nullptr;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = order[j];
    try {
      torch::NoGradGuard no_grad;  // a worker thread's own autograd state
      next[i] = spectra_step_(W[i], g[i], M[i], basis[i], refresh[i], weight, power_iters, before, shaping,
                              spike_scale, step, decay);
    } catch (...) {
#pragma omp critical
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
  return next;
}

// bfloat16 bits of x, rounded to nearest even (NaN stays NaN), as torch's conversion; integer work that vectorizes
inline uint16_t bf16_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  const uint16_t rounded = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  return x != x ? uint16_t(0x7FC0) : rounded;
}

inline float from_bf16_bits(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

inline void store(float* out, int64_t j, float x) { out[j] = x; }
inline void store(uint16_t* out, int64_t j, float x) { out[j] = bf16_bits(x); }
inline float load(const float* in, int64_t j) { return in[j]; }
inline float load(const uint16_t* in, int64_t j) { return from_bf16_bits(in[j]); }

// torch.lerp's formula for a scalar weight: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w)
inline float lerp(float start, float end, float w, bool small) {
  return small ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

// Muon, before Newton–Schulz: the momentum buf <- lerp(buf, g, 1 - mu) in place and the update
// u = lerp(g, buf, mu) (Nesterov) or buf written to `out` in the product precision (fp32, or bf16 bits) (one read
// of g and buf; one write of buf and out), in place of lerp_, lerp and .to(dtype)
template <typename Out>
void muon_momentum(const float* g, float* buf, Out* out, int64_t n, double momentum, bool nesterov) {
  const float w = static_cast<float>(1.0 - momentum), mu = static_cast<float>(momentum);  // as torch's weights
  const bool small_w = w < 0.5f, small_mu = mu < 0.5f;
#pragma omp parallel for simd num_threads(at::get_num_threads()) schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const float b = lerp(buf[j], g[j], w, small_w);
    buf[j] = b;
    store(out, j, nesterov ? lerp(g[j], b, mu, small_mu) : b);
  }
}

// Muon, after Newton–Schulz: p <- p decay - step u, u in fp32 or bf16 bits (one read of p and u; one write of p),
// in place of mul_ and add_, rounded as they round: p decay, then one fused multiply-add of u
template <typename In>
void muon_apply(float* p, const In* u, int64_t n, float decay, float step) {
#pragma omp parallel for simd num_threads(at::get_num_threads()) schedule(static)
  for (int64_t j = 0; j < n; ++j) p[j] = std::fma(-step, load(u, j), p[j] * decay);
}

void check_muon(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c, const char* name) {
  for (const auto& t : {a, b, c}) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == a.numel(), name,
                ": every tensor must be a contiguous CPU tensor of the parameter's size");
  }
  TORCH_CHECK(a.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32, name,
              ": the parameter-sized tensors must be float32");
  TORCH_CHECK(c.scalar_type() == torch::kFloat32 || c.scalar_type() == torch::kBFloat16, name,
              ": the Newton–Schulz tensor must be float32 or bfloat16");
}

void muon_momentum_(torch::Tensor g, torch::Tensor buf, torch::Tensor out, double momentum, bool nesterov) {
  check_muon(g, buf, out, "muon_momentum_");
  if (out.scalar_type() == torch::kBFloat16) {
    muon_momentum(g.data_ptr<float>(), buf.data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()),
                  g.numel(), momentum, nesterov);
  } else {
    muon_momentum(g.data_ptr<float>(), buf.data_ptr<float>(), out.data_ptr<float>(), g.numel(), momentum, nesterov);
  }
}

void muon_apply_(torch::Tensor p, torch::Tensor u, double decay, double step) {
  check_muon(p, p, u, "muon_apply_");
  const float d = static_cast<float>(decay), s = static_cast<float>(step);
  if (u.scalar_type() == torch::kBFloat16) {
    muon_apply(p.data_ptr<float>(), reinterpret_cast<const uint16_t*>(u.data_ptr()), p.numel(), d, s);
  } else {
    muon_apply(p.data_ptr<float>(), u.data_ptr<float>(), p.numel(), d, s);
  }
}

std::vector<torch::Tensor> adafactor_stats(torch::Tensor p, torch::Tensor g) {
  const int64_t m = g.size(0), n = g.size(1);
  auto options = g.options().dtype(torch::kFloat64);
  auto row = torch::empty({m}, options), col = torch::empty({n}, options), p_sq = torch::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "adafactor_stats", [&] {
    factored_stats<scalar_t>(p.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), m, n, row.data_ptr<double>(),
                             col.data_ptr<double>(), p_sq.data_ptr<double>());
  });
  return {row, col, p_sq};
}

double adafactor_inverse_variance_sum(torch::Tensor g, torch::Tensor row_factor, torch::Tensor col, double floor) {
  double out = 0.0;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "adafactor_inverse_variance_sum", [&] {
    out = inverse_variance_sum<scalar_t>(g.data_ptr<scalar_t>(), g.size(0), g.size(1), row_factor.data_ptr<double>(),
                                         col.data_ptr<double>(), floor);
  });
  return out;
}

void adafactor_update(torch::Tensor p, torch::Tensor g, torch::Tensor row_factor, torch::Tensor col, double floor,
                      double decay, double step) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "adafactor_update", [&] {
    factored_update<scalar_t>(p.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), g.size(0), g.size(1),
                              row_factor.data_ptr<double>(), col.data_ptr<double>(), floor, decay, step);
  });
}
"""

# -fno-math-errno: sqrt must not set errno, or GCC will not vectorize it
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
# vector instructions torch itself dispatches to on this CPU (torch.backends.cpu.get_cpu_capability())
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma"]}
_FUNCTIONS = ["adafactor_stats", "adafactor_inverse_variance_sum", "adafactor_update", "lamb_steps_",
              "stable_adamw_steps_", "dot_norms_", "msam_apply_", "spectra_momentum_", "spectra_project",
              "spectra_apply_", "spectra_step_", "spectra_steps_", "muon_momentum_",
              "muon_apply_", "set_prefetch"]
_NAME = "lmopt_cpu_kernels_v31"
_failure: list[str] = []
_KERNEL_DTYPES = (torch.float32, torch.float64)


@contextlib.contextmanager
def stale_torch_lock_cleared(build_directory: str | Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``build_directory`` and remove torch's ``lock`` file there if one is left.

    ``torch.utils.cpp_extension`` marks a build in progress with a file named ``lock`` and waits while it
    exists; a process killed mid-build leaves it, and every later load of the extension then hangs. Every
    lmopt build takes ``lmopt.lock`` with ``flock`` first (the kernel releases it when its holder dies), so
    whoever holds it knows no other lmopt build is running and a ``lock`` file found then is stale.
    """
    directory = Path(build_directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no OS lock, leave torch's file alone
        yield
        return
    with open(directory / "lmopt.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                warnings.warn(f"removing a stale torch build lock left by a killed build: {stale}", stacklevel=3)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _torch_build_directory(name: str) -> str:
    """Where torch builds extension ``name`` (``TORCH_EXTENSIONS_DIR``, or ~/.cache/torch_extensions/py3XX_cpu)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, verbose=False)  # the same rule as torch's own loads


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels, or None where they cannot be built (see :func:`unavailable_reason`)."""
    if os.environ.get("LMOPT_NO_CPU_KERNELS"):
        _failure.append("disabled by LMOPT_NO_CPU_KERNELS")
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        capability = torch.backends.cpu.get_cpu_capability()  # the build is cached per instruction set
        name = f"{_NAME}_{capability.lower()}"
        build_directory = _torch_build_directory(name)
        with stale_torch_lock_cleared(build_directory):
            return load_inline(name=name, cpp_sources=[_SOURCE], functions=_FUNCTIONS,
                               extra_cflags=[*_CFLAGS, *_ISA_FLAGS.get(capability, [])], extra_ldflags=["-fopenmp"],
                               build_directory=build_directory, verbose=False)
    except Exception as error:  # no compiler, no ninja, no OpenMP: the callers fall back
        _failure.append(f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}")
        return None


def fused_or_fallback(impl: str, owner: str, fallback: str = "compiled") -> str:
    """``impl``, or ``fallback`` (after a warning) when it is "fused" and the kernels cannot be built here."""
    if impl == "fused" and kernels() is None:
        warnings.warn(f"{owner}(impl='fused'): the C++ kernels cannot be built here ({unavailable_reason()}); "
                      f"using impl={fallback!r}", stacklevel=3)
        return fallback
    return impl


def unavailable_reason() -> str:
    return _failure[-1] if _failure else ""


def kernels_for(*tensors: torch.Tensor, matrix: bool = True) -> ModuleType | None:
    """The compiled kernels where they are built and take these tensors (see :func:`usable`), else None."""
    built = kernels()
    return built if built is not None and usable(*tensors, matrix=matrix) else None


def usable(*tensors: torch.Tensor, matrix: bool = True, same_shape: bool = True) -> bool:
    """The kernels take contiguous float32/float64 CPU tensors of one dtype and (where ``same_shape``) one shape,
    2-D where ``matrix``."""
    first = tensors[0]  # (a loop, not all() over a generator: this runs for every tensor of every fused step)
    if first.dtype not in _KERNEL_DTYPES:
        return False
    for t in tensors:
        if (t.device.type != "cpu" or not t.is_contiguous() or t.dtype != first.dtype or (matrix and t.dim() != 2)
                or (same_shape and t.shape != first.shape) or is_dtensor(t)):
            return False
    return True
