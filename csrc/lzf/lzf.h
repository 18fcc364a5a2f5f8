// LZF decompression (liblzf's stream format, as in PCD `DATA binary_compressed`).
// The format and the checks mirror the pure-Python decoder in v2xfuse/io/lzf.py, which stays the
// reference and the fallback; the two must agree on every input, valid or corrupt.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace v2xfuse {

// Decompresses `in[0, n)` into `out[0, out_size)`. The stream must expand to exactly `out_size`
// bytes. Every literal run and back-reference is checked against both buffers before it is
// copied, so a corrupt stream never reads or writes out of bounds. Returns true on success;
// on failure returns false and sets `*error` to the same message as the Python decoder.
bool lzf_decode(const uint8_t* in, size_t n, uint8_t* out, size_t out_size, std::string* error);

}  // namespace v2xfuse
