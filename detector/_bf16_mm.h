// bfloat16 matrix products for the fused forward (detector/_fused_rnn.cpp), with AVX512_BF16's VDPBF16PS.
//
// Opt-in (models.precision: bfloat16 on a CPU that has AVX512_BF16: AMD Zen 4 and later, Intel Cooper Lake,
// Sapphire Rapids and later). Each product rounds its two inputs to bfloat16 (round to nearest even) and
// accumulates in float32; the gates, the state and everything else stay float32, as in oneDNN's bf16 RNNs.
// VDPBF16PS does 32 multiply-adds per instruction where a float32 FMA does 16, and the matrix products are
// most of the forward (RESULTS.md item 14).
//
// Compiled with a target attribute, whatever -march the extension is built for (x86-64-v3, v4 or native), and
// used only when the CPU reports the feature at run time (bf16_supported()).
//
// Layout: a weight W (n x k) as k2 = ceil(k/2) rows of n_pad 32-bit pairs, pair (p, j) = (W[j, 2p] in the low
// half, W[j, 2p+1] in the high half; 0 past k); A's rows are converted to the same pairs before each product.
// VDPBF16PS then adds, per 32-bit lane j, A[r, 2p] * W[j, 2p] + A[r, 2p+1] * W[j, 2p+1].

#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ANOMALYD_HAVE_BF16_CODE 1
#include <immintrin.h>
#define ANOMALYD_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace anomalyd_bf16 {

// float32 -> bfloat16 bits, round to nearest even (what VCVTNEPS2BF16 does for finite values).
inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

// Pair p of a row of k floats: elements 2p (low half) and 2p+1 (high half; 0 past k), as bfloat16.
inline uint32_t pair(const float* row, int64_t p, int64_t k) {
  return bits(row[2 * p]) | (2 * p + 1 < k ? bits(row[2 * p + 1]) << 16 : 0u);
}

// W (n x k, row-major, PyTorch's layout) as pairs, columns padded to n_pad.
inline std::vector<uint32_t> pack_pairs(const float* w, int64_t n, int64_t k, int64_t n_pad) {
  const int64_t k2 = (k + 1) / 2;
  std::vector<uint32_t> out(static_cast<size_t>(k2 * n_pad), 0u);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < k2; ++p) out[p * n_pad + j] = pair(w + j * k, p, k);
  return out;
}

inline bool supported() {
#ifdef ANOMALYD_HAVE_BF16_CODE
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

#ifdef ANOMALYD_HAVE_BF16_CODE
// Row r of A (k floats) -> k2 pairs. 16 at a time with VCVTNEPS2BF16 (its 16 results, in order, are 8 pairs),
// the rest by pair(): the same rounding, so a row's pairs do not depend on where the vector part ends.
ANOMALYD_BF16_TARGET inline void row_pairs(const float* a, int64_t k, uint32_t* out) {
  int64_t p = 0;
  for (; 2 * p + 16 <= k; p += 8) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(a + 2 * p));
    std::memcpy(out + p, &v, 32);
  }
  for (; 2 * p < k; ++p) out[p] = pair(a, p, k);
}

// C rows 0..R, 16-column vectors j0..j0+V (of n real columns): C[r, cols] = A2[r, :] . W2[:, cols].
template <int R, int V>
ANOMALYD_BF16_TARGET inline void block(const uint32_t* a2, int64_t k2, const uint32_t* w2, int64_t n_pad, int64_t n,
                                       int64_t j0, float* C, int64_t ldc) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh b[V];
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(w2 + p * n_pad + j0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(a2[r * k2 + p]));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const int64_t col = j0 + 16 * v, m = n - col;
      if (m >= 16)
        _mm512_storeu_ps(C + r * ldc + col, acc[r][v]);
      else if (m > 0)
        _mm512_mask_storeu_ps(C + r * ldc + col, static_cast<__mmask16>((1u << m) - 1u), acc[r][v]);
    }
}

template <int V>
ANOMALYD_BF16_TARGET inline void column_block(int64_t m, const uint32_t* a2, int64_t k2, const uint32_t* w2,
                                              int64_t n_pad, int64_t n, int64_t j0, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) block<8, V>(a2 + i * k2, k2, w2, n_pad, n, j0, C + i * ldc, ldc);
  for (; i + 4 <= m; i += 4) block<4, V>(a2 + i * k2, k2, w2, n_pad, n, j0, C + i * ldc, ldc);
  for (; i < m; ++i) block<1, V>(a2 + i * k2, k2, w2, n_pad, n, j0, C + i * ldc, ldc);
}

// C (m x n, row stride ldc) = A (m x k, row stride lda) . W^T, W packed by pack_pairs; single-threaded.
// 8 rows x 3 vectors of accumulators + 3 weight vectors + 1 broadcast: 28 of the 32 zmm registers.
ANOMALYD_BF16_TARGET inline void mm(int64_t m, const float* A, int64_t lda, int64_t k, const std::vector<uint32_t>& w2,
                                    int64_t n, int64_t n_pad, float* C, int64_t ldc) {
  const int64_t k2 = (k + 1) / 2;
  thread_local std::vector<uint32_t> a2;
  if (a2.size() < static_cast<size_t>(m * k2)) a2.resize(static_cast<size_t>(m * k2));
  for (int64_t r = 0; r < m; ++r) row_pairs(A + r * lda, k, a2.data() + r * k2);
  int64_t j0 = 0;
  for (; j0 + 48 <= n_pad; j0 += 48) column_block<3>(m, a2.data(), k2, w2.data(), n_pad, n, j0, C, ldc);
  for (; j0 < n_pad; j0 += 16) column_block<1>(m, a2.data(), k2, w2.data(), n_pad, n, j0, C, ldc);
}
#endif

}  // namespace anomalyd_bf16
