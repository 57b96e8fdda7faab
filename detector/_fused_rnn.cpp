// Fused CPU inference of the GRU/LSTM sequence autoencoders of detector/models.py (built by detector/fastpath.py).
//
// Same equations and weights as torch.nn.GRU / torch.nn.LSTM (gate order r,z,n and i,f,g,o), but:
//  * the whole forward (encoder, latent, decoder, output) runs in C++ with no per-step Python/dispatcher cost;
//  * each time step is one BLAS sgemm (h . W_hh^T) plus ONE fused, vectorised pass over the gates
//    (eager PyTorch runs ~10 small ops per GRU step);
//  * the decoder's input is the same latent z at every step, so its input projection z . W_ih^T + b is computed
//    once per window instead of once per step;
//  * the batch is cut into tiles of `tile` windows that stay in cache through all steps; tiles are handed out to
//    the intra-op threads dynamically (an atomic counter), so a thread slowed by a competing process does not
//    hold the others up.
// Windows are independent; a window's result can differ in the last bits with the batch and tile sizes (the
// BLAS blocks differently), as in eager PyTorch.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

// The BLAS that libtorch_cpu links (MKL on x86 wheels) exports the Fortran symbol.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// C (m x n, row stride ldc) = A (m x k, row stride lda) . W^T, with W (n x k) row-major (a PyTorch weight).
// Column-major view: C^T (n x m) = W (n x k) . A^T (k x m).
inline void mm_wt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* W, float* C,
                  int64_t ldc) {
  const char ta = 'T', tb = 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int la = static_cast<int>(k), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&ta, &tb, &M, &N, &K, &one, W, &la, A, &lb, &zero, C, &lc);
}

inline float sigm(float x) { return 1.0f / (1.0f + std::exp(-x)); }

struct Layer {
  const float* w_ih;  // (G*H, n_in)
  const float* b_ih;  // (G*H,)
  const float* w_hh;  // (G*H, H)
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
  mm_wt(rows, GH, L.n_in, in, const_in ? in_rs : L.n_in, L.w_ih, gi, GH);  // input projection, hoisted
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
    mm_wt(b, GH, H, h, H, L.w_hh, gh, GH);  // (b, G*H)
    for (int64_t i = 0; i < b; ++i) {
      const float* g = gi + i * gi_rs + t * gi_ts;
      const float* q = gh + i * GH;
      float* hi = h + i * H;
      if (lstm) {
        float* ci = c + i * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const float ig = sigm(g[j] + q[j]);
          const float fg = sigm(g[H + j] + q[H + j]);
          const float gg = std::tanh(g[2 * H + j] + q[2 * H + j]);
          const float og = sigm(g[3 * H + j] + q[3 * H + j]);
          const float cn = fg * ci[j] + ig * gg;
          ci[j] = cn;
          hi[j] = og * std::tanh(cn);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const float rg = sigm(g[j] + q[j] + bh[j]);
          const float zg = sigm(g[H + j] + q[H + j] + bh[H + j]);
          const float ng = std::tanh(g[2 * H + j] + rg * (q[2 * H + j] + bh[2 * H + j]));
          hi[j] = ng + zg * (hi[j] - ng);
        }
      }
      if (out != nullptr) std::memcpy(out + (i * W + t) * H, hi, H * sizeof(float));
    }
  }
}

std::vector<Layer> layers_of(const std::vector<at::Tensor>& w, int64_t n_in0, int64_t H) {
  TORCH_CHECK(!w.empty() && w.size() % 4 == 0, "rnn weights come in groups of 4 per layer");
  std::vector<Layer> out;
  for (size_t l = 0; 4 * l < w.size(); ++l) {
    out.push_back({w[4 * l].data_ptr<float>(), w[4 * l + 1].data_ptr<float>(), w[4 * l + 2].data_ptr<float>(),
                   w[4 * l + 3].data_ptr<float>(), l == 0 ? n_in0 : H});
  }
  return out;
}

void check(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

// x (B, W, F) -> reconstruction (B, W, F).
// enc, dec: [weight_ih, bias_ih, weight_hh, bias_hh] per layer (PyTorch layouts);
// head: [to_latent.weight, to_latent.bias, from_latent.weight, from_latent.bias, output.weight, output.bias].
at::Tensor ae_forward(const at::Tensor& x, bool lstm, int64_t H, int64_t Lz, const std::vector<at::Tensor>& enc,
                      const std::vector<at::Tensor>& dec, const std::vector<at::Tensor>& head, int64_t tile) {
  check(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be (B, W, F)");
  TORCH_CHECK(tile >= 1 && head.size() == 6 && enc.size() == dec.size(), "bad arguments");
  for (const auto& t : enc) check(t, "encoder weight");
  for (const auto& t : dec) check(t, "decoder weight");
  for (const auto& t : head) check(t, "head weight");
  const int64_t B = x.size(0), W = x.size(1), F = x.size(2), G = lstm ? 4 : 3;
  const auto el = layers_of(enc, F, H), dl = layers_of(dec, Lz, H);
  const int64_t nl = static_cast<int64_t>(el.size());
  auto y = at::empty({B, W, F}, x.options());
  if (B == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float *lat_w = head[0].data_ptr<float>(), *lat_b = head[1].data_ptr<float>();
  const float *fl_w = head[2].data_ptr<float>(), *fl_b = head[3].data_ptr<float>();
  const float *out_w = head[4].data_ptr<float>(), *out_b = head[5].data_ptr<float>();
  const int64_t T = std::min(tile, B), n_tiles = (B + T - 1) / T;
  const int64_t n_workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    Scratch gi(T * W * G * H), gh(T * G * H), h(T * H), c(T * H), z(T * Lz), h0(T * nl * H), s0(T * W * H),
        s1(nl > 1 ? T * W * H : 1);
    for (int64_t k = next++; k < n_tiles; k = next++) {
      const int64_t r0 = k * T, b = std::min(T, B - r0);
      const float* in = xp + r0 * W * F;
      for (int64_t l = 0; l < nl; ++l) {  // encoder, zero initial state
        std::fill(h.get(), h.get() + b * H, 0.0f);
        std::fill(c.get(), c.get() + b * H, 0.0f);
        float* out = l + 1 < nl ? (l % 2 ? s1.get() : s0.get()) : nullptr;
        run_layer(lstm, b, W, H, el[l], in, 0, false, h.get(), c.get(), out, gi.get(), gh.get());
        in = out;
      }
      mm_wt(b, Lz, H, h.get(), H, lat_w, z.get(), Lz);  // z = to_latent(h_W)  (b, L)
      for (int64_t i = 0; i < b; ++i)
        for (int64_t j = 0; j < Lz; ++j) z.get()[i * Lz + j] += lat_b[j];
      mm_wt(b, nl * H, Lz, z.get(), Lz, fl_w, h0.get(), nl * H);  // h0 = tanh(from_latent(z))  (b, layers*H)
      for (int64_t i = 0; i < b * nl * H; ++i) h0.get()[i] = std::tanh(h0.get()[i] + fl_b[i % (nl * H)]);
      const float* din = z.get();
      float* out = s0.get();
      for (int64_t l = 0; l < nl; ++l) {  // decoder: layer 0 reads z at every step
        for (int64_t i = 0; i < b; ++i) std::memcpy(h.get() + i * H, h0.get() + (i * nl + l) * H, H * sizeof(float));
        std::fill(c.get(), c.get() + b * H, 0.0f);
        out = l % 2 ? s1.get() : s0.get();
        run_layer(lstm, b, W, H, dl[l], din, Lz, l == 0, h.get(), c.get(), out, gi.get(), gh.get());
        din = out;
      }
      float* yo = yp + r0 * W * F;
      mm_wt(b * W, F, H, out, H, out_w, yo, F);  // output projection  (b*W, F)
      for (int64_t r = 0; r < b * W; ++r)
        for (int64_t j = 0; j < F; ++j) yo[r * F + j] += out_b[j];
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "anomalyd fused GRU/LSTM autoencoder inference (CPU, float32)";
  m.def("ae_forward", &ae_forward, "x (B, W, F) -> reconstruction (B, W, F)",
        py::call_guard<py::gil_scoped_release>());
}
