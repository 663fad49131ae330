// Files compiled into the programs by scripts/embed_files.cmake, so that nothing needs installing
// beside a binary: peerd's live page (service/dashboard/: served on the admin port without the
// token — it holds no data and reads the admin API with the session cookie that POST /login sets)
// and the plotting script peerctl report runs (scripts/report.py).
#pragma once

#include <string_view>

namespace peerd {

struct EmbeddedFile {
  std::string_view path;          // how it is asked for: "/", "/dashboard.js", "report.py"
  std::string_view content_type;  // without a charset: every file is UTF-8
  std::string_view body;
};

// The live page's file served at URL path `path` (in peerd), or null.
const EmbeddedFile* FindDashboardFile(std::string_view path);
// peerctl's script `name` (in peerctl), or null.
const EmbeddedFile* FindPeerctlScript(std::string_view name);

}  // namespace peerd
