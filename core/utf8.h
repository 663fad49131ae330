// UTF-8 for a byte-level model: its text is bytes, JSON's is UTF-8. Header-only, no LibTorch.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace peerd {

// Length of the valid UTF-8 sequence at s[i], or 0 when the bytes there are not one. Strict, as
// protobuf's JSON printer is: no overlong forms, no surrogates (ED A0..BF), nothing above U+10FFFF.
inline size_t Utf8SequenceAt(std::string_view s, size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return 1;
  size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
  if (b >= 0xC2 && b <= 0xDF)
    n = 2;
  else if (b >= 0xE0 && b <= 0xEF)
    n = 3, lo = b == 0xE0 ? 0xA0 : 0x80, hi = b == 0xED ? 0x9F : 0xBF;
  else if (b >= 0xF0 && b <= 0xF4)
    n = 4, lo = b == 0xF0 ? 0x90 : 0x80, hi = b == 0xF4 ? 0x8F : 0xBF;
  if (n == 0 || i + n > s.size()) return 0;
  const auto second = static_cast<unsigned char>(s[i + 1]);
  if (second < lo || second > hi) return 0;
  for (size_t k = 2; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  return n;
}

// `bytes` as valid UTF-8: each byte that does not begin a valid sequence becomes U+FFFD (the
// replacement character); valid sequences are kept as they are.
inline std::string ValidUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    const size_t n = Utf8SequenceAt(bytes, i);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(bytes.substr(i, n));
      i += n;
    }
  }
  return out;
}

// How many leading bytes of `bytes` can be passed on without cutting a character in two: all of
// them, unless they end in the first 1-3 bytes of a sequence that more bytes could complete.
inline size_t Utf8SafePrefix(std::string_view bytes) {
  const size_t n = bytes.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const auto b = static_cast<unsigned char>(bytes[n - back]);
    if ((b & 0xC0) == 0x80) continue;    // a continuation byte: look further back for its lead
    if (b < 0xC2 || b > 0xF4) return n;  // ASCII, or a byte no sequence begins with
    const size_t need = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

}  // namespace peerd
