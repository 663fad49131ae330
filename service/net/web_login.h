// Signing in to the live page (GET / on the admin port) from a browser, without the token in a
// URL or in the page: POST /login with the admin token in a form body sets a cookie holding a
// random value peerd draws at start (RandomToken), HttpOnly (scripts cannot read it) and
// SameSite=Strict (a browser sends it only with requests from peerd's own pages). The cookie
// authorises GET requests only, so no other site can make a signed-in browser change anything;
// it lasts until peerd restarts. No LibTorch.
#pragma once

#include <string>
#include <string_view>

namespace peerd {

inline constexpr char kSessionCookieName[] = "peerd_session";

// The value of cookie `name` in a Cookie request header ("a=1; b=2"), or "" when it is not there.
std::string CookieValue(std::string_view header, std::string_view name);

// Field `name` of an application/x-www-form-urlencoded body, decoded ('+' is a space, %XX a byte).
// False when the field is absent or its escapes are malformed.
bool FormField(std::string_view body, std::string_view name, std::string* value);

// Set-Cookie values: the session cookie, and one that makes the browser drop it.
std::string SessionCookie(const std::string& session);
std::string ExpiredSessionCookie();

}  // namespace peerd
