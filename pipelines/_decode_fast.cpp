// Native fast path of pipelines.decode.decode_batch: one poll batch of JSON sensor messages -> arrays.
//
// It takes only the common, unambiguous shape and leaves every other message to the Python decoder:
//
//     {"stream": "<no escapes>", "ts": <integer, at most 18 digits>, "values": [<number or null>, ...]}
//
// keys in any order, each once, JSON whitespace anywhere, nothing else. Anything outside that shape (another key,
// an escape, a float or string ts, a value that is not a number or null, a number that overflows float32, more
// than `max_features` values, invalid UTF-8 in the stream, trailing bytes, a message over `max_bytes`, a value
// that is not bytes) is returned as "slow": the Python decoder then accepts or rejects it with its reason. So
// the fast path never rejects anything and never accepts what the Python decoder would not; numbers are parsed
// to double (std::from_chars, correctly rounded) and then cast to float32, as the Python decoder does.
//
// decode(values: list, max_bytes: int, max_features: int) ->
//     (positions int64 (K,), streams list[str] (K), ts int64 (K,), counts int64 (K,), flat float32 (sum counts),
//      slow list[int])
// The parse itself runs without the GIL.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace py = pybind11;

namespace {

struct Parsed {
  int64_t ts = 0;
  const char* stream = nullptr;
  Py_ssize_t stream_len = 0;
  int64_t count = 0;
};

inline bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

class Parser {
 public:
  Parser(const char* p, const char* end, std::vector<float>& flat, int64_t max_features)
      : p_(p), end_(end), flat_(flat), max_features_(max_features) {}

  // True when the whole message has the fast shape; appends its values to flat (the caller truncates on false).
  bool message(Parsed& out) {
    bool seen_stream = false, seen_ts = false, seen_values = false;
    ws();
    if (!eat('{')) return false;
    ws();
    for (;;) {
      const char* key;
      Py_ssize_t key_len;
      if (!string(key, key_len)) return false;
      ws();
      if (!eat(':')) return false;
      ws();
      if (key_len == 6 && std::memcmp(key, "stream", 6) == 0) {
        if (seen_stream || !string(out.stream, out.stream_len) || out.stream_len == 0) return false;
        seen_stream = true;
      } else if (key_len == 2 && std::memcmp(key, "ts", 2) == 0) {
        if (seen_ts || !integer(out.ts)) return false;
        seen_ts = true;
      } else if (key_len == 6 && std::memcmp(key, "values", 6) == 0) {
        if (seen_values || !array(out.count)) return false;
        seen_values = true;
      } else {
        return false;
      }
      ws();
      if (eat(',')) {
        ws();
        continue;
      }
      if (!eat('}')) return false;
      break;
    }
    ws();
    return p_ == end_ && seen_stream && seen_ts && seen_values;
  }

 private:
  const char* p_;
  const char* end_;
  std::vector<float>& flat_;
  int64_t max_features_;

  void ws() {
    while (p_ < end_ && is_ws(*p_)) ++p_;
  }
  bool eat(char c) {
    if (p_ < end_ && *p_ == c) {
      ++p_;
      return true;
    }
    return false;
  }
  // A string without escapes or control characters; its bytes (UTF-8 checked later, by the str conversion).
  bool string(const char*& s, Py_ssize_t& len) {
    if (!eat('"')) return false;
    s = p_;
    while (p_ < end_) {
      unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        len = p_ - s;
        ++p_;
        return true;
      }
      if (c == '\\' || c < 0x20) return false;
      ++p_;
    }
    return false;
  }
  // -?(0|[1-9][0-9]{0,17}) not followed by a fraction or exponent.
  bool integer(int64_t& v) {
    bool neg = eat('-');
    const char* d = p_;
    if (p_ >= end_ || !is_digit(*p_)) return false;
    if (*p_ == '0') {
      ++p_;
    } else {
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    if (p_ - d > 18) return false;
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E' || is_digit(*p_))) return false;
    int64_t x = 0;
    for (const char* q = d; q < p_; ++q) x = x * 10 + (*q - '0');
    v = neg ? -x : x;
    return true;
  }
  // A JSON number (grammar checked here; an integer part of over 18 digits is left to Python) as float32.
  bool number(float& out) {
    const char* s = p_;
    eat('-');
    const char* d = p_;
    if (p_ >= end_ || !is_digit(*p_)) return false;
    if (*p_ == '0') {
      ++p_;
    } else {
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    if (p_ - d > 18) return false;
    if (p_ < end_ && is_digit(*p_)) return false;  // a leading zero
    if (eat('.')) {
      if (p_ >= end_ || !is_digit(*p_)) return false;
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ >= end_ || !is_digit(*p_)) return false;
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    double x;
    auto r = std::from_chars(s, p_, x);
    if (r.ec != std::errc() || r.ptr != p_ || !std::isfinite(x)) return false;
    float f = static_cast<float>(x);
    if (!std::isfinite(f)) return false;  // beyond the float32 range: the Python decoder rejects it
    out = f;
    return true;
  }
  bool array(int64_t& count) {
    if (!eat('[')) return false;
    ws();
    count = 0;
    if (eat(']')) return false;  // empty: the Python decoder names the problem
    for (;;) {
      if (count == max_features_) return false;
      float f;
      if (end_ - p_ >= 4 && std::memcmp(p_, "null", 4) == 0) {
        p_ += 4;
        f = std::numeric_limits<float>::quiet_NaN();
      } else if (!number(f)) {
        return false;
      }
      flat_.push_back(f);
      ++count;
      ws();
      if (eat(',')) {
        ws();
        continue;
      }
      return eat(']');
    }
  }
};

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

py::tuple decode(py::list values, int64_t max_bytes, int64_t max_features) {
  const Py_ssize_t n = PyList_GET_SIZE(values.ptr());
  std::vector<const char*> ptr(n, nullptr);
  std::vector<Py_ssize_t> len(n, -1);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(values.ptr(), i);
    if (PyBytes_CheckExact(item) && PyBytes_GET_SIZE(item) <= max_bytes) {
      ptr[i] = PyBytes_AS_STRING(item);
      len[i] = PyBytes_GET_SIZE(item);
    }
  }
  std::vector<int64_t> pos, ts, counts;
  std::vector<Parsed> parsed;
  std::vector<float> flat;
  std::vector<int64_t> slow;
  pos.reserve(n);
  parsed.reserve(n);
  flat.reserve(n * 8);
  {
    py::gil_scoped_release nogil;  // the list holds the bytes objects alive; nothing here touches Python
    for (Py_ssize_t i = 0; i < n; ++i) {
      Parsed m;
      size_t mark = flat.size();
      if (ptr[i] != nullptr && Parser(ptr[i], ptr[i] + len[i], flat, max_features).message(m)) {
        pos.push_back(i);
        parsed.push_back(m);
      } else {
        flat.resize(mark);
        slow.push_back(i);
      }
    }
  }
  py::list streams;
  std::vector<int64_t> kept_pos;
  std::vector<float> kept_flat;
  bool dropped = false;  // a stream that is not valid UTF-8 moves its message to slow (rare: compact then)
  size_t offset = 0;
  for (size_t k = 0; k < parsed.size(); ++k) {
    const Parsed& m = parsed[k];
    PyObject* s = PyUnicode_DecodeUTF8(m.stream, m.stream_len, "strict");
    if (s == nullptr) {
      PyErr_Clear();
      if (!dropped) {
        dropped = true;
        kept_pos.assign(pos.begin(), pos.begin() + k);
        kept_flat.assign(flat.begin(), flat.begin() + offset);
      }
      slow.push_back(pos[k]);
    } else {
      streams.append(py::reinterpret_steal<py::object>(s));
      ts.push_back(m.ts);
      counts.push_back(m.count);
      if (dropped) {
        kept_pos.push_back(pos[k]);
        kept_flat.insert(kept_flat.end(), flat.begin() + offset, flat.begin() + offset + m.count);
      }
    }
    offset += m.count;
  }
  if (dropped) {
    std::sort(slow.begin(), slow.end());
    pos.swap(kept_pos);
    flat.swap(kept_flat);
  }
  py::list slow_list(slow.size());
  for (size_t k = 0; k < slow.size(); ++k) slow_list[k] = py::int_(slow[k]);
  return py::make_tuple(to_array(pos), streams, to_array(ts), to_array(counts), to_array(flat), slow_list);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native fast path of pipelines.decode.decode_batch";
  m.def("decode", &decode, py::arg("values"), py::arg("max_bytes"), py::arg("max_features"),
        "messages (list of bytes) -> (positions, streams, ts, counts, flat values, slow positions)");
}
