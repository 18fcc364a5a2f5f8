// The `DATA ascii` body of a PCD file parsed into packed records. Mirrors the Python parser in
// v2xfuse/io/_pcd_text.py, which stays the reference, the fallback and the diagnostician: this
// parser accepts a strict subset of what Python's float()/int() accept, with the same values to
// the bit, and answers kUnparsed for anything else so that the Python path decides.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace v2xfuse {

// One value column of a row: `kind` 'f' (float32 or float64), 'i' or 'u' (1, 2, 4 or 8 bytes),
// written at byte `offset` of each record.
struct AsciiColumn {
  char kind;
  int size;
  int64_t offset;
};

enum AsciiStatus : int {
  kAsciiOk = 0,
  kAsciiWrongWidth = 1,  // data line `line` has `found` values, not one per column
  kAsciiExtraRow = 2,    // data line `line` is a row past POINTS
  kAsciiTruncated = 3,   // only `found` rows
  kAsciiUnparsed = 4,    // a value this parser does not take (not a number, out of range,
                         // or a spelling it leaves to Python): let the Python parser decide
};

struct AsciiResult {
  int status = kAsciiOk;
  int64_t line = 0;   // 1-based, counting '\n'-separated lines of the body
  int64_t found = 0;
};

// Rows are the non-blank lines ('\n'-separated; values separated by any of " \t\r\v\f", like
// bytes.split()). Writes `points` records of `row_bytes` bytes to `out`, only within it.
AsciiResult pcd_ascii_parse(const char* body, size_t n, int64_t points,
                            const std::vector<AsciiColumn>& columns, int64_t row_bytes,
                            uint8_t* out);

}  // namespace v2xfuse
