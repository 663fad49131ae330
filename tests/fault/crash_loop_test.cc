// The crash loop: the real peerd, under ingest from several peer-ingest clients and training, with
// segments added and frozen and the policy changed through the admin API on a thread of their
// own, is killed with SIGKILL at random moments — often with an admin request in flight — and
// restarted, again and again. After every kill the store must open, every frozen segment's
// checksum must hold and never change, every acknowledged add and freeze must still be there, the
// policy must be the last acknowledged one or the one in flight at the kill, and the checkpoint
// (step, spool cursor) must never go back. At the end every document is acknowledged — the
// followers resend by themselves, none is relaunched — stored once, and trained once: peerd's
// training journal, with the steps each restart rolled back taken out, covers every token of every
// spooled document exactly once (a record kept apart from the checkpoint's cursor and byte count,
// which must agree with it).
//
// PEERD_FAULT_CYCLES sets the number of kills (CI: 3; the full run: 50, see bench/RELIABILITY.md);
// PEERD_FAULT_SEED replays a run (the seed is printed).
#include <gtest/gtest.h>

#include <rocksdb/db.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "experts_store/data_dir_db.h"
#include "experts_store/expert_store.h"
#include "ingest/document_source.h"
#include "proto/admin.pb.h"
#include "service/net/spool.h"
#include "tests/fault/disk_state.h"
#include "tests/peerd_process.h"

namespace peerd {
namespace {

namespace fs = std::filesystem;
using testing::DiskState;
using testing::json;
using testing::PeerdProcess;
using testing::ReadDisk;
using testing::U;
using namespace std::chrono_literals;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoull(v) : fallback;
}

// What peerd's training journal (service/training_journal.h) says the final model was trained on:
// the token spans of each spooled document, from the steps no restart rolled back.
struct JournalAccount {
  std::map<uint64_t, std::vector<std::pair<uint64_t, uint64_t>>> spans;  // document -> [from, to)
  int starts = 0;
  uint64_t rolled_back = 0;  // span lines of steps a restart trained again
};

void ReadJournal(const std::string& path, int64_t final_step, JournalAccount* out) {
  struct Line {
    int64_t step;
    uint64_t index, from, to;
  };
  std::vector<Line> kept;
  auto roll_back_past = [&](int64_t step) {
    const size_t before = kept.size();
    std::erase_if(kept, [&](const Line& l) { return l.step > step; });
    out->rolled_back += before - kept.size();
  };
  std::ifstream in(path);
  ASSERT_TRUE(in) << "no training journal at " << path;
  for (std::string text; std::getline(in, text);) {
    std::istringstream line(text);
    std::string kind;
    Line l{};
    line >> kind >> l.step >> l.index >> l.from;
    if (kind == "start" && line) {
      roll_back_past(l.step);
      ++out->starts;
    } else if (kind == "step" && (line >> l.to) && l.from < l.to) {
      kept.push_back(l);
    } else {
      FAIL() << "unreadable journal line: \"" << text << "\"";
    }
  }
  roll_back_past(final_step);
  for (const Line& l : kept) out->spans[l.index].push_back({l.from, l.to});
}

// A peer-ingest process following one task's file (--follow: it sends lines as they are
// appended), launched again whenever it exits before the end (the resume file makes that safe).
struct Client {
  std::string task, file;
  pid_t pid = -1;
  int runs = 0;
};

void Launch(const PeerdProcess& p, Client* c) {
  c->pid = fork();
  if (c->pid == 0) {
    const std::string cmd =
        p.IngestCommand(c->task, c->file, "--split line --follow") + " >> " + p.dir() + "/" + c->task + ".log 2>&1";
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), nullptr);
    _exit(127);
  }
  c->runs++;
}

void Tend(const PeerdProcess& p, Client* c) {
  int status = 0;
  if (c->pid > 0 && waitpid(c->pid, &status, WNOHANG) != c->pid) return;  // still running
  Launch(p, c);
}

// Documents of a file as peer-ingest splits it (a line each), and those its resume file says
// were acknowledged.
std::set<std::string> Ids(const std::string& file) {
  std::set<std::string> ids;
  std::unique_ptr<DocumentSource> source;
  if (!DocumentSource::Open({file}, {SplitMode::kLine}, &source).ok()) return ids;
  for (IngestDocument d; source->Next(&d);) ids.insert(d.id);
  return ids;
}
std::set<std::string> Acked(const std::string& resume_file) {
  std::set<std::string> ids;
  std::ifstream in(resume_file);
  for (std::string id; std::getline(in, id);) ids.insert(id);
  return ids;
}

TEST(CrashLoop, AckedDocumentsAreTrainedOnceAndFrozenSegmentsNeverChangeAcrossSigkills) {
  const uint64_t cycles = EnvOr("PEERD_FAULT_CYCLES", 3);
  const uint64_t seed = EnvOr("PEERD_FAULT_SEED", std::random_device{}());
  std::mt19937_64 rng(seed);
  std::cout << "crash loop: " << cycles << " cycles, PEERD_FAULT_SEED=" << seed << "\n";

  const std::string dir = ::testing::TempDir() + "/peerd_crash_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << testing::kTinyConfigJson;
  // Three tasks of real text, a verse a line, each followed by its own client while a feeder
  // thread appends verses to the three files all through the run, so every kill lands mid-ingest.
  const std::vector<std::string> verses =
      testing::NonEmptyLines(std::string(PEERD_CORPUS_DIR) + "/kjv/train.txt", 200'000);
  ASSERT_FALSE(verses.empty()) << "run scripts/corpora.sh kjv";
  std::vector<Client> clients;
  for (const char* task : {"law", "prophets", "gospels"}) {
    clients.push_back({task, dir + "/" + task + ".txt"});
    std::ofstream(clients.back().file);
  }
  std::atomic<bool> feeding{true};
  std::atomic<size_t> fed{0};
  std::thread feeder([&] {
    for (size_t i = 0; feeding && i < verses.size(); ++i, ++fed) {
      std::ofstream(clients[i % clients.size()].file, std::ios::app) << verses[i] << "\n";
      // About 3 KB/s: near what the tiny model trains on one thread late in a long run (many
      // segments), so that the backlog left to drain at the end stays small.
      std::this_thread::sleep_for(40ms);
    }
  });
  struct StopFeeder {
    std::atomic<bool>* feeding;
    std::thread* feeder;
    ~StopFeeder() {
      *feeding = false;
      if (feeder->joinable()) feeder->join();
    }
  } stop_feeder{&feeding, &feeder};
  struct StopClients {
    std::vector<Client>* clients;
    ~StopClients() {
      for (Client& c : *clients)
        if (c.pid > 0) {
          kill(c.pid, SIGKILL);
          waitpid(c.pid, nullptr, 0);
        }
    }
  } stop_clients{&clients};

  PeerdProcess peerd(dir, /*keep_ports=*/true);
  const std::string journal = dir + "/journal.txt";
  const std::string flags =
      "--checkpoint-every-steps 20 --checkpoint-every-seconds 1 --threads 1 --training-journal " + journal;

  DiskState last;                             // as read after the previous kill
  std::map<uint32_t, uint64_t> frozen_first;  // checksum of each segment when first seen frozen
  std::mutex admin_mu;                        // guards the admin thread's records below
  std::set<uint32_t> freezes_acked, adds_acked;
  double policy_acked = 0.25;                // replayRatio as last acknowledged (the default)
  std::optional<double> policy_in_flight;    // a change sent and not yet answered
  std::set<double> policy_allowed = {0.25};  // what replayRatio may read after a restart
  int policies_acked = 0, kills_with_policy_in_flight = 0;
  uint64_t checkpoint_seen = 0, documents_acked_before = 0;
  std::uniform_int_distribution<int> kill_after_ms(300, 2500);

  for (uint64_t cycle = 0; cycle < cycles; ++cycle) {
    ASSERT_NO_FATAL_FAILURE(peerd.Start(flags)) << "cycle " << cycle;
    json s = peerd.CtlJson("status");
    EXPECT_GE(U(s, "step"), last.checkpoint.step()) << "cycle " << cycle << ": the step went back past the checkpoint";
    EXPECT_GE(U(s, "spoolDocuments"), documents_acked_before) << "acknowledged documents were lost";
    {
      std::set<uint32_t> present;
      for (const auto& seg : s["segments"]) present.insert(seg.value("id", 0u));
      for (uint32_t id : adds_acked) EXPECT_TRUE(present.count(id)) << "acknowledged add of segment " << id << " lost";
      const double ratio = peerd.CtlJson("policy").value("replayRatio", -1.0);
      bool allowed = false;
      for (double r : policy_allowed) allowed |= std::abs(ratio - r) < 1e-6;
      EXPECT_TRUE(allowed) << "cycle " << cycle << ": replayRatio " << ratio
                           << " is neither the last acknowledged change nor the one in flight at the kill";
      policy_acked = ratio;  // what it is now, acknowledged or not, is where the next cycle starts
    }

    for (Client& c : clients) Tend(peerd, &c);

    // Admin work on its own thread, so that the kill can land while an add, a freeze or a policy
    // change is in flight: what was acknowledged must survive it, and what was not is all or
    // nothing (checked after the next start). The main thread only watches and kills.
    std::atomic<bool> admin_stop{false};
    std::thread admin([&, arng = std::mt19937_64(rng())]() mutable {
      std::uniform_int_distribution<int> what(0, 2), ratio(1, 3);
      while (!admin_stop) {
        const int op = what(arng);
        if (op == 2) {
          const double r = 0.1 * ratio(arng);
          {
            std::lock_guard<std::mutex> lock(admin_mu);
            policy_in_flight = r;
          }
          const bool ok = peerd.Ctl("policy set replayRatio=" + std::to_string(r)).code == 0;
          std::lock_guard<std::mutex> lock(admin_mu);
          if (ok) {
            policy_acked = r;
            policy_in_flight.reset();
            ++policies_acked;
          }  // else: killed (or refused) with the change in flight — it may or may not have applied
        } else {
          json st = json::parse(peerd.Ctl("--json status").out, nullptr, false);
          if (st.is_discarded()) break;  // killed
          int training = -1, count = 0;
          for (const auto& seg : st["segments"])
            if (seg.value("state", "") == "training") {
              ++count;
              if (training < 0) training = seg.value("id", -1);
            }
          if (count < 2) {
            json added = json::parse(peerd.Ctl("--json segments add").out, nullptr, false);
            std::lock_guard<std::mutex> lock(admin_mu);
            if (!added.is_discarded() && added.contains("ids"))
              for (const auto& id : added["ids"]) adds_acked.insert(id.get<uint32_t>());
          } else if (training >= 0 && peerd.Ctl("segments freeze " + std::to_string(training)).code == 0) {
            std::lock_guard<std::mutex> lock(admin_mu);
            freezes_acked.insert(static_cast<uint32_t>(training));
          }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50 + arng() % 250));
      }
    });
    const auto kill_at = std::chrono::steady_clock::now() + std::chrono::milliseconds(kill_after_ms(rng));
    while (std::chrono::steady_clock::now() < kill_at) {
      json st = peerd.CtlJson("status");
      checkpoint_seen = std::max(checkpoint_seen, U(st, "lastCheckpointStep"));
      documents_acked_before = std::max(documents_acked_before, U(st, "spoolDocuments"));
      std::this_thread::sleep_for(100ms);
    }
    peerd.Kill(SIGKILL);
    admin_stop = true;
    admin.join();
    policy_allowed = {policy_acked};
    if (policy_in_flight) policy_allowed.insert(*policy_in_flight), ++kills_with_policy_in_flight;
    policy_in_flight.reset();

    DiskState now;
    ASSERT_NO_FATAL_FAILURE(ReadDisk(peerd.data_dir(), &now)) << "cycle " << cycle;
    for (uint32_t id : freezes_acked)
      EXPECT_TRUE(now.frozen.count(id)) << "acknowledged freeze of segment " << id << " lost";
    for (const auto& [id, checksum] : now.frozen) {
      auto [it, first] = frozen_first.emplace(id, checksum);
      EXPECT_TRUE(first || it->second == checksum) << "frozen segment " << id << " changed";
    }
    EXPECT_GE(now.checkpoint.step(), last.checkpoint.step()) << "the checkpoint went back";
    EXPECT_GE(now.checkpoint.step(), checkpoint_seen) << "a checkpoint reported on /v1/status is not on disk";
    EXPECT_GE(now.checkpoint.spool_next_index(), last.checkpoint.spool_next_index());
    EXPECT_GE(now.checkpoint.consumed_bytes(), last.checkpoint.consumed_bytes());
    last = now;
    if (::testing::Test::HasFailure()) return;
  }

  // The end: no more kills, no more text. Every client gets every line acknowledged, the
  // backlog drains, a last checkpoint.
  feeding = false;
  feeder.join();
  ASSERT_NO_FATAL_FAILURE(peerd.Start(flags));
  std::set<std::pair<std::string, std::string>> sent;
  const auto deadline = std::chrono::steady_clock::now() + 180s;
  for (Client& c : clients) {
    const std::set<std::string> lines = Ids(c.file);
    // No more text comes: each follower, idle on its file, resends by itself whatever the last
    // kill left unacknowledged.
    while (Acked(dir + "/" + c.task + ".acked") != lines && std::chrono::steady_clock::now() < deadline) {
      Tend(peerd, &c);
      std::this_thread::sleep_for(100ms);
    }
    ASSERT_EQ(Acked(dir + "/" + c.task + ".acked"), lines)
        << c.task << ": not every line was acknowledged: " << testing::Slurp(dir + "/" + c.task + ".log");
    if (c.pid > 0) {
      kill(c.pid, SIGTERM);
      waitpid(c.pid, nullptr, 0);
      c.pid = -1;
    }
    for (const std::string& id : lines) sent.insert({c.task, id});
  }
  // Trained down to less than one window (context + 1 = 33 tokens), counted in tokens as the
  // trainer counts them: every document of the backlog still owes its end-of-document token.
  peerd.WaitFor([](const json& st) { return U(st, "spoolBacklogBytes") + U(st, "spoolBacklogDocuments") < 33; }, 600s);
  ASSERT_EQ(peerd.Ctl("checkpoint").code, 0);
  ASSERT_EQ(peerd.Kill(SIGTERM), 0);

  // Every line of every file is stored exactly once.
  std::shared_ptr<DataDirDb> db;
  ASSERT_TRUE(DataDirDb::Open(peerd.data_dir(), {}, &db).ok());
  std::unique_ptr<Spool> spool;
  ASSERT_TRUE(Spool::Open(db, &spool).ok());
  std::vector<SpoolEntry> stored;
  ASSERT_TRUE(spool->Read(1, 1 << 30, &stored).ok());
  std::set<std::pair<std::string, std::string>> unique;
  for (const SpoolEntry& e : stored) unique.insert({e.task, e.id});
  EXPECT_EQ(unique.size(), stored.size()) << "a document was stored twice";
  EXPECT_EQ(unique, sent) << "the spool does not hold exactly the documents sent";
  uint64_t lost = 0;
  for (const auto& doc : sent) lost += !unique.count(doc);

  // Trained once, as the journal tells it: every token of every document before the checkpoint's
  // cursor in exactly one surviving step, the document at the cursor up to its offset, none after.
  DiskState end;
  db.reset();
  spool.reset();
  ASSERT_NO_FATAL_FAILURE(ReadDisk(peerd.data_dir(), &end));
  const CheckpointMeta& m = end.checkpoint;
  JournalAccount account;
  ASSERT_NO_FATAL_FAILURE(ReadJournal(journal, m.step(), &account));
  EXPECT_EQ(account.starts, static_cast<int>(cycles) + 1) << "a start of peerd is missing from the journal";
  uint64_t trained_twice = 0, gaps = 0, untrained = 0, before_cursor = 0, total = 0;
  std::string first_problem;
  for (const SpoolEntry& e : stored) {
    const uint64_t tokens = e.text.size() + 1;  // its bytes, then the end-of-document token
    const uint64_t expected = e.index < m.spool_next_index()    ? tokens
                              : e.index == m.spool_next_index() ? m.spool_offset()
                                                                : 0;
    std::vector<std::pair<uint64_t, uint64_t>>& spans = account.spans[e.index];
    std::sort(spans.begin(), spans.end());
    uint64_t covered = 0;
    bool twice = false, gap = false;
    for (const auto& [from, to] : spans) {
      twice |= from < covered;
      gap |= from > covered;
      covered = std::max(covered, to);
    }
    gap |= covered < expected;
    twice |= covered > expected;
    trained_twice += twice;
    gaps += gap;
    if ((twice || gap) && first_problem.empty())
      first_problem = "document " + std::to_string(e.index) + " (" + e.task + " " + e.id + ", " +
                      std::to_string(tokens) + " tokens, " + std::to_string(expected) +
                      " before the cursor) trained as " + std::to_string(spans.size()) + " spans ending at " +
                      std::to_string(covered);
    untrained += tokens - std::min(tokens, covered);
    if (e.index < m.spool_next_index()) before_cursor += e.text.size();
    total += e.text.size();
  }
  EXPECT_EQ(trained_twice, 0u) << "documents trained twice; the first: " << first_problem;
  EXPECT_EQ(gaps, 0u)
      << "documents with text the checkpoint counts as trained that no surviving step trained; the first: "
      << first_problem;
  EXPECT_LT(untrained, 33u) << "acknowledged text left untrained";
  // The checkpoint's own counters agree: every byte before the cursor counted once, none after it.
  EXPECT_GE(m.consumed_bytes(), before_cursor);
  EXPECT_LE(m.consumed_bytes(), before_cursor + m.spool_offset());
  for (const auto& [id, checksum] : frozen_first) EXPECT_EQ(end.frozen[id], checksum);
  // The followers reconnect by themselves across every kill: none exited to be relaunched.
  int runs = 0;
  for (const Client& c : clients) runs += c.runs;
  EXPECT_EQ(runs, static_cast<int>(clients.size())) << "a follower gave up and was relaunched";
  std::cout << "crash loop: " << cycles << " kills survived; " << stored.size() << " documents acked, " << lost
            << " lost, " << stored.size() - unique.size() << " stored twice, " << trained_twice << " trained twice, "
            << gaps << " with untrained gaps (" << account.rolled_back << " journal spans rolled back by restarts); "
            << frozen_first.size() << " frozen segments intact; " << runs - static_cast<int>(clients.size())
            << " clients relaunched; " << fed << " lines fed; last checkpoint step " << m.step() << "\n";
  std::cout << "crash loop: admin acknowledged " << adds_acked.size() << " adds, " << freezes_acked.size()
            << " freezes, " << policies_acked << " policy changes; " << kills_with_policy_in_flight
            << " kills with a policy change in flight\n";
}

}  // namespace
}  // namespace peerd
