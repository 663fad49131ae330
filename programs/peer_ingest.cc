// peer-ingest: streams files, directories or stdin into a running peerd, as documents of a task.
//
//   peer-ingest --task NAME [--server 127.0.0.1:7070] [--token-file peerd-data/data.token] [--version]
//               [--split file|blank-line|line|bytes:N] [--resume FILE | --no-resume] [--follow] PATH... | -
//
// --server and --token-file default to $PEERD_DATA and $PEERD_DATA_TOKEN_FILE when set. On a
// terminal, progress shows with percent and ETA when the input's size is known.
// Exit status 0 only when every document sent was acknowledged (durable in peerd's spool).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "ingest/document_source.h"
#include "ingest/ingest_client.h"
#include "proto/frame.h"

using namespace peerd;

int main(int argc, char** argv) {
  CLI::App app{"peer-ingest: stream text into a running peerd"};
  app.set_version_flag("--version", std::string("peer-ingest ") + PEERD_VERSION);
  IngestOptions o;
  std::string token_file = "peerd-data/data.token", split = "blank-line", resume;
  bool no_resume = false, follow = false;
  std::vector<std::string> paths;
  app.add_option("--server", o.server, "peerd's data port")->capture_default_str()->envname("PEERD_DATA");
  app.add_option("--task", o.task, "task the documents belong to ([A-Za-z0-9_.-], 1-64)")->required();
  app.add_option("--token-file", token_file, "file holding the data token")
      ->capture_default_str()
      ->envname("PEERD_DATA_TOKEN_FILE");
  app.add_option("--split", split, "file | blank-line | line | bytes:N")->capture_default_str();
  app.add_option("--resume", resume, "file recording acked ids (default .peer-ingest/TASK.acked)");
  app.add_flag("--no-resume", no_resume, "send everything, remember nothing");
  app.add_flag(
      "--follow", follow,
      "keep watching the last file for appended documents, through truncation and rotation (until Ctrl-C / SIGTERM)");
  app.add_option("paths", paths, "files, directories (recursive) or - for stdin")->required();
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const Status& st) {
    std::fprintf(stderr, "peer-ingest: %s\n", st.message().c_str());
    return 1;
  };
  if (!wire::ValidTaskName(o.task))
    return fail(Status::InvalidArgument("--task must be 1-64 characters of A-Z a-z 0-9 _ . -"));
  SplitSpec spec;
  if (Status st = ParseSplit(split, &spec); !st.ok()) return fail(st);
  {
    std::ifstream in(token_file);
    if (!in || !std::getline(in, o.token) || o.token.empty())
      return fail(Status::IOError("cannot read the data token from '" + token_file +
                                  "': peerd writes it to DATA_DIR/data.token at first start (--token-file)"));
  }
  if (!no_resume) {
    o.resume_path = resume.empty() ? ".peer-ingest/" + o.task + ".acked" : resume;
    std::filesystem::path parent = std::filesystem::path(o.resume_path).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent);
  }
  std::unique_ptr<DocumentSource> source;
  if (Status st = DocumentSource::Open(paths, spec, &source); !st.ok()) return fail(st);
  static std::atomic<bool> stop{false};
  if (follow) {
    // Ctrl-C or SIGTERM ends the watch; what was sent is still acknowledged before exit.
    struct sigaction sa {};
    sa.sa_handler = [](int) { stop = true; };
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    source->Follow(&stop, [](const std::string& why) { std::fprintf(stderr, "\npeer-ingest: %s\n", why.c_str()); });
  }

  // The input's size when it is known (files and directories, not stdin or --follow): the
  // progress line then says how far it is and when it should end.
  uint64_t total_bytes = 0;
  for (const std::string& path : paths) {
    std::error_code ec;
    if (path == "-" || follow) {
      total_bytes = 0;
      break;
    }
    if (std::filesystem::is_regular_file(path, ec)) total_bytes += std::filesystem::file_size(path, ec);
    if (std::filesystem::is_directory(path, ec))
      for (const auto& e : std::filesystem::recursive_directory_iterator(path, ec))
        if (e.is_regular_file(ec)) total_bytes += e.file_size(ec);
  }
  const bool tty = isatty(STDERR_FILENO);
  IngestProgress p;
  IngestClient client(o);
  Status st = client.Run(*source, &p, [tty, total_bytes](const IngestProgress& q) {
    if (!tty) return;
    const double rate = q.seconds > 0 ? q.acked_bytes / q.seconds : 0.0;
    std::string of;
    if (total_bytes > 0) {
      const double share = std::min(1.0, double(q.acked_bytes) / double(total_bytes));
      const long eta =
          rate > 0 ? static_cast<long>((total_bytes - std::min<uint64_t>(q.acked_bytes, total_bytes)) / rate) : -1;
      char b[96];
      std::snprintf(b, sizeof b, ", %.0f%% of %.1f MB, ETA %s", 100 * share, total_bytes / 1e6,
                    eta < 0 ? "?" : (std::to_string(eta / 60) + "m" + std::to_string(eta % 60) + "s").c_str());
      of = b;
    }
    std::fprintf(stderr, "\rpeer-ingest: sent %llu docs (%.1f MB), acked %llu (%.1f MB), %.1f MB/s%s   ",
                 (unsigned long long)q.sent_documents, q.sent_bytes / 1e6, (unsigned long long)q.acked_documents,
                 q.acked_bytes / 1e6, rate / 1e6, of.c_str());
  });
  if (tty) std::fprintf(stderr, "\n");
  std::fprintf(stderr,
               "peer-ingest: task %s: %llu documents (%.2f MB) acked of %llu sent in %.1f s (%.2f MB/s); "
               "%llu already on the server; %llu skipped as acked in an earlier run; %llu reconnects\n",
               o.task.c_str(), (unsigned long long)p.acked_documents, p.acked_bytes / 1e6,
               (unsigned long long)p.sent_documents, p.seconds, p.seconds > 0 ? p.acked_bytes / 1e6 / p.seconds : 0.0,
               (unsigned long long)p.duplicates, (unsigned long long)p.resumed, (unsigned long long)p.reconnects);
  if (!st.ok()) return fail(st);
  return 0;
}
