// peerd end to end, through its public interface only: the real peerd binary on loopback ports it
// picks itself, fed by the real peer-ingest and steered by the real peerctl — stream a corpus
// slice, watch it train, add and freeze a segment, register a task, evaluate, kill -9, restart,
// and find the frozen segment bit-identical, the step resumed from the checkpoint and every
// acknowledged document trained.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "tests/peerd_process.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using namespace std::chrono_literals;

using peerd::testing::PeerdProcess;
using peerd::testing::Sh;
using peerd::testing::ShellResult;
using peerd::testing::Slurp;
using peerd::testing::U;

// The first `bytes` of KJV's training text cut after its last whole chapter, or of its held-out
// text as it comes; "" when scripts/corpora.sh kjv has not run.
std::string KjvChapters(size_t bytes) {
  std::ifstream kjv(std::string(PEERD_CORPUS_DIR) + "/kjv/train.txt");
  std::string text(bytes, '\0');
  kjv.read(text.data(), text.size());
  if (!kjv) return "";
  return text.substr(0, text.rfind("\n\n") + 2);
}
std::string KjvHeldOut(size_t bytes) {
  std::ifstream kjv(std::string(PEERD_CORPUS_DIR) + "/kjv/heldout.txt");
  std::string text(bytes, '\0');
  kjv.read(text.data(), text.size());
  return kjv ? text : "";
}

json Segment(const json& status, int id) {
  for (const auto& s : status["segments"])
    if (s.value("id", -1) == id) return s;
  return json();
}

// scripts/load_export.py, given what `peerctl export` wrote to `export_dir`, scores the file at
// `text` as peerd's /v1/score does: each byte's log-probability within 1e-4, but for at most one
// byte in a thousand within 1e-2 — where two experts' retrieval scores nearly tie, float rounding
// in another order may retrieve the other (measured: one byte of 6,000 at 3e-4, the rest < 1e-5).
void ExpectTheExportScoresAsPeerd(const PeerdProcess& peerd, const std::string& export_dir, const std::string& text) {
  const json ours = peerd.CtlJson("score --log-probs < " + text);
  ShellResult loaded = Sh("/usr/bin/python3 " + std::string(PEERD_SOURCE_DIR) + "/scripts/load_export.py " +
                          export_dir + " --score " + text);
  ASSERT_EQ(loaded.code, 0) << loaded.out;
  const json theirs = json::parse(loaded.out, nullptr, false);
  ASSERT_TRUE(theirs.is_object()) << loaded.out;
  ASSERT_EQ(theirs["logProbs"].size(), ours["logProbs"].size()) << text;
  double worst = 0;
  size_t beyond = 0;  // bytes further than 1e-4 apart
  for (size_t i = 0; i < ours["logProbs"].size(); ++i) {
    const double d = std::abs(ours["logProbs"][i].get<double>() - theirs["logProbs"][i].get<double>());
    worst = std::max(worst, d);
    beyond += d > 1e-4;
  }
  EXPECT_LE(beyond * 1000, ours["logProbs"].size()) << text << ": " << beyond << " bytes more than 1e-4 apart";
  EXPECT_LT(worst, 1e-2) << text << ": the largest difference of a byte's log-probability";
  EXPECT_NEAR(theirs.value("bitsPerByte", 0.0), ours.value("bitsPerByte", 0.0), 1e-5) << text;
}

TEST(Service, StreamTrainFreezeEvaluateSurviveKillAndResume) {
  const std::string dir = ::testing::TempDir() + "/peerd_service_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  // A small model so that steps are quick; everything else is the embedded default.
  std::ofstream(dir + "/config.json") << R"({"model": {"dModel": 64, "context": 64}, "train": {"batchSize": 8}})";
  {
    const std::string text = KjvChapters(120'000), held = KjvHeldOut(8'000);
    ASSERT_FALSE(text.empty() || held.empty()) << "run scripts/corpora.sh kjv";
    std::ofstream(dir + "/kjv.txt") << text;
    std::ofstream(dir + "/heldout.txt") << held;
  }
  PeerdProcess peerd(dir);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());

  // Without the token nothing is served or changed.
  std::ofstream(dir + "/wrong.token") << "not-the-token\n";
  ShellResult denied = peerd.Ctl("segments add", dir + "/wrong.token");
  EXPECT_NE(denied.code, 0);
  EXPECT_NE(denied.out.find("401"), std::string::npos) << denied.out;
  ShellResult bad_policy = peerd.Ctl("policy set replayRatio=2");
  EXPECT_NE(bad_policy.code, 0);
  EXPECT_NE(bad_policy.out.find("'train.replayRatio' must be in [0, 1)"), std::string::npos) << bad_policy.out;
  ShellResult bad_distill = peerd.Ctl("policy set distillWeight=-1");
  EXPECT_NE(bad_distill.code, 0);
  EXPECT_NE(bad_distill.out.find("'train.distillWeight' must be in [0, 1000]"), std::string::npos) << bad_distill.out;
  json recipe = peerd.CtlJson("policy set replayRatio=0.25 distillWeight=2");
  EXPECT_EQ(recipe.value("distillWeight", 0.0), 2.0) << recipe.dump();
  EXPECT_EQ(recipe.value("replayRatio", 0.0), 0.25) << recipe.dump();
  // An acknowledged policy change survives kill -9 even before anything trains.
  peerd.Kill(SIGKILL);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  EXPECT_EQ(peerd.CtlJson("policy get").value("distillWeight", 0.0), 2.0) << "the policy change was lost";

  ShellResult ingest = peerd.Ingest("kjv", dir + "/kjv.txt");
  ASSERT_EQ(ingest.code, 0) << ingest.out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(ingest.out, m, std::regex("([0-9]+) documents .* acked of ([0-9]+) sent")));
  const uint64_t documents = std::stoull(m[1]);
  EXPECT_EQ(m[1], m[2]);
  EXPECT_GT(documents, 10u);

  // peerctl wait trained gives up after --timeout with exit status 3 while there is more to train.
  ShellResult waited = peerd.Ctl("wait trained --timeout 0.2");
  EXPECT_EQ(waited.code, 3) << waited.out;
  EXPECT_NE(waited.out.find("still untrained after"), std::string::npos) << waited.out;
  json s = peerd.WaitFor([](const json& st) { return U(st, "step") >= 20; });
  EXPECT_EQ(U(s, "spoolDocuments"), documents);
  EXPECT_GT(s.value("recentLoss", 0.0), 0.0);

  json added = peerd.CtlJson("segments add");
  ASSERT_EQ(added["ids"].size(), 1u);
  EXPECT_EQ(added["ids"][0], 1);
  ShellResult no_id = peerd.Ctl("segments freeze");
  EXPECT_EQ(no_id.code, 2) << "freezing is for ever: no default id";
  EXPECT_NE(no_id.out.find("needs the segment's id"), std::string::npos) << no_id.out;
  EXPECT_EQ(Segment(peerd.CtlJson("status"), 0).value("state", ""), "training");
  ASSERT_EQ(peerd.Ctl("segments freeze 0").code, 0);
  ShellResult twice = peerd.Ctl("segments freeze 0");
  EXPECT_NE(twice.code, 0);
  EXPECT_NE(twice.out.find("409"), std::string::npos) << twice.out;
  json frozen = Segment(peerd.CtlJson("status"), 0);
  ASSERT_EQ(frozen.value("state", ""), "frozen");
  const std::string checksum = frozen["checksum"].dump();

  ASSERT_EQ(peerd.Ctl("tasks add kjv " + dir + "/heldout.txt").code, 0);
  ASSERT_EQ(peerd.Ctl("pause").code, 0);  // the evaluation and the score below see one model
  ShellResult paused = peerd.Ctl("wait trained");
  EXPECT_EQ(paused.code, 1) << paused.out;
  EXPECT_NE(paused.out.find("training is paused"), std::string::npos) << paused.out;
  json row = peerd.CtlJson("eval run --label 'after kjv'");
  ASSERT_EQ(row["bitsPerByte"].size(), 1u);
  EXPECT_LT(row["bitsPerByte"][0].get<double>(), 7.5) << "the model should have learnt something";
  json used = Segment(peerd.CtlJson("status"), 0);
  EXPECT_GT(used.value("usage", 0.0), 0.0)
      << "the evaluation should have retrieved experts of segment 0: " << used.dump();
  EXPECT_GT(used.value("usageKl", -1.0), 0.0);
  // Scoring the same text (peerctl reads it from stdin) gives the row's figure, says which
  // segments answered, and adds no row.
  json scored = peerd.CtlJson("score < " + dir + "/heldout.txt");
  EXPECT_NEAR(scored.value("bitsPerByte", 0.0), row["bitsPerByte"][0].get<double>(), 1e-9) << scored.dump();
  ASSERT_TRUE(scored.contains("segments")) << scored.dump();
  double share = 0;
  for (const auto& seg : scored["segments"]) share += seg.value("share", 0.0);
  EXPECT_NEAR(share, 1.0, 1e-9) << scored.dump();
  EXPECT_EQ(peerd.CtlJson("eval report")["rows"].size(), 1u);
  // GET /metrics follows Prometheus' conventions (the Prometheus client's parser reads it) and
  // says what the API says.
  auto scrape = [&] {
    ShellResult metrics =
        Sh("/usr/bin/python3 " + std::string(PEERD_SOURCE_DIR) +
           "/tests/check_metrics.py 127.0.0.1:" + peerd.admin_port() + " " + peerd.data_dir() + "/admin.token");
    EXPECT_EQ(metrics.code, 0) << metrics.out;
    json parsed = json::parse(metrics.out, nullptr, false);
    EXPECT_TRUE(parsed.is_object()) << metrics.out;
    return parsed.is_object() ? parsed : json::object({{"samples", json::object()}, {"types", json::object()}});
  };
  const json scraped = scrape();
  const json& sample = scraped["samples"];
  EXPECT_NEAR(sample.value("peerd_task_bits_per_byte{task=kjv}", 0.0), row["bitsPerByte"][0].get<double>(), 1e-6);
  EXPECT_GE(sample.value("peerd_training_steps_total", 0.0), 20.0);
  EXPECT_EQ(sample.value("peerd_training_step_seconds_count", 0.0), sample.value("peerd_training_steps_total", -1.0))
      << "every step since start is in the histogram (none before a restart)";
  EXPECT_EQ(sample.value("peerd_segments{state=frozen}", 0.0), 1.0);
  EXPECT_EQ(sample.value("peerd_ingest_documents_total", 0.0), double(documents));
  EXPECT_EQ(sample.value("peerd_training_paused", 0.0), 1.0);
  for (const char* name :
       {"peerd_row_cache_hits_total", "peerd_row_cache_misses_total", "peerd_spool_backlog_bytes",
        "peerd_spool_backlog_documents", "peerd_eval_acc_bits_per_byte", "peerd_admin_request_errors_total"})
    EXPECT_TRUE(sample.contains(name)) << name << " missing: " << scraped.dump();
  EXPECT_EQ(scraped["types"].value("peerd_training_step_seconds", ""), "histogram");
  ShellResult human = peerd.Ctl("score 'In the beginning God created the heaven and the earth.'");
  EXPECT_EQ(human.code, 0) << human.out;
  EXPECT_NE(human.out.find("bits/byte"), std::string::npos) << human.out;
  ASSERT_EQ(peerd.Ctl("resume").code, 0);
  // A task can be deleted, with its column of the rows; the metrics follow the rows each time.
  ASSERT_EQ(peerd.Ctl("tasks add scratch " + dir + "/heldout.txt").code, 0);
  EXPECT_FALSE(scrape()["samples"].contains("peerd_task_bits_per_byte{task=scratch}"));
  ASSERT_EQ(peerd.Ctl("eval run --label scratch").code, 0);
  EXPECT_TRUE(scrape()["samples"].contains("peerd_task_bits_per_byte{task=scratch}"));
  ASSERT_EQ(peerd.Ctl("tasks delete scratch").code, 0);
  EXPECT_FALSE(scrape()["samples"].contains("peerd_task_bits_per_byte{task=scratch}"));
  EXPECT_EQ(peerd.CtlJson("tasks list")["tasks"].size(), 1u);
  ShellResult gone = peerd.Ctl("tasks delete scratch");
  EXPECT_NE(gone.code, 0);
  EXPECT_NE(gone.out.find("404"), std::string::npos) << gone.out;

  ASSERT_EQ(peerd.Ctl("checkpoint").code, 0);
  const uint64_t checkpoint_step = U(peerd.CtlJson("status"), "lastCheckpointStep");
  EXPECT_GE(checkpoint_step, 20u);
  peerd.WaitFor([&](const json& st) { return U(st, "step") > checkpoint_step + 3; });

  peerd.Kill(SIGKILL);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  json after = peerd.CtlJson("status");
  EXPECT_GE(U(after, "step"), checkpoint_step) << "the step went back past the last checkpoint";
  EXPECT_EQ(Segment(after, 0).value("state", ""), "frozen");
  EXPECT_EQ(Segment(after, 0)["checksum"].dump(), checksum) << "a frozen segment changed across kill -9";
  EXPECT_EQ(Segment(after, 1).value("state", ""), "training");
  EXPECT_EQ(U(after, "spoolDocuments"), documents);
  json report = peerd.CtlJson("eval report");
  EXPECT_EQ(report["rows"].size(), 2u) << "both evaluations ('after kjv', 'scratch') survive";

  // Everything acknowledged gets trained: the backlog drains to less than one window, which
  // peerctl wait trained waits for. PEERD_ADMIN and PEERD_TOKEN_FILE stand for the flags.
  ShellResult trained = Sh("PEERD_ADMIN=127.0.0.1:" + peerd.admin_port() + " PEERD_TOKEN_FILE=" + peerd.data_dir() +
                           "/admin.token " + PEERCTL_BIN + " wait trained --timeout 120");
  ASSERT_EQ(trained.code, 0) << trained.out;
  EXPECT_NE(trained.out.find("trained: backlog"), std::string::npos) << trained.out;
  EXPECT_LT(U(peerd.CtlJson("status"), "spoolBacklogBytes"), 65u);
  ShellResult again = peerd.Ingest("kjv", dir + "/kjv.txt");
  EXPECT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find(std::to_string(documents) + " skipped"), std::string::npos) << again.out;

  EXPECT_EQ(peerd.Kill(SIGTERM), 0);
  EXPECT_NE(Slurp(dir + "/peerd.log").find("checkpoint written at step"), std::string::npos);
}

// Routing isolation as peerd runs it (train.routed, docs/DESIGN.md §4b) with no trained text kept:
// a base domain, then a branch for a second domain. The base's held-out score survives the second
// domain, the spool holds (almost) no trained text while still recognising resent documents, and
// after kill -9 the restored adapters and router give bit-identical scores.
TEST(Service, RoutedPolicyKeepsNoTrainedTextAndRestoresItsBranchesAcrossKill) {
  const std::string dir = ::testing::TempDir() + "/peerd_routed_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({"model": {"dModel": 64, "context": 64}, "train": {"batchSize": 8,
      "routed": true, "replayRatio": 0, "distillWeight": 0, "keepTrainedText": false}})";
  {
    const std::string text = KjvChapters(60'000);
    ASSERT_FALSE(text.empty()) << "run scripts/corpora.sh kjv";
    std::ofstream(dir + "/verse.txt") << text.substr(0, text.size() - 6'000);
    std::ofstream(dir + "/verse-heldout.txt") << text.substr(text.size() - 6'000);
    std::string code;
    for (const char* f : {"core/model.cc", "core/peer_layer.cc", "core/trainer.cc", "service/net/spool.cc",
                          "service/training_loop.cc", "service/admin_server.cc", "service/checkpoint.cc"})
      code += Slurp(std::string(PEERD_SOURCE_DIR) + "/" + f) + "\n\n";
    ASSERT_GT(code.size(), 50'000u);
    std::ofstream(dir + "/code.txt") << code.substr(0, code.size() - 6'000);
    std::ofstream(dir + "/code-heldout.txt") << code.substr(code.size() - 6'000);
  }
  PeerdProcess peerd(dir);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  json policy = peerd.CtlJson("policy get");
  EXPECT_EQ(policy.value("routed", false), true) << policy.dump();
  EXPECT_EQ(policy.value("keepTrainedText", true), false) << policy.dump();
  ShellResult replay = peerd.Ctl("policy set replayRatio=0.25");
  EXPECT_NE(replay.code, 0) << "keeping no text, there is nothing to replay";
  EXPECT_NE(replay.out.find("replayRatio to 0"), std::string::npos) << replay.out;
  ASSERT_EQ(peerd.Ctl("tasks add verse " + dir + "/verse-heldout.txt").code, 0);
  // A held-out task named apart from the ingest task it measures: the report's phases come from the
  // spool's record of what trained, not from names or labels.
  ASSERT_EQ(peerd.Ctl("tasks add code-heldout " + dir + "/code-heldout.txt --measures code").code, 0);
  auto trained = [](const json& st) { return U(st, "spoolBytes") > 0 && U(st, "spoolBacklogBytes") < 65; };

  // The base phase: everything trains on the first domain; no branch yet.
  ShellResult verse = peerd.Ingest("verse", dir + "/verse.txt");
  ASSERT_EQ(verse.code, 0) << verse.out;
  peerd.WaitFor(trained, 300s);  // slow under load: routed evaluation scores each task once per candidate
  ASSERT_EQ(peerd.Ctl("segments freeze 0").code, 0);
  json base = peerd.CtlJson("eval run --label 'after verse'");
  EXPECT_FALSE(peerd.CtlJson("status").contains("routing")) << "routing starts with the first added segment";

  // A branch for the second domain: only it trains; the policy cannot go back to shared training.
  json added = peerd.CtlJson("segments add");
  ASSERT_EQ(added["ids"].size(), 1u);
  const int branch = added["ids"][0];
  json routing = peerd.CtlJson("status")["routing"];
  EXPECT_EQ(routing["baseSegments"], json::array({0})) << routing.dump();
  EXPECT_EQ(routing.value("trainingBranch", json()).dump(), "\"" + std::to_string(branch) + "\"") << routing.dump();
  EXPECT_EQ(peerd.CtlJson("policy get")["trainGroups"], json::array({"new-segment"}));
  ShellResult off = peerd.Ctl("policy set routed=false");
  EXPECT_NE(off.code, 0);
  EXPECT_NE(off.out.find("routed stays on"), std::string::npos) << off.out;
  ShellResult second = peerd.Ctl("segments add");
  EXPECT_NE(second.code, 0) << "a branch is open";
  EXPECT_NE(second.out.find("freeze it first"), std::string::npos) << second.out;
  EXPECT_EQ(peerd.Ctl("policy set trainGroups=new-segment").code, 0) << "what GET shows may be PUT back";
  ShellResult code = peerd.Ingest("code", dir + "/code.txt");
  ASSERT_EQ(code.code, 0) << code.out;
  peerd.WaitFor(trained, 300s);  // slow under load: routed evaluation scores each task once per candidate
  ShellResult one_layer = peerd.Ctl("segments freeze " + std::to_string(branch) + " --layer 0");
  EXPECT_NE(one_layer.code, 0) << "a branch freezes whole";
  EXPECT_NE(one_layer.out.find("omit the layer"), std::string::npos) << one_layer.out;
  ASSERT_EQ(peerd.Ctl("segments freeze " + std::to_string(branch)).code, 0);
  json after = peerd.CtlJson("eval run --label 'after code'");
  auto score = [](const json& row, const std::string& task) {
    for (size_t i = 0; i < row["tasks"].size(); ++i)
      if (row["tasks"][i] == task) return row["bitsPerByte"][i].get<double>();
    ADD_FAILURE() << "no task " << task << " in " << row.dump();
    return 0.0;
  };
  const double verse_before = score(base, "verse"), verse_after = score(after, "verse");
  const double code_before = score(base, "code-heldout"), code_after = score(after, "code-heldout");
  EXPECT_LT(std::abs(verse_after - verse_before), 0.02)
      << "the base domain drifted: " << verse_before << " -> " << verse_after;
  EXPECT_LT(code_after, code_before - 0.3) << "the branch did not learn its domain";

  // No trained text is kept: what the checkpoint covers is pruned, ids stay for deduplication.
  json st = peerd.WaitFor([](const json& s) { return U(s, "spoolKeptBytes") * 20 < U(s, "spoolBytes"); }, 30s);
  EXPECT_GT(U(st, "spoolBytes"), 90'000u);
  ShellResult resent = Sh(peerd.IngestCommand("verse", dir + "/verse.txt", "--no-resume"));
  ASSERT_EQ(resent.code, 0) << resent.out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(verse.out, m, std::regex("([0-9]+) documents")));
  EXPECT_NE(resent.out.find(std::string(m[1]) + " already on the server"), std::string::npos) << resent.out;

  // kill -9: adapters, routes and the router come back as they were.
  peerd.Kill(SIGKILL);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  json again = peerd.CtlJson("eval run --label 'after restart'");
  EXPECT_EQ(score(again, "verse"), verse_after);
  EXPECT_EQ(score(again, "code-heldout"), code_after);
  json report = peerd.CtlJson("eval report");
  EXPECT_EQ(report["trainedSincePrevious"], json::array({"verse", "code", ""})) << report.dump();
  // code-heldout measures `code`: its phase is code's, and goes on through the restart's row (the
  // same model: nothing trained since), so the last domain has nothing to forget yet.
  EXPECT_EQ(report["trainedAt"].value("code-heldout", -2), 2) << report.dump();
  EXPECT_EQ(report["trainedAt"].value("verse", -2), 0) << report.dump();
  EXPECT_TRUE(report["forgetting"].contains("verse")) << report.dump();
  EXPECT_FALSE(report["forgetting"].contains("code-heldout")) << report.dump();
  json restored = peerd.CtlJson("status");
  // The training history outlived the kill: every step to the restored checkpoint, once each.
  json history = peerd.CtlJson("history --limit 10000");
  uint64_t next_step = 1;
  for (const auto& p : history["steps"]) {
    ASSERT_EQ(U(p, "step"), next_step) << p.dump();
    next_step += p.value("steps", 0);
    EXPECT_GT(p.value("loss", 0.0), 0) << p.dump();
    EXPECT_GT(p.value("tokensPerSecond", 0.0), 0) << p.dump();
  }
  EXPECT_GE(next_step, U(restored, "lastCheckpointStep") + 1) << history.dump().substr(0, 2000);
  EXPECT_GT(U(restored, "lastCheckpointStep"), 10u);
  EXPECT_EQ(history["evals"].size(), 3u);
  ShellResult bad_limit = peerd.Ctl("history --limit 0");
  EXPECT_EQ(bad_limit.code, 2) << "a usage error";
  EXPECT_NE(bad_limit.out.find("--limit: Value 0 not in range 1 to 10000"), std::string::npos) << bad_limit.out;
  EXPECT_EQ(restored["routing"]["baseSegments"], json::array({0})) << restored.dump();
  EXPECT_EQ(restored["routing"].value("trainingBranch", json()).dump(), "\"-1\"") << "the branch was frozen";
  EXPECT_NE(restored.value("state", "").find("waiting for a segment"), std::string::npos) << restored.dump();
  // The routed model exported: its adapters and router go with it, and PyTorch scores as peerd
  // does, each window under the branch the model chooses among the candidates (the default).
  ShellResult exported = peerd.Ctl("export " + dir + "/export");
  ASSERT_EQ(exported.code, 0) << exported.out;
  for (const char* text : {"/verse-heldout.txt", "/code-heldout.txt"})
    ExpectTheExportScoresAsPeerd(peerd, dir + "/export", dir + text);
  // ... and a new data directory imported from it routes and scores the same.
  fs::create_directories(dir + "/imported");
  PeerdProcess imported(dir + "/imported");
  ASSERT_NO_FATAL_FAILURE(imported.Start("--import " + dir + "/export"));
  EXPECT_EQ(imported.CtlJson("status")["routing"]["branches"], restored["routing"]["branches"]);
  for (const char* text : {"/verse-heldout.txt", "/code-heldout.txt"}) {
    const json a = peerd.CtlJson(std::string("score --log-probs < ") + dir + text);
    const json b = imported.CtlJson(std::string("score --log-probs < ") + dir + text);
    EXPECT_NEAR(a.value("bitsPerByte", 0.0), b.value("bitsPerByte", 1.0), 1e-6) << text;
  }
  EXPECT_EQ(imported.Kill(SIGTERM), 0);
  // Windows routed by the bigram router alone (the model chose among every branch above): the
  // policy changes it, a checked bound refuses too many, and the export routes as peerd does again.
  ShellResult too_many = peerd.Ctl("policy set routeCandidates=65");
  EXPECT_NE(too_many.code, 0);
  EXPECT_NE(too_many.out.find("train.routeCandidates"), std::string::npos) << too_many.out;
  EXPECT_EQ(peerd.CtlJson("policy get").value("routeCandidates", -1), 4) << "the default";
  ASSERT_EQ(peerd.Ctl("policy set routeCandidates=0").code, 0);
  EXPECT_EQ(peerd.CtlJson("policy get").value("routeCandidates", -1), 0);
  ASSERT_EQ(peerd.Ctl("export " + dir + "/export-bigram").code, 0);
  for (const char* text : {"/verse-heldout.txt", "/code-heldout.txt"})
    ExpectTheExportScoresAsPeerd(peerd, dir + "/export-bigram", dir + text);
  EXPECT_EQ(peerd.Kill(SIGTERM), 0);
  fs::remove_all(dir);
}

// The main job (scripts/demo.sh, what `make demo` runs) on two tiny domains and a tiny model:
// real peerd, peer-ingest and peerctl; the report files must be complete and parse.
// Operator mistakes on the command line are refused before anything is created, and the startup
// log names the addresses peerd really bound: "[::1]" and "localhost" listen on loopback, and
// peerctl reaches the admin API at the address the log gives. peer-ingest sent to the admin API
// instead of the data port fails within seconds, saying so.
TEST(Peerd, RefusesUnknownFlagValuesAndLogsTheAddressesReallyBound) {
  const std::string dir = ::testing::TempDir() + "/peerd_flags_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& [flag, value] :
       {std::pair{"--log-level", "verbose"}, std::pair{"--residency", "disk"}, std::pair{"--freeze-dtype", "fp16"}}) {
    ShellResult r = Sh("timeout 60 " + std::string(PEERD_BIN) + " --data-dir " + dir + "/data " + flag + " " + value);
    EXPECT_NE(r.code, 0) << flag << " " << value << ": " << r.out;
    EXPECT_NE(r.out.find(flag), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(value), std::string::npos) << r.out;
    EXPECT_FALSE(fs::exists(dir + "/data")) << flag << " " << value << " created the data directory";
  }

  const std::string log = dir + "/peerd.log";
  pid_t pid = fork();
  if (pid == 0) {
    const std::string cmd = "exec " + std::string(PEERD_BIN) + " --data-dir " + dir +
                            "/data --data-listen '[::1]:0' --admin-listen localhost:0 > " + log + " 2>&1";
    execl("/bin/sh", "sh", "-c", cmd.c_str(), nullptr);
    _exit(127);
  }
  const std::regex bound(R"(data port \[::1\]:([0-9]+) .*admin API 127\.0\.0\.1:([0-9]+))");
  std::smatch m;
  std::string text;
  for (auto deadline = std::chrono::steady_clock::now() + 60s;
       std::chrono::steady_clock::now() < deadline && !std::regex_search(text, m, bound);) {
    std::this_thread::sleep_for(100ms);
    text = Slurp(log);
  }
  const bool started = std::regex_search(text, m, bound);
  if (started) {
    EXPECT_NE(m[1], "0");
    ShellResult status = Sh(std::string(PEERCTL_BIN) + " --admin localhost:" + std::string(m[2]) + " --token-file " +
                            dir + "/data/admin.token status");
    EXPECT_EQ(status.code, 0) << status.out;
    // peer-ingest pointed at the admin API by mistake says so instead of hanging.
    { std::ofstream(dir + "/doc.txt") << "one document\n"; }
    const auto start = std::chrono::steady_clock::now();
    ShellResult wrong =
        Sh("timeout 60 " + std::string(PEER_INGEST_BIN) + " --no-resume --server localhost:" + std::string(m[2]) +
           " --token-file " + dir + "/data/data.token --task t " + dir + "/doc.txt");
    EXPECT_NE(wrong.code, 0) << wrong.out;
    EXPECT_NE(wrong.out.find("is it peerd's data port"), std::string::npos) << wrong.out;
    EXPECT_LT(std::chrono::steady_clock::now() - start, 15s) << wrong.out;
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  ASSERT_TRUE(started) << "peerd did not log the addresses it bound within 60 s: " << text;
}

// The data directory records the configuration it was created with: a start without --config
// builds that model, and a --config describing another model is refused, naming the fields.
TEST(Peerd, TheDataDirectoryKeepsItsModelAndRefusesAnotherNamingTheFields) {
  const std::string dir = ::testing::TempDir() + "/peerd_config_record_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({"model": {"dModel": 48, "context": 32}, "train": {"batchSize": 4}})";
  uint64_t parameters = 0;
  {
    PeerdProcess peerd(dir);
    ASSERT_NO_FATAL_FAILURE(peerd.Start());
    parameters = U(peerd.CtlJson("status"), "totalParameters");
    EXPECT_EQ(peerd.Kill(SIGTERM), 0);
  }
  ASSERT_GT(parameters, 0u);
  // Without --config: the recorded model, not the embedded default (another size).
  fs::remove(dir + "/config.json");
  {
    PeerdProcess peerd(dir);
    ASSERT_NO_FATAL_FAILURE(peerd.Start());
    EXPECT_EQ(U(peerd.CtlJson("status"), "totalParameters"), parameters);
    EXPECT_EQ(peerd.Kill(SIGTERM), 0);
  }
  // Another model: refused before anything is built, saying which fields differ and what to do.
  std::ofstream(dir + "/other.json") << R"({"model": {"dModel": 64, "context": 32}})";
  ShellResult other = Sh("timeout 60 " + std::string(PEERD_BIN) + " --data-dir " + dir + "/data --config " + dir +
                         "/other.json --data-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0");
  EXPECT_NE(other.code, 0) << other.out;
  EXPECT_NE(other.out.find("d_model"), std::string::npos) << other.out;
  EXPECT_NE(other.out.find("48"), std::string::npos) << other.out;
  EXPECT_NE(other.out.find("start without --config"), std::string::npos) << other.out;
  // The same model with other training settings is taken.
  std::ofstream(dir + "/config.json") << R"({"model": {"dModel": 48, "context": 32}, "train": {"batchSize": 8}})";
  PeerdProcess peerd(dir);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  EXPECT_EQ(U(peerd.CtlJson("status"), "totalParameters"), parameters);
}

TEST(Demo, TwoTinyDomainsThroughRealPeerdGiveACompleteMatrixAndReportFilesThatParse) {
  const std::string dir = ::testing::TempDir() + "/peerd_demo_" + std::to_string(getpid());
  fs::remove_all(dir);
  // Domain "verse": KJV chapters; domain "code": this repository's own C++ sources.
  for (const char* d : {"verse", "code"}) fs::create_directories(dir + "/corpus/" + d);
  {
    std::ifstream kjv(std::string(PEERD_CORPUS_DIR) + "/kjv/train.txt");
    ASSERT_TRUE(kjv) << "run scripts/corpora.sh kjv";
    std::string text(40'000, '\0');
    kjv.read(text.data(), text.size());
    std::ofstream(dir + "/corpus/verse/train.txt") << text.substr(0, 36'000);
    std::ofstream(dir + "/corpus/verse/heldout.txt") << text.substr(36'000);
    std::string code;
    for (const char* f : {"core/model.cc", "core/peer_layer.cc", "core/trainer.cc", "service/net/spool.cc",
                          "service/training_loop.cc", "service/admin_server.cc"})
      code += Slurp(std::string(PEERD_SOURCE_DIR) + "/" + f) + "\n\n";
    ASSERT_GT(code.size(), 30'000u);
    std::ofstream(dir + "/corpus/code/train.txt") << code.substr(0, code.size() - 4'000);
    std::ofstream(dir + "/corpus/code/heldout.txt") << code.substr(code.size() - 4'000);
  }
  std::ofstream(dir + "/config.json") << peerd::testing::kTinyConfigJson;
  const int port = 20000 + 2 * (getpid() % 10000);
  const std::string env = "BUILD=" + std::string(PEERD_BUILD_DIR) + " DEMO_OUT=" + dir + "/out DEMO_CORPUS=" + dir +
                          "/corpus DEMO_DOMAINS='verse code' DEMO_CONFIG=" + dir +
                          "/config.json DEMO_PORT=" + std::to_string(port) +
                          " DEMO_SLICE_KB=30 DEMO_HELDOUT_KB=4 DEMO_EVAL_EVERY=2";
  ShellResult demo = Sh(env + " bash " + std::string(PEERD_SOURCE_DIR) + "/scripts/demo.sh");
  ASSERT_EQ(demo.code, 0) << demo.out;
  EXPECT_NE(demo.out.find("ACC"), std::string::npos) << demo.out;
  // The demo's policy is routed with no trained text kept: the spool ends holding (almost) none.
  std::smatch kept;
  ASSERT_TRUE(std::regex_search(demo.out, kept, std::regex("received ([0-9]+) text bytes and keeps ([0-9]+)")))
      << demo.out;
  EXPECT_GT(std::stoull(kept[1]), 50'000u);
  EXPECT_LT(std::stoull(kept[2]) * 20, std::stoull(kept[1])) << demo.out;

  json report = json::parse(Slurp(dir + "/out/report.json"));
  std::vector<std::string> phases;
  for (const auto& row : report["rows"]) {
    ASSERT_EQ(row["tasks"].size(), 2u) << row.dump();
    ASSERT_EQ(row["bitsPerByte"].size(), 2u) << row.dump();
    for (const auto& b : row["bitsPerByte"]) EXPECT_TRUE(b.get<double>() > 0 && b.get<double>() < 9) << row.dump();
    const std::string label = row["label"];
    if (label == "init" || label.rfind("after ", 0) == 0) phases.push_back(label);
  }
  EXPECT_EQ(phases, (std::vector<std::string>{"init", "after verse", "after code"}));
  EXPECT_TRUE(report.contains("acc")) << report.dump();
  ASSERT_TRUE(report.contains("forgetting")) << report.dump();
  EXPECT_TRUE(report["forgetting"].contains("verse"));
  EXPECT_FALSE(report["forgetting"].contains("code")) << "the last domain has nothing to forget yet";
  // Both held-out tasks were learnt from the untrained model's ~8 bits per byte.
  const auto& first = report["rows"][0]["bitsPerByte"];
  const auto& last = report["rows"][report["rows"].size() - 1]["bitsPerByte"];
  for (int j = 0; j < 2; ++j) EXPECT_LT(last[j].get<double>(), first[j].get<double>() - 0.5);

  const std::string md = Slurp(dir + "/out/report.md");
  EXPECT_NE(md.find("| after verse"), std::string::npos) << md;
  EXPECT_NE(md.find("| after code"), std::string::npos) << md;
  for (const char* picture : {"heatmap", "curves"}) {
    const std::string png = Slurp(dir + "/out/" + picture + ".png");
    EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << picture;
    EXPECT_GT(png.size(), 10'000u) << picture;
  }
  ShellResult svg =
      Sh("python3 -c 'import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); "
         "assert r.tag.endswith(\"svg\"), r.tag; print(len(list(r.iter())))' " +
         dir + "/out/curves.svg");
  EXPECT_EQ(svg.code, 0) << svg.out;
  EXPECT_GT(std::stoi(svg.out), 50) << "a plot with lines, axes and labels";
  EXPECT_GT(Slurp(dir + "/out/dashboard.png").size(), 20'000u) << demo.out;
  fs::remove_all(dir);
}

}  // namespace

namespace generation {

// Lines of `out` that parse as JSON objects.
std::vector<json> JsonLines(const std::string& out) {
  std::vector<json> lines;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    json j = json::parse(line, nullptr, false);
    if (j.is_object()) lines.push_back(j);
  }
  return lines;
}

// A client that asks for a long streamed generation, reads the first bytes of the answer, and
// hangs up.
void HangUpMidStream(const PeerdProcess& peerd) {
  const std::string token = Slurp(peerd.data_dir() + "/admin.token");
  const std::string body = R"({"prompt": "In the beginning", "maxTokens": 4096, "stream": true})";
  const std::string request =
      "POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token.substr(0, token.find('\n')) +
      "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(peerd.admin_port())));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  timeval limit{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  std::string got;
  char buf[512];
  while (got.find("data: ") == std::string::npos) {
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    ASSERT_GT(n, 0) << "no event within 10 s; got: " << got;
    got.append(buf, n);
  }
  EXPECT_NE(got.find("text/event-stream"), std::string::npos) << got;
  close(fd);
}

}  // namespace generation

// The live page: its shell and script are served without the token and hold no data; signing in
// with the token in a form sets an HttpOnly, SameSite=Strict cookie that reads (GET) and does not
// write; headless Chromium signed in that way draws the loss curve, the per-task curves, the
// heatmap and the segments from a running peerd with no script error, and a screenshot is written.
TEST(Dashboard, SignsInWithACookieAndDrawsEveryChartInHeadlessChromium) {
  const std::string dir = ::testing::TempDir() + "/peerd_dashboard_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << peerd::testing::kTinyConfigJson;
  {
    const std::string text = KjvChapters(30'000);
    ASSERT_FALSE(text.empty()) << "run scripts/corpora.sh kjv";
    std::ofstream(dir + "/kjv.txt") << text.substr(0, text.size() - 3'000);
    std::ofstream(dir + "/heldout.txt") << text.substr(text.size() - 3'000);
  }
  PeerdProcess peerd(dir);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  ASSERT_EQ(peerd.Ctl("tasks add kjv " + dir + "/heldout.txt").code, 0);
  ASSERT_EQ(peerd.Ctl("eval run --label before").code, 0);
  ASSERT_EQ(peerd.Ingest("kjv", dir + "/kjv.txt").code, 0);
  ASSERT_EQ(peerd.Ctl("wait trained --timeout 120").code, 0);
  ASSERT_EQ(peerd.Ctl("eval run --label after").code, 0);
  const std::string admin = "127.0.0.1:" + peerd.admin_port(), token_file = peerd.data_dir() + "/admin.token";

  // HTTP as a browser speaks it (python's http.client: no redirects followed, no cookie jar).
  const std::string script = R"PY(
import http.client, json, sys
host, token = sys.argv[1], open(sys.argv[2]).read().strip()
def ask(method, path, body=None, headers={}):
    c = http.client.HTTPConnection(host, timeout=30)
    c.request(method, path, body, headers)
    r = c.getresponse()
    return {"status": r.status, "body": r.read().decode(errors="replace")[:20000],
            "location": r.getheader("Location", ""), "cookie": r.getheader("Set-Cookie", ""),
            "csp": r.getheader("Content-Security-Policy", "")}
form = {"Content-Type": "application/x-www-form-urlencoded"}
out = {"page": ask("GET", "/"), "script": ask("GET", "/dashboard.js"),
       "wrong_cookie": ask("GET", "/v1/status", headers={"Cookie": "peerd_session=0123"}),
       "wrong_login": ask("POST", "/login", "token=nope", form),
       "login": ask("POST", "/login", "token=" + token, form)}
cookie = out["login"]["cookie"].split(";")[0]
out["read_with_cookie"] = ask("GET", "/v1/status", headers={"Cookie": cookie})
out["write_with_cookie"] = ask("POST", "/v1/checkpoint", headers={"Cookie": cookie})
out["logout"] = ask("POST", "/logout", headers={"Cookie": cookie})
print(json.dumps(out))
)PY";
  std::ofstream(dir + "/browser.py") << script;
  ShellResult http = Sh("/usr/bin/python3 " + dir + "/browser.py " + admin + " " + token_file);
  ASSERT_EQ(http.code, 0) << http.out;
  const json h = json::parse(http.out, nullptr, false);
  ASSERT_TRUE(h.is_object()) << http.out;
  EXPECT_EQ(h["page"]["status"], 200);
  EXPECT_NE(h["page"]["body"].get<std::string>().find("<script src=\"/dashboard.js\">"), std::string::npos);
  EXPECT_EQ(h["page"]["body"].get<std::string>().find("kjv"), std::string::npos) << "the shell holds no data";
  EXPECT_NE(h["page"]["csp"].get<std::string>().find("default-src 'self'"), std::string::npos);
  EXPECT_EQ(h["script"]["status"], 200);
  EXPECT_EQ(h["wrong_cookie"]["status"], 401);
  EXPECT_EQ(h["wrong_login"]["status"], 303);
  EXPECT_EQ(h["wrong_login"]["location"], "/?login=failed");
  EXPECT_EQ(h["login"]["status"], 303);
  EXPECT_EQ(h["login"]["location"], "/");
  const std::string cookie = h["login"]["cookie"];
  for (const char* attribute : {"peerd_session=", "HttpOnly", "SameSite=Strict"})
    EXPECT_NE(cookie.find(attribute), std::string::npos) << cookie;
  EXPECT_EQ(cookie.find(Slurp(token_file).substr(0, 16)), std::string::npos) << "the cookie is not the token";
  EXPECT_EQ(h["read_with_cookie"]["status"], 200);
  EXPECT_EQ(h["write_with_cookie"]["status"], 401) << "the cookie only reads";
  EXPECT_NE(h["logout"]["cookie"].get<std::string>().find("Max-Age=0"), std::string::npos);

  // Headless Chromium, signed in through the form: every chart drew, no script error.
  const std::string tool = std::string(PEERD_SOURCE_DIR) + "/scripts/dashboard.sh";
  ShellResult dom = Sh("bash " + tool + " dom " + admin + " " + token_file);
  ASSERT_EQ(dom.code, 0) << dom.out.substr(0, 3000);
  std::smatch drawn, errors;
  ASSERT_TRUE(std::regex_search(dom.out, drawn, std::regex("data-drawn=\"([^\"]*)\""))) << dom.out.substr(0, 3000);
  std::string drawn_json = drawn[1];
  for (size_t at; (at = drawn_json.find("&quot;")) != std::string::npos;) drawn_json.replace(at, 6, "\"");
  const json d = json::parse(drawn_json, nullptr, false);
  ASSERT_TRUE(d.is_object()) << "the page did not draw: " << drawn_json;
  EXPECT_GT(d.value("lossPoints", 0), 5) << drawn_json;
  EXPECT_EQ(d.value("taskPoints", 0), 2) << "one held-out task, two evaluations: " << drawn_json;
  EXPECT_EQ(d.value("cells", 0), 2) << drawn_json;
  EXPECT_GE(d.value("segments", 0), 1) << drawn_json;
  ASSERT_TRUE(std::regex_search(dom.out, errors, std::regex("data-errors=\"([0-9]+)\"")));
  EXPECT_EQ(errors[1], "0") << dom.out.substr(0, 5000);
  EXPECT_NE(dom.out.find("<path d=\"M"), std::string::npos) << "curves are SVG paths";

  ShellResult shot = Sh("bash " + tool + " screenshot " + admin + " " + token_file + " " + dir + "/dashboard.png");
  ASSERT_EQ(shot.code, 0) << shot.out;
  const std::string png = Slurp(dir + "/dashboard.png");
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_GT(png.size(), 20'000u) << "a page with charts, not a blank one";

  // An evaluation in progress shows on /v1/status (peerctl eval run prints it on stderr).
  const std::string big = KjvChapters(70'000).substr(0, 60'000);
  std::ofstream(dir + "/big.txt") << big;
  constexpr int kTasks = 24;
  for (int i = 0; i < kTasks; ++i)
    ASSERT_EQ(peerd.Ctl("tasks add big" + std::to_string(i) + " " + dir + "/big.txt").code, 0);
  const std::string done_file = dir + "/eval.done";
  ASSERT_EQ(Sh("(" + std::string(PEERCTL_BIN) + " --admin " + admin + " --token-file " + token_file +
               " eval run --label progress > " + dir + "/eval.out 2>&1; touch " + done_file + ") > /dev/null 2>&1 &")
                .code,
            0);
  json progress;
  for (auto until = std::chrono::steady_clock::now() + 60s;
       std::chrono::steady_clock::now() < until && !fs::exists(done_file);) {
    const json st = peerd.CtlJson("status");
    if (st.contains("evaluation")) {
      progress = st["evaluation"];
      break;
    }
  }
  ASSERT_TRUE(progress.is_object()) << "no evaluation seen in progress";
  EXPECT_EQ(progress.value("tasks", 0), kTasks + 1) << progress.dump();
  EXPECT_LT(progress.value("tasksDone", kTasks + 1), kTasks + 1) << progress.dump();
  EXPECT_EQ(U(progress, "bytes"), uint64_t(kTasks) * big.size() + 3'000u) << progress.dump();
  // The whole test takes ~20 s on an idle 2-core machine; with two CPU-bound processes beside it
  // this evaluation alone took over 120 s (its threads wait for cores), so the bound is generous.
  for (auto until = std::chrono::steady_clock::now() + 300s;
       std::chrono::steady_clock::now() < until && !fs::exists(done_file);)
    std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(fs::exists(done_file)) << "the evaluation did not finish in 300 s";
  EXPECT_FALSE(peerd.CtlJson("status").contains("evaluation")) << "cleared once done";
  EXPECT_EQ(peerd.Kill(SIGTERM), 0);
  fs::remove_all(dir);
}

TEST(Service, GenerationAnswersWhileTrainingIsReproducibleStreamsAndSurvivesAClientLeaving) {
  const std::string dir = ::testing::TempDir() + "/peerd_generate_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({"model": {"dModel": 64, "context": 64}, "train": {"batchSize": 8}})";
  {
    const std::string text = KjvChapters(200'000);
    ASSERT_FALSE(text.empty()) << "run scripts/corpora.sh kjv";
    std::ofstream(dir + "/kjv.txt") << text;
  }
  PeerdProcess peerd(dir);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  ASSERT_EQ(peerd.Ingest("kjv", dir + "/kjv.txt").code, 0);

  // While training runs: an answer from a snapshot of the model, and training goes on.
  const json before = peerd.WaitFor([](const json& s) { return U(s, "step") > 0; });
  json sampled = peerd.CtlJson("generate 'In the beginning' --seed 5 --max-tokens 60");
  ASSERT_TRUE(sampled.contains("tokens")) << sampled.dump();
  EXPECT_LE(sampled["tokens"].size(), 60u);
  EXPECT_EQ(U(sampled, "seed"), 5u);
  EXPECT_GE(U(sampled, "step"), U(before, "step"));
  const std::string reason = sampled.value("finishReason", "");
  EXPECT_TRUE(reason == "length" || reason == "end_of_document") << reason;
  peerd.WaitFor([&](const json& s) { return U(s, "step") > U(sampled, "step"); });  // training was not stopped

  // One model (paused): greedy and a seed reproduce; the stream carries the same text in pieces.
  ASSERT_EQ(peerd.Ctl("pause").code, 0);
  const std::string greedy = "generate 'And God said' --temperature 0 --max-tokens 50";
  json g1 = peerd.CtlJson(greedy), g2 = peerd.CtlJson(greedy);
  EXPECT_EQ(g1["tokens"], g2["tokens"]);
  EXPECT_EQ(g1["text"], g2["text"]);
  const std::string seeded =
      "generate 'And God said' --temperature 1 --top-k 40 --top-p 0.95 --seed 11 --max-tokens 50";
  json s1 = peerd.CtlJson(seeded);
  EXPECT_EQ(s1["tokens"], peerd.CtlJson(seeded)["tokens"]);
  ShellResult streamed = peerd.Ctl("--json " + seeded + " --stream");
  ASSERT_EQ(streamed.code, 0) << streamed.out;
  std::vector<json> events = generation::JsonLines(streamed.out);
  ASSERT_GE(events.size(), 2u) << streamed.out;
  std::string pieces;
  for (size_t i = 0; i + 1 < events.size(); ++i) pieces += events[i].value("text", "");
  EXPECT_EQ(pieces, s1.value("text", "")) << streamed.out;
  EXPECT_EQ(events.back()["tokens"], s1["tokens"]);
  EXPECT_EQ(events.back().value("finishReason", ""), s1.value("finishReason", ""));
  // A stop string ends the text short of it.
  const std::string text = g1.value("text", "");
  if (text.size() >= 20) {
    const std::string stop = text.substr(12, 3);
    json stopped = peerd.CtlJson(greedy + " --stop '" + stop + "'");
    EXPECT_EQ(stopped.value("finishReason", ""), "stop") << stopped.dump();
    EXPECT_EQ(stopped.value("text", ""), text.substr(0, text.find(stop)));
  }

  // Bad requests are refused saying what to change.
  for (const auto& [args, says] : std::vector<std::pair<std::string, std::string>>{
           {"generate ''", "prompt must be 1 to 65536 bytes"},
           {"generate x --max-tokens 0", "maxTokens must be 1 to 4096"},
           {"generate x --max-tokens 5000", "maxTokens must be 1 to 4096"},
           {"generate x --temperature -1", "temperature must be in [0, 100]"},
           {"generate x --top-p 0", "topP must be in (0, 1]"},
           {"generate x --top-p 1.5", "topP must be in (0, 1]"}}) {
    ShellResult r = peerd.Ctl(args);
    EXPECT_EQ(r.code, 1) << args << ": " << r.out;
    EXPECT_NE(r.out.find("400: " + says), std::string::npos) << args << ": " << r.out;
  }

  // A client that leaves mid-stream stops its generation; peerd answers and trains on.
  ASSERT_NO_FATAL_FAILURE(generation::HangUpMidStream(peerd));
  ASSERT_EQ(peerd.Ctl("resume").code, 0);
  const uint64_t step = U(peerd.CtlJson("status"), "step");
  peerd.WaitFor([&](const json& s) { return U(s, "step") > step; });
  EXPECT_EQ(peerd.Ctl("generate x --max-tokens 5").code, 0);
  EXPECT_TRUE(peerd::testing::FileShows(dir + "/peerd.log", "the client left before the end (the work stopped)"));
  peerd.Kill(SIGTERM);
}

TEST(Service, AnExportLoadsInPyTorchScoresAsPeerdDoesAndStartsANewDataDirectory) {
  const std::string dir = ::testing::TempDir() + "/peerd_export_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({"model": {"dModel": 64, "context": 64}, "train": {"batchSize": 8}})";
  const std::string held = KjvHeldOut(3'000);
  {
    const std::string text = KjvChapters(60'000);
    ASSERT_FALSE(text.empty() || held.empty()) << "run scripts/corpora.sh kjv";
    std::ofstream(dir + "/kjv.txt") << text;
    std::ofstream(dir + "/heldout.txt") << held;
    std::ofstream(dir + "/code.txt") << "int main(int argc, char** argv) {\n  return argc > 1 ? 0 : 1;\n}\n";
  }
  PeerdProcess peerd(dir);
  ASSERT_NO_FATAL_FAILURE(peerd.Start());
  ASSERT_EQ(peerd.Ingest("kjv", dir + "/kjv.txt").code, 0);
  peerd.WaitFor([](const json& s) { return U(s, "step") >= 20; });
  // A frozen segment in bf16 and a training one beside it: both kinds of rows are in the file.
  ASSERT_EQ(peerd.Ctl("segments freeze 0").code, 0);
  ASSERT_EQ(peerd.Ctl("segments add").code, 0);
  ASSERT_EQ(peerd.Ctl("pause").code, 0);  // the export and the scores below see one model
  ShellResult exported = peerd.Ctl("export " + dir + "/export");
  ASSERT_EQ(exported.code, 0) << exported.out;
  EXPECT_NE(exported.out.find("1 frozen segments"), std::string::npos) << exported.out;
  const json manifest = json::parse(Slurp(dir + "/export/config.json"), nullptr, false);
  ASSERT_TRUE(manifest.is_object());
  ASSERT_EQ(manifest["frozen"].size(), 1u);
  EXPECT_EQ(manifest["frozen"][0].value("dtype", ""), "ROW_DTYPE_BF16");
  EXPECT_EQ(manifest["frozen"][0]["checksum"], Segment(peerd.CtlJson("status"), 0)["checksum"]);

  for (const char* text : {"heldout.txt", "code.txt"})
    ExpectTheExportScoresAsPeerd(peerd, dir + "/export", dir + "/" + text);

  // peerd --import starts a new data directory from the export: the same model (its scores), the
  // frozen segment frozen again with the export's checksum, and it trains on.
  const std::string dir2 = dir + "/imported";
  fs::create_directories(dir2);
  PeerdProcess second(dir2);
  ASSERT_NO_FATAL_FAILURE(second.Start("--import " + dir + "/export"));
  ASSERT_EQ(second.Ctl("pause").code, 0);
  for (const char* text : {"heldout.txt", "code.txt"}) {
    const json a = peerd.CtlJson("score --log-probs < " + dir + "/" + text);
    const json b = second.CtlJson("score --log-probs < " + dir + "/" + text);
    ASSERT_EQ(a["logProbs"].size(), b["logProbs"].size());
    double worst = 0;
    for (size_t i = 0; i < a["logProbs"].size(); ++i)
      worst = std::max(worst, std::abs(a["logProbs"][i].get<double>() - b["logProbs"][i].get<double>()));
    EXPECT_LT(worst, 1e-6) << text << ": the imported model scores otherwise";
  }
  const json frozen = Segment(second.CtlJson("status"), 0);
  EXPECT_TRUE(frozen.value("frozen", false)) << frozen.dump();
  EXPECT_EQ(frozen["checksum"], manifest["frozen"][0]["checksum"]);
  EXPECT_EQ(Segment(second.CtlJson("status"), 1).value("frozen", true), false) << "the training segment came too";
  ASSERT_EQ(second.Ctl("resume").code, 0);
  ASSERT_EQ(second.Ingest("kjv", dir + "/kjv.txt").code, 0);
  second.WaitFor([](const json& s) { return U(s, "step") >= 5; });
  second.Kill(SIGTERM);
  // An import into a data directory that is not new is refused.
  ShellResult again = Sh(std::string(PEERD_BIN) + " --data-dir " + second.data_dir() + " --import " + dir + "/export");
  EXPECT_NE(again.code, 0);
  EXPECT_NE(again.out.find("is not empty: --import starts a new data directory"), std::string::npos) << again.out;
  peerd.Kill(SIGTERM);
}
