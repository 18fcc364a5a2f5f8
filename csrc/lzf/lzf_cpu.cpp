// LZF decoder. Stream: tokens each led by a control byte `ctrl`:
//   ctrl < 32   literal run of ctrl + 1 bytes, copied from the input;
//   ctrl >= 32  back-reference of (ctrl >> 5) + 2 bytes (one more length byte when ctrl >> 5 == 7),
//               starting ((ctrl & 0x1f) << 8 | next byte) + 1 bytes back in the output; the copy
//               is byte by byte, so a source that overlaps the destination repeats a period.
#include "lzf/lzf.h"

#include <cstring>

namespace v2xfuse {
namespace {

constexpr size_t kMaxRefLen = 7 + 255 + 2;
constexpr size_t kMaxExpansion = kMaxRefLen / 3;  // as MAX_EXPANSION in v2xfuse/io/lzf.py

bool fail(std::string* error, std::string message) {
  *error = std::move(message);
  return false;
}

std::string cut_off(size_t at) {
  return "back-reference at input offset " + std::to_string(at) +
         " is cut off by the end of the input";
}

std::string overflow(size_t out_size) {
  return "output exceeds the expected " + std::to_string(out_size) + " bytes";
}

}  // namespace

bool lzf_decode(const uint8_t* in, size_t n, uint8_t* out, size_t out_size, std::string* error) {
  // Written so that no sum below can wrap: n and out_size are bounded by real buffers, and
  // every increment is at most kMaxRefLen.
  if (out_size / kMaxExpansion > n || (out_size / kMaxExpansion == n && out_size % kMaxExpansion)) {
    return fail(error, std::to_string(n) + " compressed bytes cannot expand to " +
                           std::to_string(out_size) + " bytes");
  }
  size_t ip = 0, op = 0;
  while (ip < n) {
    const size_t token = ip;
    const unsigned ctrl = in[ip++];
    if (ctrl < 32) {
      const size_t run = ctrl + 1;
      if (run > n - ip) {
        return fail(error, "literal run of " + std::to_string(run) + " bytes at input offset " +
                               std::to_string(token) + " passes the end of the input (" +
                               std::to_string(n) + " bytes)");
      }
      if (run > out_size - op) return fail(error, overflow(out_size));
      std::memcpy(out + op, in + ip, run);
      ip += run;
      op += run;
      continue;
    }
    size_t length = ctrl >> 5;
    if (length == 7) {
      if (ip >= n) return fail(error, cut_off(ip - 1));
      length += in[ip++];
    }
    length += 2;
    if (ip >= n) return fail(error, cut_off(ip - 1));
    const size_t distance = (static_cast<size_t>(ctrl & 0x1f) << 8 | in[ip++]) + 1;
    if (distance > op) {
      return fail(error, "back-reference " + std::to_string(distance) +
                             " bytes back at output offset " + std::to_string(op) +
                             " points before the start of the output");
    }
    if (length > out_size - op) return fail(error, overflow(out_size));
    uint8_t* dst = out + op;
    const uint8_t* src = dst - distance;
    if (distance >= length) {
      std::memcpy(dst, src, length);
    } else {
      for (size_t i = 0; i < length; ++i) dst[i] = src[i];  // overlapping: repeats the period
    }
    op += length;
  }
  if (op != out_size) {
    return fail(error, "stream expands to " + std::to_string(op) + " bytes, expected " +
                           std::to_string(out_size));
  }
  return true;
}

}  // namespace v2xfuse
