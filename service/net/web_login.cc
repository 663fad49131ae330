#include "service/net/web_login.h"

namespace peerd {

namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string_view Trimmed(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

}  // namespace

std::string CookieValue(std::string_view header, std::string_view name) {
  while (!header.empty()) {
    const size_t end = header.find(';');
    const std::string_view pair = Trimmed(header.substr(0, end));
    header = end == std::string_view::npos ? std::string_view() : header.substr(end + 1);
    const size_t eq = pair.find('=');
    if (eq != std::string_view::npos && Trimmed(pair.substr(0, eq)) == name)
      return std::string(Trimmed(pair.substr(eq + 1)));
  }
  return "";
}

bool FormField(std::string_view body, std::string_view name, std::string* value) {
  while (!body.empty()) {
    const size_t end = body.find('&');
    const std::string_view pair = body.substr(0, end);
    body = end == std::string_view::npos ? std::string_view() : body.substr(end + 1);
    const size_t eq = pair.find('=');
    if (pair.substr(0, eq) != name) continue;
    const std::string_view raw = eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1);
    value->clear();
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == '+') {
        value->push_back(' ');
      } else if (raw[i] == '%') {
        const int hi = i + 1 < raw.size() ? HexValue(raw[i + 1]) : -1;
        const int lo = i + 2 < raw.size() ? HexValue(raw[i + 2]) : -1;
        if (hi < 0 || lo < 0) return false;
        value->push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
      } else {
        value->push_back(raw[i]);
      }
    }
    return true;
  }
  return false;
}

std::string SessionCookie(const std::string& session) {
  return std::string(kSessionCookieName) + "=" + session + "; HttpOnly; SameSite=Strict; Path=/";
}

std::string ExpiredSessionCookie() {
  return std::string(kSessionCookieName) + "=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0";
}

}  // namespace peerd
