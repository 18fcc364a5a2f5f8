#include "pcd_ascii/pcd_ascii.h"

#include <charconv>
#include <cstring>
#include <limits>
#include <system_error>

namespace v2xfuse {
namespace {

inline bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

template <typename T>
inline void store(uint8_t* at, T value) {
  std::memcpy(at, &value, sizeof(T));
}

// Python's float() then numpy's cast to the field's width: parse to the nearest double
// (from_chars rounds correctly, as float() does), then round that double to float32.
bool parse_float(const char* b, const char* e, int size, uint8_t* at) {
  if (b < e && *b == '+') ++b;  // float() takes a leading '+'; from_chars does not
  if (b == e || *b == '+' || (*b == '-' && e - b > 1 && b[1] == '+')) return false;
  for (const char* p = b; p < e; ++p) {
    if (*p == '(') return false;  // from_chars takes nan(...), float() does not
  }
  double value;
  const auto r = std::from_chars(b, e, value, std::chars_format::general);
  // Out of range (overflow to inf, underflow to 0) is left to Python, which does not fail.
  if (r.ec != std::errc() || r.ptr != e) return false;
  if (size == 4) {
    store(at, static_cast<float>(value));
  } else {
    store(at, value);
  }
  return true;
}

template <typename Wide, typename Narrow>
bool store_int(Wide value, uint8_t* at) {
  if (value < static_cast<Wide>(std::numeric_limits<Narrow>::min()) ||
      value > static_cast<Wide>(std::numeric_limits<Narrow>::max())) {
    return false;
  }
  store(at, static_cast<Narrow>(value));
  return true;
}

bool parse_int(const char* b, const char* e, char kind, int size, uint8_t* at) {
  if (b < e && *b == '+') ++b;
  if (b == e || *b == '+' || (kind == 'u' && *b == '-')) return false;
  if (kind == 'i') {
    int64_t value;
    const auto r = std::from_chars(b, e, value);
    if (r.ec != std::errc() || r.ptr != e) return false;
    switch (size) {
      case 1: return store_int<int64_t, int8_t>(value, at);
      case 2: return store_int<int64_t, int16_t>(value, at);
      case 4: return store_int<int64_t, int32_t>(value, at);
      default: store(at, value); return true;
    }
  }
  uint64_t value;
  const auto r = std::from_chars(b, e, value);
  if (r.ec != std::errc() || r.ptr != e) return false;
  switch (size) {
    case 1: return store_int<uint64_t, uint8_t>(value, at);
    case 2: return store_int<uint64_t, uint16_t>(value, at);
    case 4: return store_int<uint64_t, uint32_t>(value, at);
    default: store(at, value); return true;
  }
}

}  // namespace

AsciiResult pcd_ascii_parse(const char* body, size_t n, int64_t points,
                            const std::vector<AsciiColumn>& columns, int64_t row_bytes,
                            uint8_t* out) {
  AsciiResult result;
  const int64_t width = static_cast<int64_t>(columns.size());
  const char* p = body;
  const char* const end = body + n;
  int64_t row = 0, line = 0;
  while (p < end || line == 0) {
    ++line;
    const char* eol = static_cast<const char*>(std::memchr(p, '\n', end - p));
    if (eol == nullptr) eol = end;
    int64_t values = 0;
    uint8_t* record = out + row * row_bytes;
    const char* q = p;
    while (true) {
      while (q < eol && is_space(*q)) ++q;
      if (q == eol) break;
      const char* token = q;
      while (q < eol && !is_space(*q)) ++q;
      if (values == 0 && row >= points) {
        result.status = kAsciiExtraRow;
        result.line = line;
        return result;
      }
      if (values < width) {
        const AsciiColumn& c = columns[values];
        const bool ok = c.kind == 'f' ? parse_float(token, q, c.size, record + c.offset)
                                      : parse_int(token, q, c.kind, c.size, record + c.offset);
        if (!ok) {
          result.status = kAsciiUnparsed;
          result.line = line;
          return result;
        }
      }
      ++values;
    }
    if (values != 0) {
      if (values != width) {
        result.status = kAsciiWrongWidth;
        result.line = line;
        result.found = values;
        return result;
      }
      ++row;
    }
    if (eol == end) break;
    p = eol + 1;
  }
  if (row != points) {
    result.status = kAsciiTruncated;
    result.found = row;
  }
  return result;
}

}  // namespace v2xfuse
