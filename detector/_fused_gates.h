// Gate math of the fused GRU/LSTM forward (included by _fused_rnn.cpp; part of the build key in fastpath.py).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace anomalyd_gates {

// The scalar gates (AVX-512's remainder columns, every column of the AVX2 build) clamp their arguments as the vector
// ones do: built with -ffast-math, the vectorised libm calls (libmvec) gave NaN past about |x| = 88, where the
// gates saturate, so that one far-out reading (a sentinel such as -9999) made a GRU's reconstruction NaN.
inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
inline float sigm(float x) { return 1.0f / (1.0f + std::exp(-clampf(x, -87.0f, 87.0f))); }
inline float tanhc(float x) { return std::tanh(clampf(x, -15.0f, 15.0f)); }  // tanh(15) is 1.0f

#ifdef __AVX512F__
// Gate math 16 lanes at a time, inlined (libmvec's expf/tanhf are calls with their own special-case paths; the
// gate pass was about a fifth of the forward). exp(-x): n = round(-x / ln 2) (adding 1.5 * 2^23 rounds, ties to
// even), r = x + n ln 2 in two parts, Cephes' degree-5 polynomial in -r (odd powers' signs flipped), scaled by
// 2^n (about 1 ulp on |r| <= ln2 / 2); 1 / y: rcp14 and one Newton step (relative error about 1e-8);
// tanh(x) = 2 sigmoid(2x) - 1 (absolute error about 1e-7).
// Over N vectors at once, each step applied to all N before the next: N independent chains in program order. One
// chain at a time is a long dependent sequence (about 20 operations through the exp, the reciprocal and back), and
// the scheduler filled up with its waiting operations before the next window's chain came in: the gate pass ran
// at about one operation per cycle where the vector ports take two.
#define ANOMALYD_EACH for (int k = 0; k < N; ++k)
template <int N>
inline void vsigm_n(__m512* x) {  // x[k] <- sigmoid(x[k])
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
  ANOMALYD_EACH x[k] = _mm512_mul_ps(r[k], _mm512_fnmadd_ps(x[k], r[k], _mm512_set1_ps(2.0f)));  // e (2 - d e)
}
template <int N>
inline void vtanh_n(__m512* x) {  // x[k] <- tanh(x[k])
  ANOMALYD_EACH x[k] = _mm512_add_ps(x[k], x[k]);
  vsigm_n<N>(x);
  ANOMALYD_EACH x[k] = _mm512_fmsub_ps(x[k], _mm512_set1_ps(2.0f), _mm512_set1_ps(1.0f));
}
constexpr int GATE_GROUP = 4;  // vectors (64 hidden units) per interleaved group; then single vectors
constexpr int64_t GATE_VL = 16;

// One GRU step's gates for N vectors of hidden units from j.
template <int N>
inline void gru_group(const float* g, const float* q, const float* bh, float* hi, int64_t H, int64_t j) {
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

// One LSTM step's gates for N vectors of hidden units from j.
template <int N>
inline void lstm_group(const float* g, const float* q, float* ci, float* hi, int64_t H, int64_t j) {
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
#else
constexpr int64_t GATE_VL = 0;  // scalar gates only
#endif

// One GRU step's gates for one window: h <- (1 - z) n + z h, j in [0, H).
inline void gru_gates(const float* g, const float* q, const float* bh, float* hi, int64_t H) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + GATE_GROUP * GATE_VL <= H; j += GATE_GROUP * GATE_VL) gru_group<GATE_GROUP>(g, q, bh, hi, H, j);
  for (; j + GATE_VL <= H; j += GATE_VL) gru_group<1>(g, q, bh, hi, H, j);
#endif
  for (; j < H; ++j) {
    const float rg = sigm(g[j] + q[j] + bh[j]);
    const float zg = sigm(g[H + j] + q[H + j] + bh[H + j]);
    const float ng = tanhc(g[2 * H + j] + rg * (q[2 * H + j] + bh[2 * H + j]));
    hi[j] = ng + zg * (hi[j] - ng);
  }
}

// One LSTM step's gates for one window (gate order i, f, g, o; both biases already in g).
inline void lstm_gates(const float* g, const float* q, float* ci, float* hi, int64_t H) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + GATE_GROUP * GATE_VL <= H; j += GATE_GROUP * GATE_VL) lstm_group<GATE_GROUP>(g, q, ci, hi, H, j);
  for (; j + GATE_VL <= H; j += GATE_VL) lstm_group<1>(g, q, ci, hi, H, j);
#endif
  for (; j < H; ++j) {
    const float ig = sigm(g[j] + q[j]);
    const float fg = sigm(g[H + j] + q[H + j]);
    const float gg = tanhc(g[2 * H + j] + q[2 * H + j]);
    const float og = sigm(g[3 * H + j] + q[3 * H + j]);
    const float cn = fg * ci[j] + ig * gg;
    ci[j] = cn;
    hi[j] = og * tanhc(cn);
  }
}

// x[j] <- tanh(x[j] + b[j]), j in [0, n): the decoder's initial state, once per window (the scalar std::tanh
// here was about 3 % of a stride-1 pipeline's profile, as much as the gate pass of a whole step).
inline void tanh_bias(float* x, const float* b, int64_t n) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + GATE_GROUP * GATE_VL <= n; j += GATE_GROUP * GATE_VL) {
    __m512 v[GATE_GROUP];
    for (int k = 0; k < GATE_GROUP; ++k)
      v[k] = _mm512_add_ps(_mm512_loadu_ps(x + j + k * GATE_VL), _mm512_loadu_ps(b + j + k * GATE_VL));
    vtanh_n<GATE_GROUP>(v);
    for (int k = 0; k < GATE_GROUP; ++k) _mm512_storeu_ps(x + j + k * GATE_VL, v[k]);
  }
  for (; j + GATE_VL <= n; j += GATE_VL) {
    __m512 v[1] = {_mm512_add_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(b + j))};
    vtanh_n<1>(v);
    _mm512_storeu_ps(x + j, v[0]);
  }
#endif
  for (; j < n; ++j) x[j] = tanhc(x[j] + b[j]);
}

}  // namespace anomalyd_gates
