// Fused CPU inference of the GRU/LSTM sequence autoencoders of detector/models.py (built by detector/fastpath.py).
//
// Same equations and weights as torch.nn.GRU / torch.nn.LSTM (gate order r,z,n and i,f,g,o), but:
//  * the whole forward (encoder, latent, decoder, output) runs in C++ with no per-step Python/dispatcher cost;
//  * each time step is one small matrix product (h . W_hh^T) plus ONE fused, vectorised pass over the gates
//    (eager PyTorch runs ~10 small ops per GRU step);
//  * the decoder's input is the same latent z at every step, so its input projection z . W_ih^T + b is computed
//    once per window instead of once per step;
//  * the batch is cut into tiles of `tile` windows that stay in cache through all steps; tiles are handed out to
//    the intra-op threads dynamically (an atomic counter), so a thread slowed by a competing process does not
//    hold the others up;
//  * the matrix products use a small register-blocked kernel below, not the BLAS: a threaded BLAS call per
//    step (MKL starts its own threads for a 32x64x192 product) collapses by 1000x when another process holds
//    a core, and the shapes here are too small for BLAS blocking to pay. With AVX-512 it keeps 8 rows x 3
//    vectors of accumulators and the 3 weight vectors in registers (GCC otherwise re-loads the weights from
//    memory for every row, which made the loads, not the FMAs, the limit), and walks column blocks outermost
//    so a block's weights stay in L1 across the tile's rows.
// A window's result does not depend on the batch it came in or on the tile size (same operations in the same
// order for every row), unlike eager PyTorch, whose BLAS blocks differently by batch size.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "_bf16_mm.h"
#include "_fused_gates.h"
#include "_window_ring.h"

namespace {

// ------------------------------------------------------------------------------------------- matrix products
typedef float v16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register (two AVX2 ones)
constexpr int64_t VL = 16;
#ifdef __AVX512F__
// 32 zmm registers: R rows x V vectors of accumulators + V weight vectors + 1 broadcast.
constexpr int NV = 3, MR = 8;  // 24 + 3 + 1 = 28 registers
#else
constexpr int NV = 2, MR = 2;  // 16 ymm registers: 4 v16 accumulators = 8, + 4 + 2
#endif

// A PyTorch weight W (n x k) stored transposed, W^T (k x n_pad), columns zero-padded to whole vectors; with
// bf16, as bfloat16 pairs instead (_bf16_mm.h), and its products round their inputs to bfloat16.
struct Packed {
  std::vector<float> t;
  std::vector<uint32_t> bf;
  int64_t k = 0, n = 0, n_pad = 0;
  Packed() = default;
  Packed(const float* w, int64_t n_, int64_t k_, bool bf16) : k(k_), n(n_), n_pad((n_ + VL - 1) / VL * VL) {
    if (bf16) {
      bf = anomalyd_bf16::pack_pairs(w, n, k, n_pad);
      return;
    }
    t.assign(k * n_pad, 0.0f);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t p = 0; p < k; ++p) t[p * n_pad + i] = w[i * k + p];
  }
};

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// C rows 0..R, vectors j0..j0+V: C[r, cols] = A[r, :] . W^T[:, cols] over k.
template <int R, int V>
inline void block(const float* A, int64_t lda, const Packed& w, int64_t j0, float* C, int64_t ldc) {
  v16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = v16{};
  const float* bt = w.t.data() + j0;
  for (int64_t p = 0; p < w.k; ++p) {
    v16 b[V];
    for (int v = 0; v < V; ++v) {
      b[v] = load(bt + p * w.n_pad + v * VL);
#ifdef __AVX512F__
      __asm__("" : "+v"(b[v]));  // keep the weights in registers: GCC would re-load them for every row
#endif
    }
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + p];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      const int64_t col = j0 + v * VL, m = std::min<int64_t>(VL, w.n - col);
      if (m == VL)
        std::memcpy(C + r * ldc + col, &acc[r][v], sizeof(v16));
      else if (m > 0)
        std::memcpy(C + r * ldc + col, &acc[r][v], m * sizeof(float));
    }
  }
}

template <int V>
inline void column_block(int64_t m, const float* A, int64_t lda, const Packed& w, int64_t j0, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) block<MR, V>(A + i * lda, lda, w, j0, C + i * ldc, ldc);
  for (; i + 4 <= m; i += 4) block<4, V>(A + i * lda, lda, w, j0, C + i * ldc, ldc);
  for (; i < m; ++i) block<1, V>(A + i * lda, lda, w, j0, C + i * ldc, ldc);
}

// C (m x n, row stride ldc) = A (m x k, row stride lda) . W^T, single-threaded. Column blocks outermost, so a
// block's weights (k x NV vectors, 12 KB for k = 64) stay in L1 while every row of A passes over them.
void mm(int64_t m, const float* A, int64_t lda, const Packed& w, float* C, int64_t ldc) {
#ifdef ANOMALYD_HAVE_BF16_CODE
  if (!w.bf.empty()) {
    anomalyd_bf16::mm(m, A, lda, w.k, w.bf, w.n, w.n_pad, C, ldc);
    return;
  }
#endif
  int64_t j0 = 0;
  for (; j0 + NV * VL <= w.n_pad; j0 += NV * VL) column_block<NV>(m, A, lda, w, j0, C, ldc);
  for (; j0 < w.n_pad; j0 += VL) column_block<1>(m, A, lda, w, j0, C, ldc);
}

// ------------------------------------------------------------------------------------------- recurrences
using anomalyd_gates::gru_gates;
using anomalyd_gates::lstm_gates;

struct Layer {
  Packed w_ih;        // (G*H, n_in) transposed
  const float* b_ih;  // (G*H,)
  Packed w_hh;        // (G*H, H) transposed
  const float* b_hh;  // (G*H,)
  int64_t n_in;
};

struct Scratch {
  explicit Scratch(int64_t n) : data(new float[n]) {}
  std::unique_ptr<float[]> data;
  float* get() { return data.get(); }
};

// One recurrent layer over W steps for b windows. `in` is (b, W, n_in) or, when const_in, (b, n_in) with row
// stride in_rs (the same input at every step). h, c: (b, H) initial state in, final state out. out: (b, W, H)
// every step's h, or nullptr. gi: (b*W or b, G*H) and gh: (b, G*H) scratch.
void run_layer(bool lstm, int64_t b, int64_t W, int64_t H, const Layer& L, const float* in, int64_t in_rs,
               bool const_in, float* h, float* c, float* out, float* gi, float* gh) {
  const int64_t G = lstm ? 4 : 3, GH = G * H;
  const int64_t rows = const_in ? b : b * W;
  mm(rows, in, const_in ? in_rs : L.n_in, L.w_ih, gi, GH);  // input projection, hoisted
  for (int64_t r = 0; r < rows; ++r) {  // LSTM: both biases here; GRU: b_hh stays inside r * (W_hn h + b_hn)
    float* g = gi + r * GH;
    if (lstm) {
      for (int64_t j = 0; j < GH; ++j) g[j] += L.b_ih[j] + L.b_hh[j];
    } else {
      for (int64_t j = 0; j < GH; ++j) g[j] += L.b_ih[j];
    }
  }
  const int64_t gi_rs = const_in ? GH : W * GH, gi_ts = const_in ? 0 : GH;
  const float* bh = L.b_hh;
  for (int64_t t = 0; t < W; ++t) {
    mm(b, h, H, L.w_hh, gh, GH);  // (b, G*H)
    for (int64_t i = 0; i < b; ++i) {
      const float* g = gi + i * gi_rs + t * gi_ts;
      const float* q = gh + i * GH;
      float* hi = h + i * H;
      if (lstm)
        lstm_gates(g, q, c + i * H, hi, H);
      else
        gru_gates(g, q, bh, hi, H);
      if (out != nullptr) std::memcpy(out + (i * W + t) * H, hi, H * sizeof(float));
    }
  }
}

Packed pack(const at::Tensor& w, bool bf16) { return Packed(w.data_ptr<float>(), w.size(0), w.size(1), bf16); }

std::vector<Layer> layers_of(const std::vector<at::Tensor>& w, int64_t n_in0, int64_t H, int64_t G, bool bf16) {
  TORCH_CHECK(!w.empty() && w.size() % 4 == 0, "rnn weights come in groups of 4 per layer");
  std::vector<Layer> out;
  for (size_t l = 0; 4 * l < w.size(); ++l) {
    const int64_t n_in = l == 0 ? n_in0 : H;
    TORCH_CHECK(w[4 * l].dim() == 2 && w[4 * l].size(0) == G * H && w[4 * l].size(1) == n_in &&
                    w[4 * l + 2].dim() == 2 && w[4 * l + 2].size(0) == G * H && w[4 * l + 2].size(1) == H &&
                    w[4 * l + 1].numel() == G * H && w[4 * l + 3].numel() == G * H,
                "rnn weight shapes do not match the hidden size and input width");
    out.push_back({pack(w[4 * l], bf16), w[4 * l + 1].data_ptr<float>(), pack(w[4 * l + 2], bf16),
                   w[4 * l + 3].data_ptr<float>(), n_in});
  }
  return out;
}

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

// The whole autoencoder, weights packed once per call.
struct Model {
  bool lstm;
  int64_t W, F, H, Lz, G, nl;
  std::vector<Layer> el, dl;
  Packed lat_w, fl_w, out_w;
  const float *lat_b, *fl_b, *out_b;
};

Model make_model(bool lstm, int64_t W, int64_t F, int64_t H, int64_t Lz, const std::vector<at::Tensor>& enc,
                 const std::vector<at::Tensor>& dec, const std::vector<at::Tensor>& head, bool bf16) {
  TORCH_CHECK(head.size() == 6 && enc.size() == dec.size(), "bad weight lists");
  TORCH_CHECK(!bf16 || anomalyd_bf16::supported(), "bfloat16 products need a CPU with AVX512_BF16");
  for (const auto& t : enc) check(t, "encoder weight");
  for (const auto& t : dec) check(t, "decoder weight");
  for (const auto& t : head) check(t, "head weight");
  const int64_t G = lstm ? 4 : 3;
  Model m{lstm, W, F, H, Lz, G, 0, layers_of(enc, F, H, G, bf16), layers_of(dec, Lz, H, G, bf16), {}, {}, {}, nullptr,
          nullptr, nullptr};
  m.nl = static_cast<int64_t>(m.el.size());
  const int64_t nl = m.nl;
  TORCH_CHECK(head[0].dim() == 2 && head[0].size(0) == Lz && head[0].size(1) == H && head[2].dim() == 2 &&
                  head[2].size(0) == nl * H && head[2].size(1) == Lz && head[4].dim() == 2 && head[4].size(0) == F &&
                  head[4].size(1) == H && head[1].numel() == Lz && head[3].numel() == nl * H && head[5].numel() == F,
              "latent/output weight shapes do not match");
  m.lat_w = pack(head[0], bf16);
  m.fl_w = pack(head[2], bf16);
  m.out_w = pack(head[4], bf16);
  m.lat_b = head[1].data_ptr<float>();
  m.fl_b = head[3].data_ptr<float>();
  m.out_b = head[5].data_ptr<float>();
  return m;
}

// Per-thread scratch for tiles of up to T windows.
struct Work {
  Work(const Model& m, int64_t T)
      : gi(T * m.W * m.G * m.H), gh(T * m.G * m.H), h(T * m.H), c(T * m.H), z(T * m.Lz), h0(T * m.nl * m.H),
        s0(T * m.W * m.H), s1(m.nl > 1 ? T * m.W * m.H : 1), xs(T * m.W * m.F), y(T * m.W * m.F) {}
  Scratch gi, gh, h, c, z, h0, s0, s1, xs, y;
};

// Reconstruction yo (b, W, F) of the (scaled) windows in (b, W, F).
void tile_forward(const Model& M, Work& wk, const float* in, int64_t b, float* yo) {
  const int64_t W = M.W, H = M.H, Lz = M.Lz, nl = M.nl;
  float *h = wk.h.get(), *c = wk.c.get(), *z = wk.z.get(), *h0 = wk.h0.get();
  for (int64_t l = 0; l < nl; ++l) {  // encoder, zero initial state
    std::fill(h, h + b * H, 0.0f);
    std::fill(c, c + b * H, 0.0f);
    float* out = l + 1 < nl ? (l % 2 ? wk.s1.get() : wk.s0.get()) : nullptr;
    run_layer(M.lstm, b, W, H, M.el[l], in, 0, false, h, c, out, wk.gi.get(), wk.gh.get());
    in = out;
  }
  mm(b, h, H, M.lat_w, z, Lz);  // z = to_latent(h_W)  (b, L)
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < Lz; ++j) z[i * Lz + j] += M.lat_b[j];
  mm(b, z, Lz, M.fl_w, h0, nl * H);  // h0 = tanh(from_latent(z))  (b, layers*H)
  for (int64_t i = 0; i < b; ++i) anomalyd_gates::tanh_bias(h0 + i * nl * H, M.fl_b, nl * H);
  const float* din = z;
  float* out = wk.s0.get();
  for (int64_t l = 0; l < nl; ++l) {  // decoder: layer 0 reads z at every step
    for (int64_t i = 0; i < b; ++i) std::memcpy(h + i * H, h0 + (i * nl + l) * H, H * sizeof(float));
    std::fill(c, c + b * H, 0.0f);
    out = l % 2 ? wk.s1.get() : wk.s0.get();
    run_layer(M.lstm, b, W, H, M.dl[l], din, Lz, l == 0, h, c, out, wk.gi.get(), wk.gh.get());
    din = out;
  }
  mm(b * W, out, H, M.out_w, yo, M.F);  // output projection  (b*W, F)
  for (int64_t r = 0; r < b * W; ++r)
    for (int64_t j = 0; j < M.F; ++j) yo[r * M.F + j] += M.out_b[j];
}

// Runs fn(work, first row, rows) over tiles of T windows on the intra-op threads, tiles handed out dynamically.
template <typename Fn>
void over_tiles(const Model& M, int64_t B, int64_t tile, Fn fn) {
  const int64_t T = std::min(tile, B), n_tiles = (B + T - 1) / T;
  const int64_t n_workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    Work wk(M, T);
    for (int64_t k = next++; k < n_tiles; k = next++) fn(wk, k * T, std::min(T, B - k * T));
  });
}

}  // namespace

// Whether n floats are all finite, by their bits: -ffast-math may fold std::isfinite to true.
static bool all_finite(const float* v, int64_t n) {
  uint32_t worst = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u;
    std::memcpy(&u, v + k, sizeof u);
    worst |= ~u & 0x7f800000u ? 0u : 1u;  // exponent all ones: inf or NaN
  }
  return worst == 0;
}

// Whether any of n floats is a NaN, by their bits (as all_finite).
static bool any_nan(const float* v, int64_t n) {
  uint32_t found = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u;
    std::memcpy(&u, v + k, sizeof u);
    found |= (u & 0x7fffffffu) > 0x7f800000u ? 1u : 0u;  // exponent all ones, mantissa not zero
  }
  return found != 0;
}

// x (B, W, F) -> reconstruction (B, W, F); a window with a NaN reconstructs as NaN, as in the eager model (the
// gates would clamp the NaN to finite values). An infinity is not matched (eager saturates the gates, the fused
// GRU may give NaN): ae_score marks a window with one as NaN before the model, on both paths.
// enc, dec: [weight_ih, bias_ih, weight_hh, bias_hh] per layer (PyTorch layouts);
// head: [to_latent.weight, to_latent.bias, from_latent.weight, from_latent.bias, output.weight, output.bias].
at::Tensor ae_forward(const at::Tensor& x, bool lstm, int64_t H, int64_t Lz, const std::vector<at::Tensor>& enc,
                      const std::vector<at::Tensor>& dec, const std::vector<at::Tensor>& head, int64_t tile,
                      bool bf16) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 3 && tile >= 1, "x must be (B, W, F) and tile >= 1");
  const int64_t B = x.size(0), W = x.size(1), F = x.size(2);
  const Model M = make_model(lstm, W, F, H, Lz, enc, dec, head, bf16);
  auto y = at::empty({B, W, F}, x.options());
  if (B == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_tiles(M, B, tile, [&](Work& wk, int64_t r0, int64_t b) {
    tile_forward(M, wk, xp + r0 * W * F, b, yp + r0 * W * F);
    for (int64_t i = r0; i < r0 + b; ++i)
      if (any_nan(xp + i * W * F, W * F))
        std::fill(yp + i * W * F, yp + (i + 1) * W * F, std::numeric_limits<float>::quiet_NaN());
  });
  return y;
}

// Raw windows x (B, W, F) -> (score (B,), contributions (B, F)): scaling (x - center) / scale, the autoencoder,
// and the mean squared error over the last `last_k` steps (detector.scoring.reconstruction_error), per tile in
// cache; the reconstruction is never materialised.
std::vector<at::Tensor> ae_score(const at::Tensor& x, const at::Tensor& center, const at::Tensor& scale,
                                 int64_t last_k, bool lstm, int64_t H, int64_t Lz, const std::vector<at::Tensor>& enc,
                                 const std::vector<at::Tensor>& dec, const std::vector<at::Tensor>& head,
                                 int64_t tile, bool bf16) {
  check(x, "x");
  check(center, "center");
  check(scale, "scale");
  TORCH_CHECK(x.dim() == 3 && tile >= 1, "x must be (B, W, F) and tile >= 1");
  const int64_t B = x.size(0), W = x.size(1), F = x.size(2);
  TORCH_CHECK(center.numel() == F && scale.numel() == F, "center and scale must have F values");
  TORCH_CHECK(last_k >= 1 && last_k <= W, "last_k must be in [1, W]");
  const Model M = make_model(lstm, W, F, H, Lz, enc, dec, head, bf16);
  auto score = at::empty({B}, x.options());
  auto contrib = at::empty({B, F}, x.options());
  if (B == 0) return {score, contrib};
  const float *xp = x.data_ptr<float>(), *cp = center.data_ptr<float>(), *sp = scale.data_ptr<float>();
  float *scp = score.data_ptr<float>(), *ctp = contrib.data_ptr<float>();
  over_tiles(M, B, tile, [&](Work& wk, int64_t r0, int64_t b) {
    float *xs = wk.xs.get(), *y = wk.y.get();
    const float* xr = xp + r0 * W * F;
    for (int64_t r = 0; r < b * W; ++r)
      for (int64_t j = 0; j < F; ++j) xs[r * F + j] = (xr[r * F + j] - cp[j]) / sp[j];
    tile_forward(M, wk, xs, b, y);
    for (int64_t i = 0; i < b; ++i) {
      float* ct = ctp + (r0 + i) * F;
      if (!all_finite(xs + i * W * F, W * F)) {  // a reading beyond float32 once scaled: NaN, the most anomalous
        std::fill(ct, ct + F, std::numeric_limits<float>::quiet_NaN());  // (the gates would clamp it away)
        scp[r0 + i] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      std::fill(ct, ct + F, 0.0f);
      for (int64_t t = W - last_k; t < W; ++t) {
        const float *a = xs + (i * W + t) * F, *q = y + (i * W + t) * F;
        for (int64_t j = 0; j < F; ++j) ct[j] += (a[j] - q[j]) * (a[j] - q[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j < F; ++j) {
        ct[j] /= static_cast<float>(last_k);
        total += ct[j];
      }
      scp[r0 + i] = total / static_cast<float>(F);
    }
  });
  return {score, contrib};
}

// A build for another CPU (ANOMALYD_FUSED_MARCH, a cache shared between machines) must not run here: its first
// call would die of SIGILL. Importing it fails instead, and anomalyd falls back to eager PyTorch.
static void check_cpu_runs_build() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#ifdef __AVX512F__
  if (!__builtin_cpu_supports("avx512f")) throw std::runtime_error("built for AVX-512F, which this CPU lacks");
#endif
#ifdef __AVX2__
  if (!__builtin_cpu_supports("avx2")) throw std::runtime_error("built for AVX2, which this CPU lacks");
#endif
#ifdef __FMA__
  if (!__builtin_cpu_supports("fma")) throw std::runtime_error("built for FMA, which this CPU lacks");
#endif
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  check_cpu_runs_build();
  m.doc() = "anomalyd fused GRU/LSTM autoencoder inference (CPU, float32; bfloat16 products on request)";
  m.def("ae_forward", &ae_forward, "x (B, W, F) -> reconstruction (B, W, F)",
        py::call_guard<py::gil_scoped_release>());
  m.def("ae_score", &ae_score, "raw x (B, W, F) -> (score (B,), contributions (B, F))",
        py::call_guard<py::gil_scoped_release>());
  m.def("bf16_supported", &anomalyd_bf16::supported,
        "whether this CPU runs the bfloat16 products (AVX512_BF16) that ae_forward/ae_score's bf16 asks for");
  m.def("window_add", &window_ring::window_add,
        "WindowBuffer.add's events applied in order; releases the GIL itself (see _window_ring.h)",
        py::arg("buf").noconvert(), py::arg("ring_ts"), py::arg("count").noconvert(),
        py::arg("last_ts").noconvert(), py::arg("stream").noconvert(), py::arg("ts").noconvert(),
        py::arg("values").noconvert(), py::arg("stride"), py::arg("out").noconvert(),
        py::arg("out_idx").noconvert(), py::arg("fill") = py::none(), py::arg("phase") = py::none());
#if defined(__AVX512F__)
  m.attr("isa") = "avx512";
#elif defined(__AVX2__)
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "generic";
#endif
}
