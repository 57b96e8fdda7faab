// Native WindowBuffer.add (detector/windows.py): one batch of events applied to the per-stream rings in input
// order, without the GIL. Included by _fused_rnn.cpp and bound there as `window_add`.
//
// Per event i (stream s, timestamp t, values v (F,)):
//   late      t < last_ts[s]: dropped (counted; its NaNs are not);
//   accepted  last_ts[s] = t; each NaN of v takes the stream's previous accepted value of that feature (fill[f]
//             when there is none, 0 without fill; counted); the event goes to ring slot count[s] % W (and its t to ring_ts); count[s]++;
//   due       count[s] >= W and (count[s] - W - phase[s]) % stride == 0: the window (the stream's last W events, oldest
//             first) is copied into out[m] and out_idx[m] = i, m++. Otherwise, below W events, it is warming.
// This is the numpy implementation's definition, event by event; tests/test_windows.py checks that both agree.
//
// window_add(buf (S, W, F) f32, ring_ts (S, W) i64 | None, count (S,) i64, last_ts (S,) i64, stream (N,) i64,
//            ts (N,) i64, values (N, F) f32, stride, out (>= due, W, F) f32, out_idx (N,) i64, fill (F,) f32 | None,
//            phase (S,) i64 | None (each in [0, stride); None: all 0))
//   -> (due windows m, late, missing values, warming), all arrays C-contiguous; stream indices < S. Bind every
// argument with noconvert(): a converted (copied) array would take the writes meant for the buffer.

#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace window_ring {

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style>;
using i64 = py::array_t<int64_t, py::array::c_style>;

// NaN by its bits: the extension is compiled with -ffast-math, under which std::isnan may be folded to false.
inline bool is_nan(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x7fffffffu) > 0x7f800000u;
}

inline py::tuple window_add(f32 buf, py::object ring_ts_obj, i64 count, i64 last_ts, i64 stream, i64 ts,
                            f32 values, int64_t stride, f32 out, i64 out_idx, py::object fill_obj,
                            py::object phase_obj) {
  if (buf.ndim() != 3 || values.ndim() != 2 || out.ndim() != 3) throw std::invalid_argument("bad array ranks");
  const int64_t S = buf.shape(0), W = buf.shape(1), F = buf.shape(2), N = stream.shape(0);
  if (values.shape(0) != N || values.shape(1) != F || ts.shape(0) != N || out_idx.shape(0) < N ||
      count.shape(0) < S || last_ts.shape(0) < S || out.shape(1) != W || out.shape(2) != F || stride < 1 || W < 1)
    throw std::invalid_argument("array shapes do not match the buffer");
  int64_t* RT = nullptr;
  if (!ring_ts_obj.is_none()) {
    if (!i64::check_(ring_ts_obj)) throw std::invalid_argument("ring_ts must be a C-contiguous int64 array");
    auto ring_ts = ring_ts_obj.cast<i64>();  // no copy: it is one already
    if (ring_ts.ndim() != 2 || ring_ts.shape(0) < S || ring_ts.shape(1) != W)
      throw std::invalid_argument("ring_ts does not match the buffer");
    RT = ring_ts.mutable_data();
  }
  const int64_t* PH = nullptr;
  i64 phase;
  if (!phase_obj.is_none()) {
    if (!i64::check_(phase_obj)) throw std::invalid_argument("phase must be a C-contiguous int64 array");
    phase = phase_obj.cast<i64>();
    if (phase.ndim() != 1 || phase.shape(0) < S) throw std::invalid_argument("phase does not match the buffer");
    PH = phase.data();
  }
  const float* FILL = nullptr;
  f32 fill;
  if (!fill_obj.is_none()) {
    if (!f32::check_(fill_obj)) throw std::invalid_argument("fill must be a C-contiguous float32 array");
    fill = fill_obj.cast<f32>();
    if (fill.ndim() != 1 || fill.shape(0) != F) throw std::invalid_argument("fill must have one value per feature");
    FILL = fill.data();
  }
  const int64_t* SI = stream.data();
  for (int64_t i = 0; i < N; ++i)
    if (SI[i] < 0 || SI[i] >= S) throw std::out_of_range("stream index outside the buffer");
  float* B = buf.mutable_data();
  int64_t* C = count.mutable_data();
  int64_t* L = last_ts.mutable_data();
  const int64_t* T = ts.data();
  const float* V = values.data();
  float* O = out.mutable_data();
  int64_t* OI = out_idx.mutable_data();
  const int64_t cap = out.shape(0);
  int64_t m = 0, late = 0, missing = 0, warming = 0;
  bool overflow = false;
  {
    py::gil_scoped_release nogil;
    const size_t row = static_cast<size_t>(F) * sizeof(float);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t s = SI[i];
      if (T[i] < L[s]) {
        ++late;
        continue;
      }
      L[s] = T[i];
      float* ring = B + s * W * F;
      const int64_t c = C[s];
      const int64_t slot = c % W;
      const float* prev = c > 0 ? ring + ((c - 1) % W) * F : nullptr;
      float* dst = ring + slot * F;
      const float* src = V + i * F;
      for (int64_t f = 0; f < F; ++f) {
        float v = src[f];
        if (is_nan(v)) {
          ++missing;
          v = prev ? prev[f] : (FILL ? FILL[f] : 0.0f);
        }
        dst[f] = v;
      }
      if (RT) RT[s * W + slot] = T[i];
      const int64_t c1 = c + 1;
      C[s] = c1;
      if (c1 < W) {
        ++warming;
        continue;
      }
      if ((c1 - W - (PH ? PH[s] : 0)) % stride != 0) continue;  // a negative remainder: not yet due
      if (m >= cap) {  // the caller sized out for every event: cannot happen
        overflow = true;
        break;
      }
      const int64_t p = c1 % W;  // the oldest of the last W events
      float* o = O + m * W * F;
      std::memcpy(o, ring + p * F, static_cast<size_t>(W - p) * row);
      std::memcpy(o + (W - p) * F, ring, static_cast<size_t>(p) * row);
      OI[m++] = i;
    }
  }
  if (overflow) throw std::length_error("out has fewer rows than due windows");
  return py::make_tuple(m, late, missing, warming);
}

}  // namespace window_ring
