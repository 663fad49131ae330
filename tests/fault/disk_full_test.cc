// Disk full and a read-only data directory: the real peerd with its data directory on a
// small tmpfs. When the spool cannot write, peerd stops acknowledging (clients are told
// UNAVAILABLE and resend), says why on /v1/status and in its log, and acknowledges again by itself
// once space returns; nothing acknowledged before is lost and the store opens whole. A read-only
// data directory is refused at start; one that turns read-only while peerd runs (an ext4 image
// the kernel remounts read-only on an error, as on a failing disk) stops the acks the same way, and
// after a repair and a restart everything acknowledged and frozen is there. Needs root (mount,
// loop devices); skipped, saying so, without it.
#include <gtest/gtest.h>
#include <sys/mount.h>

#include <boost/asio.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "experts_store/data_dir_db.h"
#include "experts_store/expert_store.h"
#include "proto/frame.h"
#include "proto/wire.pb.h"
#include "service/net/spool.h"
#include "tests/fault/disk_state.h"
#include "tests/peerd_process.h"

namespace peerd {
namespace {

namespace fs = std::filesystem;
using testing::json;
using testing::PeerdProcess;
using namespace std::chrono_literals;

// GET `path` on the admin port without a token (the probes): "STATUS BODY".
std::string Probe(const std::string& port, const std::string& path) {
  namespace asio = boost::asio;
  asio::io_context io;
  asio::ip::tcp::socket socket(io);
  boost::system::error_code ec;
  socket.connect({asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(std::stoi(port))}, ec);
  if (ec) return "connect: " + ec.message();
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  asio::write(socket, asio::buffer(request), ec);
  std::string in;
  char buf[4096];
  for (size_t n; (n = socket.read_some(asio::buffer(buf), ec)) > 0 && !ec;) in.append(buf, n);
  const size_t body = in.find("\r\n\r\n");
  return in.substr(9, 3) + " " + (body == std::string::npos ? "" : in.substr(body + 4));
}

// Sends one document on a fresh stream; the server's answer to it (an Ack or an ErrorReply).
ServerFrame SendOne(const std::string& port, const std::string& token, const std::string& id, size_t bytes = 200) {
  namespace asio = boost::asio;
  asio::io_context io;
  asio::ip::tcp::socket socket(io);
  socket.connect({asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(std::stoi(port))});
  ClientFrame hello, doc;
  hello.mutable_hello()->set_protocol_version(wire::kProtocolVersion);
  hello.mutable_hello()->set_token(token);
  hello.mutable_hello()->set_task("disk");
  doc.mutable_document()->set_seq(1);
  doc.mutable_document()->set_id(id);
  doc.mutable_document()->set_text("text of " + id + std::string(bytes, '.'));
  asio::write(socket, asio::buffer(wire::EncodeFrame(hello) + wire::EncodeFrame(doc)));
  for (;;) {
    unsigned char h[4];
    asio::read(socket, asio::buffer(h));
    std::string body(wire::DecodeLength(h), '\0');
    asio::read(socket, asio::buffer(body));
    ServerFrame f;
    f.ParseFromString(body);
    if (!f.has_hello()) return f;
  }
}

// The ids the spool holds, in order, read with the spool's own code.
void SpooledIds(const std::shared_ptr<DataDirDb>& db, std::vector<std::string>* ids) {
  std::unique_ptr<Spool> spool;
  ASSERT_TRUE(Spool::Open(db, &spool).ok());
  std::vector<SpoolEntry> stored;
  ASSERT_TRUE(spool->Read(1, 1000, &stored).ok());
  for (const SpoolEntry& e : stored) ids->push_back(e.id);
}

// Fills the filesystem at `dir` until it is full.
void Fill(const std::string& dir) {
  std::ofstream ballast(dir + "/ballast", std::ios::binary);
  const std::string block(1 << 20, 'b');
  for (int i = 0; i < 4096 && ballast.write(block.data(), block.size()); ++i) ballast.flush();
}

// Sends until acknowledged (the server resumes on its next commit); the last answer.
ServerFrame SendUntilAcked(const std::string& port, const std::string& token, const std::string& id) {
  ServerFrame f;
  for (int i = 0; i < 300; ++i) {  // RocksDB clears its error once it sees 64 MB free again
    f = SendOne(port, token, id);
    if (f.has_ack()) break;
    std::this_thread::sleep_for(100ms);
  }
  return f;
}

// Mounts a small tmpfs at `path` for the test's lifetime; false (and the test skips) without root.
struct SmallTmpfs {
  std::string path;
  bool mounted = false;
  explicit SmallTmpfs(std::string p) : path(std::move(p)) {
    fs::create_directories(path);
    mounted = mount("tmpfs", path.c_str(), "tmpfs", 0, "size=160m") == 0;
  }
  ~SmallTmpfs() {
    if (mounted) umount2(path.c_str(), MNT_DETACH);
  }
};

TEST(DiskFull, PeerdStopsAckingSaysWhyAndResumesWhenSpaceReturns) {
  const std::string dir = ::testing::TempDir() + "/peerd_diskfull_" + std::to_string(getpid());
  fs::remove_all(dir);
  SmallTmpfs data(dir + "/data");
  if (!data.mounted) GTEST_SKIP() << "mounting a small tmpfs needs root: " << std::strerror(errno);
  std::ofstream(dir + "/config.json") << testing::kTinyConfigJson;
  PeerdProcess peerd(dir);
  ASSERT_NO_FATAL_FAILURE(peerd.Start("--checkpoint-every-seconds 1 --threads 1"));
  const std::string token = testing::Slurp(data.path + "/data.token").substr(0, 64);
  std::vector<std::string> acked;
  ServerFrame first = SendOne(peerd.data_port(), token, "before");
  ASSERT_TRUE(first.has_ack()) << first.DebugString();
  acked.push_back("before");

  // Disk full. RocksDB writes into space it reserved ahead, so documents are acked until that is
  // used up too; then the next is refused as UNAVAILABLE, and status and log say why.
  Fill(data.path);
  ServerFrame refused;
  for (int i = 0; i < 80 && !refused.has_error(); ++i) {
    const std::string id = "while-full-" + std::to_string(i);
    refused = SendOne(peerd.data_port(), token, id, 2 << 20);
    if (refused.has_ack()) acked.push_back(id);
  }
  ASSERT_TRUE(refused.has_error()) << "160 MB acknowledged on a full 160 MB filesystem?";
  EXPECT_EQ(refused.error().code(), ErrorReply::UNAVAILABLE);
  EXPECT_NE(refused.error().message().find("No space left"), std::string::npos) << refused.error().message();
  json full = peerd.CtlJson("status");
  EXPECT_NE(full.value("ingestError", "").find("No space left"), std::string::npos) << full.dump();
  EXPECT_TRUE(testing::FileShows(dir + "/peerd.log", "ingest stopped: documents are not being acknowledged"));
  EXPECT_EQ(Probe(peerd.admin_port(), "/readyz"), R"(503 {"status":"ingest stopped"})");
  EXPECT_EQ(Probe(peerd.admin_port(), "/healthz"), R"(200 {"status":"alive"})");

  // Space returns (RocksDB wants a write buffer's worth, 64 MB, free before it writes again):
  // acks resume by themselves, the status clears.
  fs::remove(data.path + "/ballast");
  ServerFrame resumed = SendUntilAcked(peerd.data_port(), token, "after-full");
  ASSERT_TRUE(resumed.has_ack()) << resumed.DebugString();
  acked.push_back("after-full");
  EXPECT_EQ(peerd.CtlJson("status").value("ingestError", "?"), "");
  EXPECT_TRUE(testing::FileShows(dir + "/peerd.log", "ingest resumed"));
  EXPECT_EQ(Probe(peerd.admin_port(), "/readyz"), R"(200 {"status":"ready"})");

  // Nothing acknowledged lost, nothing refused stored; the store opens whole.
  EXPECT_EQ(peerd.Kill(SIGTERM), 0) << testing::Slurp(dir + "/peerd.log");
  std::shared_ptr<DataDirDb> db;
  Status st = DataDirDb::Open(data.path, {}, &db);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::vector<std::string> ids;
  ASSERT_NO_FATAL_FAILURE(SpooledIds(db, &ids));
  EXPECT_EQ(ids, acked);
}

// A data directory peerd cannot write is refused at start, naming it, rather than run with
// nothing acknowledged.
TEST(DiskFull, PeerdRefusesToStartOnAReadOnlyDataDirectoryAndSaysSo) {
  const std::string dir = ::testing::TempDir() + "/peerd_readonly_" + std::to_string(getpid());
  fs::remove_all(dir);
  SmallTmpfs data(dir + "/data");
  if (!data.mounted) GTEST_SKIP() << "mounting a small tmpfs needs root: " << std::strerror(errno);
  std::ofstream(dir + "/config.json") << testing::kTinyConfigJson;
  {
    PeerdProcess first(dir);  // a store with a checkpoint in it
    ASSERT_NO_FATAL_FAILURE(first.Start("--threads 1"));
    ASSERT_EQ(first.Kill(SIGTERM), 0);
  }
  ASSERT_EQ(mount(nullptr, data.path.c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr), 0) << std::strerror(errno);
  testing::ShellResult r = testing::Sh(std::string(PEERD_BIN) + " --data-dir " + data.path + " --config " + dir +
                                       "/config.json --data-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find(data.path), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Read-only file system"), std::string::npos) << r.out;
}

// An ext4 image on a loop device mounted with errors=remount-ro at `path`. MakeReadOnly() has the
// kernel record an error (/sys/fs/ext4/<dev>/trigger_fs_error), which turns the filesystem
// read-only under every open file: what a failing disk does, and what a remount cannot do while
// RocksDB holds files open for writing. Repair() is the operator's part: unmount, e2fsck, mount.
struct LoopExt4 {
  std::string image, path, device, why_not;
  bool mounted = false;
  LoopExt4(std::string img, std::string p) : image(std::move(img)), path(std::move(p)) {
    fs::create_directories(path);
    testing::ShellResult r = testing::Sh("truncate -s 96M " + image + " && mkfs.ext4 -q -F " + image +
                                         " && mount -o loop,errors=remount-ro " + image + " " + path);
    if (r.code != 0) {
      why_not = r.out;
      return;
    }
    mounted = true;
    device = fs::path(testing::Sh("findmnt -n -o SOURCE " + path).out).filename().string();
    while (!device.empty() && std::isspace(static_cast<unsigned char>(device.back()))) device.pop_back();
    fs::remove_all(path + "/lost+found");
  }
  ~LoopExt4() {
    if (mounted) testing::Sh("umount " + path);
    fs::remove(image);
  }
  bool MakeReadOnly() const {
    std::ofstream("/sys/fs/ext4/" + device + "/trigger_fs_error") << "peerd read-only test\n";
    for (int i = 0; i < 50; ++i, std::this_thread::sleep_for(100ms))
      if (testing::Sh("findmnt -n -o OPTIONS " + path).out.find("ro") == 0 ||
          testing::Sh("touch " + path + "/probe").code != 0)
        return true;
    return false;
  }
  testing::ShellResult Repair() const {
    return testing::Sh("umount " + path + " && (e2fsck -fy " + image +
                       " >/dev/null; [ $? -le 1 ]) && mount -o loop,errors=remount-ro " + image + " " + path);
  }
};

TEST(DiskFull, DataDirectoryTurningReadOnlyStopsAcksAndLosesNothing) {
  const std::string dir = ::testing::TempDir() + "/peerd_erofs_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  if (geteuid() != 0) GTEST_SKIP() << "mounting an ext4 image on a loop device needs root";
  LoopExt4 data(dir + "/data.img", dir + "/data");
  if (!data.mounted) GTEST_SKIP() << "no ext4 loop mount here: " << data.why_not;
  std::ofstream(dir + "/config.json") << testing::kTinyConfigJson;
  PeerdProcess peerd(dir);
  const std::string flags = "--checkpoint-every-steps 4 --checkpoint-every-seconds 1 --threads 1";
  ASSERT_NO_FATAL_FAILURE(peerd.Start(flags));
  const std::string token = testing::Slurp(data.path + "/data.token").substr(0, 64);

  // Before: documents acknowledged, a segment frozen, a checkpoint written.
  std::vector<std::string> acked;
  for (int i = 0; i < 5; ++i) {
    const std::string id = "before-" + std::to_string(i);
    ServerFrame f = SendOne(peerd.data_port(), token, id);
    ASSERT_TRUE(f.has_ack()) << f.DebugString();
    acked.push_back(id);
  }
  ASSERT_EQ(peerd.Ctl("segments add").code, 0);
  testing::ShellResult frozen = peerd.Ctl("segments freeze 0");
  ASSERT_EQ(frozen.code, 0) << frozen.out;
  json before = peerd.WaitFor([](const json& s) { return testing::U(s, "lastCheckpointStep") > 0; });

  // The filesystem turns read-only under peerd.
  ASSERT_TRUE(data.MakeReadOnly()) << "the kernel did not make " << data.path << " read-only";
  ServerFrame refused;
  for (int i = 0; i < 20 && !refused.has_error(); ++i) {
    const std::string id = "read-only-" + std::to_string(i);
    refused = SendOne(peerd.data_port(), token, id);
    if (refused.has_ack()) acked.push_back(id);  // not expected: a write after the error fails
  }
  ASSERT_TRUE(refused.has_error()) << "documents still acknowledged on a read-only filesystem";
  EXPECT_EQ(refused.error().code(), ErrorReply::UNAVAILABLE);
  // The cause, then what to do. The store's own wording of the cause varies (one error, or two
  // joined in parentheses when a retry failed too), so the two parts are looked for separately.
  EXPECT_NE(refused.error().message().find("Read-only file system"), std::string::npos) << refused.error().message();
  EXPECT_NE(refused.error().message().find("documents are not acknowledged until the data directory is repaired and "
                                           "peerd restarted"),
            std::string::npos)
      << refused.error().message();
  json status = peerd.CtlJson("status");
  EXPECT_NE(status.value("ingestError", "").find("Read-only file system"), std::string::npos) << status.dump();
  EXPECT_TRUE(testing::FileShows(dir + "/peerd.log", "ingest stopped: documents are not being acknowledged"));
  // A freeze is refused too, with the reason, rather than acknowledged and lost; the segment
  // stays a training one.
  testing::ShellResult freeze = peerd.Ctl("segments freeze 1");
  EXPECT_NE(freeze.code, 0) << freeze.out;
  EXPECT_NE(freeze.out.find("Read-only file system"), std::string::npos) << freeze.out;
  status = peerd.CtlJson("status");
  for (const json& seg : status["segments"]) {
    if (seg["id"] == 1) {
      EXPECT_EQ(seg["state"], "training");
    }
  }

  // The operator stops peerd (it cannot write its last checkpoint, and says so), repairs the
  // filesystem and starts peerd again: every acknowledged document and frozen segment is there.
  const int code = peerd.Kill(SIGTERM);
  const std::string log = testing::Slurp(dir + "/peerd.log");
  EXPECT_NE(code, 0) << "peerd exited 0 without its final checkpoint: " << log;
  testing::ShellResult repaired = data.Repair();
  ASSERT_EQ(repaired.code, 0) << repaired.out;
  {
    std::shared_ptr<DataDirDb> db;
    Status st = DataDirDb::Open(data.path, {}, &db);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ExpertStore store(db);
    std::map<uint32_t, uint64_t> frozen;
    ASSERT_NO_FATAL_FAILURE(testing::VerifyFrozenSegments(store, &frozen));
    EXPECT_EQ(frozen.size(), 1u);
    std::vector<std::string> ids;
    ASSERT_NO_FATAL_FAILURE(SpooledIds(db, &ids));
    EXPECT_EQ(ids, acked);
  }
  ASSERT_NO_FATAL_FAILURE(peerd.Start(flags));
  json after = peerd.CtlJson("status");
  EXPECT_GE(testing::U(after, "step"), testing::U(before, "lastCheckpointStep"));
  ServerFrame again = SendOne(peerd.data_port(), token, "after-repair");
  EXPECT_TRUE(again.has_ack()) << again.DebugString();
}

}  // namespace
}  // namespace peerd
