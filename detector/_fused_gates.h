// Gate math of the fused GRU/LSTM forward (included by _fused_rnn.cpp; part of the build key in fastpath.py).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace anomalyd_gates {

inline float sigm(float x) { return 1.0f / (1.0f + std::exp(-x)); }

#ifdef __AVX512F__
// Gate math 16 lanes at a time, inlined (libmvec's expf/tanhf are calls with their own special-case paths; the
// gate pass was about a fifth of the forward). exp: n = round(x / ln 2), r = x - n ln 2 in two parts, Cephes'
// degree-5 polynomial, scaled by 2^n (about 1 ulp on |r| <= ln2 / 2); 1 / y: rcp14 and one Newton step
// (relative error about 1e-8); tanh(x) = 2 sigmoid(2x) - 1 (absolute error about 1e-7).
inline __m512 vexp_neg(__m512 x) {  // exp(-x)
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(87.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer (ties even)
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(-1.44269504088896341f), magic), magic);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // -(the reduced argument): -x - n ln2 = -r
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(-1.9875691500e-4f);  // the polynomial in -r: odd powers' signs flipped
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(-8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(-1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_sub_ps(_mm512_set1_ps(1.0f), r));
  return _mm512_scalef_ps(y, n);
}
inline __m512 vrecip(__m512 d) {
  const __m512 e = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(e, _mm512_fnmadd_ps(d, e, _mm512_set1_ps(2.0f)));  // e (2 - d e)
}
inline __m512 vsigm(__m512 x) { return vrecip(_mm512_add_ps(_mm512_set1_ps(1.0f), vexp_neg(x))); }
inline __m512 vtanh(__m512 x) {
  const __m512 s = vsigm(_mm512_add_ps(x, x));
  return _mm512_fmsub_ps(s, _mm512_set1_ps(2.0f), _mm512_set1_ps(1.0f));
}

// The same functions over N vectors at once, each step applied to all N before the next: N independent chains in
// program order. One chain at a time is a long dependent sequence (about 20 operations through the exp, the
// reciprocal and back), and the scheduler filled up with its waiting operations before the next window's
// chain came in: the gate pass ran at about one operation per cycle where the vector ports take two.
#define ANOMALYD_EACH for (int k = 0; k < N; ++k)
template <int N>
inline void vsigm_n(__m512* x) {  // x[k] <- sigmoid(x[k]), as vsigm
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  __m512 n[N], r[N];
  ANOMALYD_EACH x[k] = _mm512_min_ps(_mm512_max_ps(x[k], _mm512_set1_ps(-88.0f)), _mm512_set1_ps(87.0f));
  ANOMALYD_EACH n[k] = _mm512_sub_ps(_mm512_fmadd_ps(x[k], _mm512_set1_ps(-1.44269504088896341f), magic), magic);
  ANOMALYD_EACH r[k] = _mm512_fmadd_ps(n[k], _mm512_set1_ps(0.693359375f), x[k]);
  ANOMALYD_EACH r[k] = _mm512_fmadd_ps(n[k], _mm512_set1_ps(-2.12194440e-4f), r[k]);
  ANOMALYD_EACH x[k] = _mm512_fmadd_ps(_mm512_set1_ps(-1.9875691500e-4f), r[k], _mm512_set1_ps(1.3981999507e-3f));
  ANOMALYD_EACH x[k] = _mm512_fmadd_ps(x[k], r[k], _mm512_set1_ps(-8.3334519073e-3f));
  ANOMALYD_EACH x[k] = _mm512_fmadd_ps(x[k], r[k], _mm512_set1_ps(4.1665795894e-2f));
  ANOMALYD_EACH x[k] = _mm512_fmadd_ps(x[k], r[k], _mm512_set1_ps(-1.6666665459e-1f));
  ANOMALYD_EACH x[k] = _mm512_fmadd_ps(x[k], r[k], _mm512_set1_ps(5.0000001201e-1f));
  ANOMALYD_EACH x[k] = _mm512_fmadd_ps(x[k], _mm512_mul_ps(r[k], r[k]), _mm512_sub_ps(_mm512_set1_ps(1.0f), r[k]));
  ANOMALYD_EACH x[k] = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(x[k], n[k]));  // 1 + exp(-x)
  ANOMALYD_EACH r[k] = _mm512_rcp14_ps(x[k]);
  ANOMALYD_EACH x[k] = _mm512_mul_ps(r[k], _mm512_fnmadd_ps(x[k], r[k], _mm512_set1_ps(2.0f)));
}
template <int N>
inline void vtanh_n(__m512* x) {  // x[k] <- tanh(x[k]), as vtanh
  ANOMALYD_EACH x[k] = _mm512_add_ps(x[k], x[k]);
  vsigm_n<N>(x);
  ANOMALYD_EACH x[k] = _mm512_fmsub_ps(x[k], _mm512_set1_ps(2.0f), _mm512_set1_ps(1.0f));
}
constexpr int GATE_GROUP = 4;  // vectors (64 hidden units) per interleaved group
constexpr int64_t GATE_VL = 16;
#else
constexpr int64_t GATE_VL = 0;  // scalar gates only
#endif

// One GRU step's gates for one window: h <- (1 - z) n + z h, j in [0, H).
inline void gru_gates(const float* g, const float* q, const float* bh, float* hi, int64_t H) {
  int64_t j = 0;
#ifdef __AVX512F__
  constexpr int N = GATE_GROUP;
  for (; j + N * GATE_VL <= H; j += N * GATE_VL) {
    __m512 rz[2 * N], ng[N];  // r gates, then z gates
    for (int k = 0; k < 2 * N; ++k) {
      const int64_t o = (k < N ? 0 : H) + j + (k % N) * GATE_VL;
      rz[k] = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(g + o), _mm512_loadu_ps(q + o)), _mm512_loadu_ps(bh + o));
    }
    vsigm_n<2 * N>(rz);
    ANOMALYD_EACH {
      const int64_t o = 2 * H + j + k * GATE_VL;
      const __m512 hn = _mm512_add_ps(_mm512_loadu_ps(q + o), _mm512_loadu_ps(bh + o));
      ng[k] = _mm512_fmadd_ps(rz[k], hn, _mm512_loadu_ps(g + o));
    }
    vtanh_n<N>(ng);
    ANOMALYD_EACH {
      const __m512 h = _mm512_loadu_ps(hi + j + k * GATE_VL);
      _mm512_storeu_ps(hi + j + k * GATE_VL, _mm512_fmadd_ps(rz[N + k], _mm512_sub_ps(h, ng[k]), ng[k]));
    }
  }
  for (; j + GATE_VL <= H; j += GATE_VL) {
    const __m512 rg = vsigm(_mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(g + j), _mm512_loadu_ps(q + j)),
                                          _mm512_loadu_ps(bh + j)));
    const __m512 zg = vsigm(_mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(g + H + j), _mm512_loadu_ps(q + H + j)),
                                          _mm512_loadu_ps(bh + H + j)));
    const __m512 hn = _mm512_add_ps(_mm512_loadu_ps(q + 2 * H + j), _mm512_loadu_ps(bh + 2 * H + j));
    const __m512 ng = vtanh(_mm512_fmadd_ps(rg, hn, _mm512_loadu_ps(g + 2 * H + j)));
    const __m512 h = _mm512_loadu_ps(hi + j);
    _mm512_storeu_ps(hi + j, _mm512_fmadd_ps(zg, _mm512_sub_ps(h, ng), ng));
  }
#endif
  for (; j < H; ++j) {
    const float rg = sigm(g[j] + q[j] + bh[j]);
    const float zg = sigm(g[H + j] + q[H + j] + bh[H + j]);
    const float ng = std::tanh(g[2 * H + j] + rg * (q[2 * H + j] + bh[2 * H + j]));
    hi[j] = ng + zg * (hi[j] - ng);
  }
}

// One LSTM step's gates for one window (gate order i, f, g, o; both biases already in g).
inline void lstm_gates(const float* g, const float* q, float* ci, float* hi, int64_t H) {
  int64_t j = 0;
#ifdef __AVX512F__
  constexpr int N = GATE_GROUP;
  for (; j + N * GATE_VL <= H; j += N * GATE_VL) {
    __m512 ifo[3 * N], gg[N];  // i, f and o gates; g
    for (int k = 0; k < 3 * N; ++k) {
      const int64_t o = (k < N ? 0 : k < 2 * N ? H : 3 * H) + j + (k % N) * GATE_VL;
      ifo[k] = _mm512_add_ps(_mm512_loadu_ps(g + o), _mm512_loadu_ps(q + o));
    }
    ANOMALYD_EACH {
      const int64_t o = 2 * H + j + k * GATE_VL;
      gg[k] = _mm512_add_ps(_mm512_loadu_ps(g + o), _mm512_loadu_ps(q + o));
    }
    vsigm_n<3 * N>(ifo);
    vtanh_n<N>(gg);
    ANOMALYD_EACH {
      const __m512 c = _mm512_loadu_ps(ci + j + k * GATE_VL);
      const __m512 cn = _mm512_fmadd_ps(ifo[N + k], c, _mm512_mul_ps(ifo[k], gg[k]));
      _mm512_storeu_ps(ci + j + k * GATE_VL, cn);
      gg[k] = cn;
    }
    vtanh_n<N>(gg);
    ANOMALYD_EACH _mm512_storeu_ps(hi + j + k * GATE_VL, _mm512_mul_ps(ifo[2 * N + k], gg[k]));
  }
  for (; j + GATE_VL <= H; j += GATE_VL) {
    const __m512 ig = vsigm(_mm512_add_ps(_mm512_loadu_ps(g + j), _mm512_loadu_ps(q + j)));
    const __m512 fg = vsigm(_mm512_add_ps(_mm512_loadu_ps(g + H + j), _mm512_loadu_ps(q + H + j)));
    const __m512 gg = vtanh(_mm512_add_ps(_mm512_loadu_ps(g + 2 * H + j), _mm512_loadu_ps(q + 2 * H + j)));
    const __m512 og = vsigm(_mm512_add_ps(_mm512_loadu_ps(g + 3 * H + j), _mm512_loadu_ps(q + 3 * H + j)));
    const __m512 cn = _mm512_fmadd_ps(fg, _mm512_loadu_ps(ci + j), _mm512_mul_ps(ig, gg));
    _mm512_storeu_ps(ci + j, cn);
    _mm512_storeu_ps(hi + j, _mm512_mul_ps(og, vtanh(cn)));
  }
#endif
  for (; j < H; ++j) {
    const float ig = sigm(g[j] + q[j]);
    const float fg = sigm(g[H + j] + q[H + j]);
    const float gg = std::tanh(g[2 * H + j] + q[2 * H + j]);
    const float og = sigm(g[3 * H + j] + q[3 * H + j]);
    const float cn = fg * ci[j] + ig * gg;
    ci[j] = cn;
    hi[j] = og * std::tanh(cn);
  }
}

}  // namespace anomalyd_gates
