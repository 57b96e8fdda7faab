// Native fast path of pipelines.decode.decode_batch: one poll batch of JSON sensor messages -> arrays.
//
// It takes only the common, unambiguous shapes and leaves every other message to the Python decoder:
//
//     {"stream": "<no escapes>", "ts": <integer, at most 18 digits>, "values": [<number or null>, ...]}
//     {"stream": "<no escapes>", "ts": <integer, at most 18 digits>, "values": {"<name>": <number or null>, ...}}
//
// keys in any order, each once, JSON whitespace anywhere, nothing else. Anything outside that shape (another key,
// an escape, a float or string ts, a value that is not a number or null, a number that overflows float32, more
// than `max_features` values, invalid UTF-8 in the stream, trailing bytes, a message over `max_bytes`, a value
// that is not bytes) is returned as "slow": the Python decoder then accepts or rejects it with its reason. So
// the fast path never rejects anything and never accepts what the Python decoder would not; numbers are parsed
// to double (std::from_chars, correctly rounded) and then cast to float32, as the Python decoder does.
//
// A values object's names, in message order, are its "layout": the batch's distinct layouts (at most
// MAX_LAYOUTS) are returned once, and each object row names its layout, so that Python maps names to columns
// once per layout and batch instead of once per message.
//
// decode(values: list, max_bytes: int, max_features: int) ->
//     (positions int64 (K,), streams list[str] (K), ts int64 (K,), counts int64 (K,), flat float32 (sum counts),
//      layout int32 (K,) (-1: an array), layouts list[tuple[str, ...] | None], slow list[int])
// The parse itself runs without the GIL.
//
// message_columns(messages) turns a confluent-kafka poll into those columns in one pass (below).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace py = pybind11;

namespace {

constexpr size_t MAX_LAYOUTS = 256;
constexpr size_t MAX_LAYOUT_BYTES = size_t{1} << 20;  // the names of a batch's layouts, in all
constexpr Py_ssize_t MAX_STREAM_BYTES = 256;  // as pipelines.decode.MAX_STREAM_BYTES

struct Span {
  const char* p;
  Py_ssize_t n;
  bool operator==(const Span& o) const { return n == o.n && std::memcmp(p, o.p, n) == 0; }
};

struct Parsed {
  int64_t ts = 0;
  const char* stream = nullptr;
  Py_ssize_t stream_len = 0;
  int64_t count = 0;
  int32_t layout = -1;
};

// Seeds the layout hash once per process, so that no producer can aim its messages at one bucket.
const uint64_t LAYOUT_SEED = 0x9e3779b97f4a7c15ULL ^ reinterpret_cast<uintptr_t>(&MAX_LAYOUTS) ^
                             static_cast<uint64_t>(std::random_device{}());

// The distinct name sequences of the batch's values objects (at most MAX_LAYOUTS, MAX_LAYOUT_BYTES of names). Each
// is compared in full only with those of equal hash: comparing every message with every layout let a producer
// whose messages share 255 long names and differ in the last one make each cost 256 full comparisons (10x the
// Python decoder's time); the byte budget bounds the names turned into Python strings per batch.
struct Layouts {
  std::vector<std::vector<Span>> seen;
  std::vector<uint64_t> hashes;
  size_t bytes = 0;  // of the names in seen: each becomes a Python str per batch
  int32_t last = -1;

  static uint64_t mix(uint64_t h, uint64_t w) {
    h = (h ^ w) * 0xff51afd7ed558ccdULL;
    return h ^ (h >> 32);
  }

  static uint64_t hash(const std::vector<Span>& names) {
    uint64_t h = LAYOUT_SEED;  // eight bytes at a time; each name's length ends it
    for (const Span& s : names) {
      Py_ssize_t i = 0;
      for (; i + 8 <= s.n; i += 8) {
        uint64_t w;
        std::memcpy(&w, s.p + i, 8);
        h = mix(h, w);
      }
      uint64_t tail = 0;
      std::memcpy(&tail, s.p + i, static_cast<size_t>(s.n - i));
      h = mix(mix(h, tail), static_cast<uint64_t>(s.n));
    }
    return h;
  }

  int32_t intern(const std::vector<Span>& names) {
    if (last >= 0 && seen[last] == names) return last;  // the usual case: the message before's layout
    const uint64_t h = hash(names);
    for (size_t i = 0; i < seen.size(); ++i) {
      if (hashes[i] == h && seen[i] == names) return last = static_cast<int32_t>(i);
    }
    size_t n = 0;
    for (const Span& s : names) n += static_cast<size_t>(s.n);
    if (seen.size() == MAX_LAYOUTS || bytes + n > MAX_LAYOUT_BYTES) return -1;  // the Python decoder takes it
    bytes += n;
    seen.push_back(names);
    hashes.push_back(h);
    return last = static_cast<int32_t>(seen.size() - 1);
  }
};

inline bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

class Parser {
 public:
  Parser(const char* p, const char* end, std::vector<float>& flat, int64_t max_features, Layouts& layouts,
         std::vector<Span>& names)
      : p_(p), end_(end), flat_(flat), max_features_(max_features), layouts_(layouts), names_(names) {}

  // True when the whole message has the fast shape; appends its values to flat (the caller truncates on false).
  bool message(Parsed& out) {
    bool seen_stream = false, seen_ts = false, seen_values = false, named = false;
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
        if (seen_stream || !string(out.stream, out.stream_len) || !plain_stream(out.stream, out.stream_len)) {
          return false;  // the Python decoder names the problem
        }
        seen_stream = true;
      } else if (key_len == 2 && std::memcmp(key, "ts", 2) == 0) {
        if (seen_ts || !integer(out.ts)) return false;
        seen_ts = true;
      } else if (key_len == 6 && std::memcmp(key, "values", 6) == 0) {
        named = p_ < end_ && *p_ == '{';
        if (seen_values || !(named ? object(out) : array(out.count))) return false;
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
    if (!(p_ == end_ && seen_stream && seen_ts && seen_values)) return false;
    if (named) {  // interned only now: a message the parser refuses after its values object takes no layout slot
      out.layout = layouts_.intern(names_);
      return out.layout >= 0;
    }
    return true;
  }

 private:
  const char* p_;
  const char* end_;
  std::vector<float>& flat_;
  int64_t max_features_;
  Layouts& layouts_;
  std::vector<Span>& names_;  // scratch: the names of the values object being parsed

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
  // A stream id the Python decoder takes as it is: 1 to MAX_STREAM_BYTES bytes, no DEL, no C1 control
  // character (C2 80-9F; string() refuses C0 ones and escapes), no line or paragraph separator and no
  // bidirectional control (D8 9C, E2 80 8E-8F, E2 80 A8-AE, E2 81 A6-A9): those go to the Python decoder.
  static bool plain_stream(const char* s, Py_ssize_t n) {
    if (n == 0 || n > MAX_STREAM_BYTES) return false;
    for (Py_ssize_t i = 0; i < n; ++i) {
      const unsigned char c = static_cast<unsigned char>(s[i]);
      if (c == 0x7f || (c == 0xc2 && i + 1 < n && static_cast<unsigned char>(s[i + 1]) <= 0x9f)) return false;
      if (c == 0xd8 && i + 1 < n && static_cast<unsigned char>(s[i + 1]) == 0x9c) return false;  // U+061C
      if (c == 0xe2 && i + 2 < n) {
        const unsigned char b1 = static_cast<unsigned char>(s[i + 1]), b2 = static_cast<unsigned char>(s[i + 2]);
        if ((b1 == 0x80 && (b2 == 0x8e || b2 == 0x8f || (b2 >= 0xa8 && b2 <= 0xae))) ||
            (b1 == 0x81 && b2 >= 0xa6 && b2 <= 0xa9))
          return false;
      }
    }
    return true;
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
  // A number's sign and integer part, -?(0|[1-9][0-9]*), of at most 18 digits (longer ones are left to Python,
  // and fit an int64); digits points at its first digit. A digit after it (a leading zero) is the caller's check.
  bool integer_part(const char*& digits) {
    eat('-');
    digits = p_;
    if (p_ >= end_ || !is_digit(*p_)) return false;
    if (*p_ == '0') {
      ++p_;
    } else {
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    return p_ - digits <= 18;
  }
  // -?(0|[1-9][0-9]{0,17}) not followed by a fraction or exponent.
  bool integer(int64_t& v) {
    const char* s = p_;
    const char* d;
    if (!integer_part(d)) return false;
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E' || is_digit(*p_))) return false;
    int64_t x = 0;
    for (const char* q = d; q < p_; ++q) x = x * 10 + (*q - '0');
    v = d != s ? -x : x;  // a '-' came before the digits
    return true;
  }
  // A JSON number (grammar checked here; an integer part of over 18 digits is left to Python) as float32.
  bool number(float& out) {
    const char* s = p_;
    const char* d;
    if (!integer_part(d)) return false;
    if (p_ < end_ && is_digit(*p_)) return false;  // a leading zero
    bool integer = true;  // JSON's -0 is the integer 0 to Python: +0.0, where -0.0 and -0e0 keep the sign
    if (eat('.')) {
      integer = false;
      if (p_ >= end_ || !is_digit(*p_)) return false;
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      integer = false;
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
    if (integer && f == 0.0f) f = 0.0f;
    out = f;
    return true;
  }
  // A number or null (NaN), appended to flat.
  bool element() {
    float f;
    if (end_ - p_ >= 4 && std::memcmp(p_, "null", 4) == 0) {
      p_ += 4;
      f = std::numeric_limits<float>::quiet_NaN();
    } else if (!number(f)) {
      return false;
    }
    flat_.push_back(f);
    return true;
  }
  bool array(int64_t& count) {
    if (!eat('[')) return false;
    ws();
    count = 0;
    if (eat(']')) return false;  // empty: the Python decoder names the problem
    for (;;) {
      if (count == max_features_ || !element()) return false;
      ++count;
      ws();
      if (eat(',')) {
        ws();
        continue;
      }
      return eat(']');
    }
  }
  // {"name": number or null, ...}: values in message order, the names (names_) the row's layout once the whole
  // message has the fast shape.
  bool object(Parsed& out) {
    if (!eat('{')) return false;
    ws();
    out.count = 0;
    names_.clear();
    if (eat('}')) return false;  // empty: the Python decoder names the problem
    for (;;) {
      Span name;
      if (out.count == max_features_ || !string(name.p, name.n)) return false;
      ws();
      if (!eat(':')) return false;
      ws();
      if (!element()) return false;
      names_.push_back(name);
      ++out.count;
      ws();
      if (eat(',')) {
        ws();
        continue;
      }
      return eat('}');
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
  std::vector<int64_t> pos;
  std::vector<Parsed> parsed;
  std::vector<float> flat;
  std::vector<int64_t> slow;
  Layouts layouts;
  std::vector<Span> names;
  pos.reserve(n);
  parsed.reserve(n);
  flat.reserve(n * 8);
  {
    py::gil_scoped_release nogil;  // the list holds the bytes objects alive; nothing here touches Python
    for (Py_ssize_t i = 0; i < n; ++i) {
      Parsed m;
      size_t mark = flat.size();
      if (ptr[i] != nullptr && Parser(ptr[i], ptr[i] + len[i], flat, max_features, layouts, names).message(m)) {
        pos.push_back(i);
        parsed.push_back(m);
      } else {
        flat.resize(mark);
        slow.push_back(i);
      }
    }
  }
  py::list layout_names;  // each layout's names as a tuple of str, None where one is not valid UTF-8
  for (const auto& seq : layouts.seen) {
    py::tuple t(seq.size());
    bool ok = true;
    for (size_t j = 0; j < seq.size() && ok; ++j) {
      PyObject* name = PyUnicode_DecodeUTF8(seq[j].p, seq[j].n, "strict");
      if (name == nullptr) {
        PyErr_Clear();
        ok = false;
      } else {
        t[j] = py::reinterpret_steal<py::object>(name);
      }
    }
    layout_names.append(ok ? py::object(t) : py::object(py::none()));
  }
  // Streams as str; a stream that is not valid UTF-8 moves its message to slow (rare: compact then).
  py::list streams;
  std::vector<int64_t> ts, counts, kept_pos;
  std::vector<int32_t> layout;
  std::vector<float> kept_flat;
  bool dropped = false;
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
      layout.push_back(m.layout);
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
  return py::make_tuple(to_array(pos), streams, to_array(ts), to_array(counts), to_array(flat), to_array(layout),
                        layout_names, slow_list);
}

PyObject* call_method(PyObject* obj, PyObject* name) {
  PyObject* out = PyObject_CallMethodNoArgs(obj, name);
  if (out == nullptr) throw py::error_already_set();
  return out;
}

template <typename T>
T as_integer(PyObject* v) {  // steals v
  const long long x = PyLong_AsLongLong(v);
  Py_DECREF(v);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<T>(x);
}

// message_columns(messages: list) -> (topics list[str], partitions int32 (N,), offsets int64 (N,),
//                                     timestamps int64 (N,), keys list, values list[bytes])
// One pass over a confluent-kafka poll: each message's topic(), partition(), offset(), timestamp()[1], key() and
// value() (None -> b""), leaving out the messages whose error() is not None. Any objects with those methods do.
py::tuple message_columns(const py::list& messages) {
  static PyObject* const s_error = PyUnicode_InternFromString("error");
  static PyObject* const s_topic = PyUnicode_InternFromString("topic");
  static PyObject* const s_partition = PyUnicode_InternFromString("partition");
  static PyObject* const s_offset = PyUnicode_InternFromString("offset");
  static PyObject* const s_timestamp = PyUnicode_InternFromString("timestamp");
  static PyObject* const s_key = PyUnicode_InternFromString("key");
  static PyObject* const s_value = PyUnicode_InternFromString("value");
  const Py_ssize_t n = PyList_GET_SIZE(messages.ptr());
  py::list topics(n), keys(n), values(n);  // filled by PyList_SET_ITEM; cut to the kept messages at the end
  std::vector<int32_t> partitions;
  std::vector<int64_t> offsets, timestamps;
  partitions.reserve(n);
  offsets.reserve(n);
  timestamps.reserve(n);
  py::bytes empty("");
  Py_ssize_t k = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* m = PyList_GET_ITEM(messages.ptr(), i);
    PyObject* err = call_method(m, s_error);
    const bool failed = err != Py_None;
    Py_DECREF(err);
    if (failed) continue;
    partitions.push_back(as_integer<int32_t>(call_method(m, s_partition)));
    offsets.push_back(as_integer<int64_t>(call_method(m, s_offset)));
    PyObject* ts = call_method(m, s_timestamp);  // (type, ms)
    if (!PyTuple_Check(ts) || PyTuple_GET_SIZE(ts) < 2) {
      Py_DECREF(ts);
      throw py::type_error("message_columns: timestamp() must return a (type, ms) tuple");
    }
    PyObject* ms = PyTuple_GET_ITEM(ts, 1);
    Py_INCREF(ms);
    Py_DECREF(ts);
    timestamps.push_back(as_integer<int64_t>(ms));
    PyList_SET_ITEM(topics.ptr(), k, call_method(m, s_topic));
    PyList_SET_ITEM(keys.ptr(), k, call_method(m, s_key));
    PyObject* value = call_method(m, s_value);
    if (value == Py_None) {
      Py_DECREF(value);
      value = empty.inc_ref().ptr();
    }
    PyList_SET_ITEM(values.ptr(), k, value);
    ++k;
  }
  if (k < n) {  // the unset tail holds NULLs, which a slice deletion skips
    for (PyObject* list : {topics.ptr(), keys.ptr(), values.ptr()}) {
      if (PyList_SetSlice(list, k, n, nullptr) != 0) throw py::error_already_set();
    }
  }
  return py::make_tuple(topics, to_array(partitions), to_array(offsets), to_array(timestamps), keys, values);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native fast path of pipelines.decode.decode_batch";
  m.def("decode", &decode, py::arg("values"), py::arg("max_bytes"), py::arg("max_features"),
        "messages (list of bytes) -> (positions, streams, ts, counts, flat values, layout, layouts, slow)");
  m.def("message_columns", &message_columns, py::arg("messages"),
        "confluent-kafka messages -> (topics, partitions, offsets, timestamps, keys, values), failed ones left out");
}
