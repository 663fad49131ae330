// The ingest path without LibTorch: the spool (durable, deduplicated, ordered), the data port
// (acks only what is durable, pushes back when the backlog is full, refuses bad input clearly),
// peer-ingest's client (resends, resumes) and its document splitting — over real loopback TCP.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio.hpp>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <set>
#include <thread>

#include "core/host_port.h"
#include "ingest/document_source.h"
#include "ingest/ingest_client.h"
#include "proto/frame.h"
#include "proto/wire.pb.h"
#include "service/net/data_server.h"
#include "service/net/spool.h"

namespace peerd {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string FreshDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/peerd_net_" + name + "_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A corpus file of `n` paragraphs (blank-line separated), each distinct.
std::string WriteCorpus(const std::string& dir, int n, size_t words = 20) {
  const std::string path = dir + "/corpus.txt";
  std::ofstream out(path);
  for (int i = 0; i < n; ++i) {
    out << "paragraph " << i << ":";
    for (size_t w = 0; w < words; ++w) out << " word" << (i * 31 + w) % 97;
    out << "\n\n";
  }
  return path;
}

struct Service {
  std::shared_ptr<DataDirDb> db;
  std::unique_ptr<Spool> spool;
  std::unique_ptr<DataServer> server;
  Status Start(const std::string& dir, DataServerOptions o = {}, const std::string& listen = "127.0.0.1:0") {
    if (Status st = DataDirDb::Open(dir + "/db", {}, &db); !st.ok()) return st;
    if (Status st = Spool::Open(db, &spool); !st.ok()) return st;
    o.listen = listen;
    o.token = "secret";
    return DataServer::Start(spool.get(), o, &server);
  }
  // The data port goes away (server, spool and store closed) and comes back on the same port,
  // with default options.
  Status Restart(const std::string& dir, uint16_t port) {
    server.reset();
    spool.reset();
    db.reset();
    std::this_thread::sleep_for(300ms);
    return Start(dir, {}, "127.0.0.1:" + std::to_string(port));
  }
  IngestOptions Client(const std::string& task) const {
    IngestOptions o;
    o.server = server->address();
    o.token = "secret";
    o.task = task;
    o.max_reconnects = 3;
    return o;
  }
};

Status Ingest(const IngestOptions& o, const std::string& path, IngestProgress* p, SplitSpec split = {}) {
  std::unique_ptr<DocumentSource> source;
  if (Status st = DocumentSource::Open({path}, split, &source); !st.ok()) return st;
  return IngestClient(o).Run(*source, p);
}

TEST(DocumentSource, SplitsByBlankLineLineAndBytesWithStableIds) {
  const std::string dir = FreshDir("split");
  { std::ofstream(dir + "/a.txt") << "one\ntwo\n\n\nthree\n"; }
  auto all = [&](SplitSpec s) {
    std::unique_ptr<DocumentSource> src;
    EXPECT_TRUE(DocumentSource::Open({dir}, s, &src).ok());
    std::vector<IngestDocument> docs;
    for (IngestDocument d; src->Next(&d);) docs.push_back(d);
    return docs;
  };
  auto para = all({SplitMode::kBlankLine, 0});
  ASSERT_EQ(para.size(), 2u);
  EXPECT_EQ(para[0].text, "one\ntwo\n");
  EXPECT_EQ(para[1].text, "three\n");
  EXPECT_EQ(para[1].id, dir + "/a.txt@10+6");
  EXPECT_EQ(all({SplitMode::kLine, 0}).size(), 3u);  // blank lines are not documents
  EXPECT_EQ(all({SplitMode::kFile, 0}).size(), 1u);
  auto chunks = all({SplitMode::kBytes, 4});
  ASSERT_EQ(chunks.size(), 4u);  // "one\n" "two\n" "\n\nth" "ree\n"
  EXPECT_EQ(chunks[0].text, "one\n");
  SplitSpec bad;
  EXPECT_FALSE(ParseSplit("bytes:0", &bad).ok());
  EXPECT_FALSE(ParseSplit("paragraph", &bad).ok());
  std::unique_ptr<DocumentSource> src;
  EXPECT_EQ(DocumentSource::Open({dir + "/missing"}, {}, &src).code(), Status::Code::kNotFound);
}

TEST(DocumentSource, FollowYieldsAppendedDocumentsOnceComplete) {
  const std::string dir = FreshDir("follow");
  const std::string path = dir + "/log.txt";
  { std::ofstream(path) << "first\n\nsecond, still be"; }
  std::unique_ptr<DocumentSource> src;
  ASSERT_TRUE(DocumentSource::Open({path}, {SplitMode::kBlankLine, 0}, &src).ok());
  std::atomic<bool> stop{false};
  src->Follow(&stop);
  std::vector<IngestDocument> docs;
  std::atomic<size_t> count{0};
  std::thread reader([&] {
    for (IngestDocument d; src->Next(&d);) {
      docs.push_back(d);
      count = docs.size();
    }
  });
  // Polled under deadlines: the first document read (so the reader sits at the half-written one),
  // then, after the append, the second.
  auto wait_for_count = [&](size_t n) {
    for (auto end = std::chrono::steady_clock::now() + 10s; count < n && std::chrono::steady_clock::now() < end;)
      std::this_thread::sleep_for(10ms);
    return count >= n;
  };
  const bool first_read = wait_for_count(1);
  { std::ofstream(path, std::ios::app) << "ing written\n\nthird\n"; }
  const bool second_read = wait_for_count(2);
  std::this_thread::sleep_for(300ms);  // time for a wrong third document (no separator yet) to show
  stop = true;
  reader.join();
  ASSERT_TRUE(first_read) << "the follower did not read the first document within 10 s";
  ASSERT_TRUE(second_read) << "the follower did not finish the appended document within 10 s";
  ASSERT_EQ(docs.size(), 2u) << "the third document has no separator yet";
  EXPECT_EQ(docs[0].text, "first\n");
  EXPECT_EQ(docs[1].text, "second, still being written\n");
  EXPECT_EQ(docs[1].id, path + "@7+28");
}

TEST(Spool, StoresInOrderOncePerTaskAndIdAndKeepsCountersAcrossReopen) {
  const std::string dir = FreshDir("spool");
  {
    std::shared_ptr<DataDirDb> db;
    ASSERT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
    std::unique_ptr<Spool> spool;
    ASSERT_TRUE(Spool::Open(db, &spool).ok());
    uint64_t dups = 9;
    ASSERT_TRUE(spool->AppendAndWait("kjv", {{"a", "alpha"}, {"b", "beta"}, {"a", "again"}}, &dups).ok());
    EXPECT_EQ(dups, 1u);  // a duplicate within one batch
    ASSERT_TRUE(spool->AppendAndWait("kjv", {{"b", "beta"}}, &dups).ok());
    EXPECT_EQ(dups, 1u);  // and across batches
    ASSERT_TRUE(spool->AppendAndWait("code", {{"a", "other task, same id"}}, &dups).ok());
    EXPECT_EQ(dups, 0u);
    EXPECT_EQ(spool->stats().documents, 3u);
  }
  std::shared_ptr<DataDirDb> db;
  ASSERT_TRUE(DataDirDb::Open(dir, {}, &db).ok());
  std::unique_ptr<Spool> spool;
  ASSERT_TRUE(Spool::Open(db, &spool).ok());
  EXPECT_EQ(spool->last_index(), 3u);
  EXPECT_EQ(spool->stats().bytes, 5u + 4u + 19u);
  std::vector<SpoolEntry> docs;
  ASSERT_TRUE(spool->Read(2, 10, &docs).ok());
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0].text, "beta");
  EXPECT_EQ(docs[1].task, "code");
  EXPECT_EQ(spool->stats().backlog_documents, 3u);
  spool->SetConsumed(3, 9);
  EXPECT_EQ(spool->stats().backlog_bytes, 19u);
  EXPECT_EQ(spool->stats().backlog_documents, 1u);  // the third: its bytes and its end-of-document token
  spool->SetConsumed(3, 12);                        // part way through it
  EXPECT_EQ(spool->stats().backlog_documents, 1u);
  spool->SetConsumed(4, 28);
  EXPECT_EQ(spool->stats().backlog_bytes, 0u);
  EXPECT_EQ(spool->stats().backlog_documents, 0u);
  uint64_t dups = 0;
  ASSERT_TRUE(spool->AppendAndWait("kjv", {{"a", "alpha"}, {"c", "gamma"}}, &dups).ok());
  EXPECT_EQ(dups, 1u);
  EXPECT_EQ(spool->last_index(), 4u);
}

TEST(DataPort, EveryAckedDocumentSurvivesSigkillOfTheServer) {
  const std::string dir = FreshDir("kill");
  const std::string corpus = WriteCorpus(dir, 400);
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // the server: runs until killed
    Service s;
    if (!s.Start(dir).ok()) _exit(2);
    uint16_t port = s.server->port();
    if (write(pipe_fds[1], &port, sizeof port) != sizeof port) _exit(3);
    for (;;) pause();
  }
  uint16_t port = 0;
  ASSERT_EQ(read(pipe_fds[0], &port, sizeof port), static_cast<ssize_t>(sizeof port));
  IngestOptions o;
  o.server = "127.0.0.1:" + std::to_string(port);
  o.token = "secret";
  o.task = "kjv";
  o.resume_path = dir + "/resume";
  IngestProgress p;
  Status st = Ingest(o, corpus, &p);
  kill(pid, SIGKILL);  // the moment the last ack arrived
  waitpid(pid, nullptr, 0);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(p.acked_documents, 400u);

  std::shared_ptr<DataDirDb> db;
  ASSERT_TRUE(DataDirDb::Open(dir + "/db", {}, &db).ok());
  std::unique_ptr<Spool> spool;
  ASSERT_TRUE(Spool::Open(db, &spool).ok());
  std::vector<SpoolEntry> docs;
  ASSERT_TRUE(spool->Read(1, 1000, &docs).ok());
  std::set<std::string> ids;
  for (const auto& d : docs) ids.insert(d.id);
  std::ifstream resume(dir + "/resume");
  int acked = 0;
  for (std::string id; std::getline(resume, id); ++acked) EXPECT_TRUE(ids.count(id)) << "acked but lost: " << id;
  EXPECT_EQ(acked, 400);
  EXPECT_EQ(docs.size(), 400u);
}

TEST(DataPort, ResendsAreStoredOnceAndAResumeFileSendsNothingTwice) {
  const std::string dir = FreshDir("dups");
  const std::string corpus = WriteCorpus(dir, 50);
  Service s;
  ASSERT_TRUE(s.Start(dir).ok());
  IngestProgress p;
  ASSERT_TRUE(Ingest(s.Client("kjv"), corpus, &p).ok());
  ASSERT_TRUE(Ingest(s.Client("kjv"), corpus, &p).ok());  // no resume file: everything again
  EXPECT_EQ(p.acked_documents, 50u);
  EXPECT_EQ(p.duplicates, 50u);
  EXPECT_EQ(s.spool->stats().documents, 50u);

  IngestOptions o = s.Client("code");
  o.resume_path = dir + "/code.acked";
  ASSERT_TRUE(Ingest(o, corpus, &p).ok());
  EXPECT_EQ(p.sent_documents, 50u);
  ASSERT_TRUE(Ingest(o, corpus, &p).ok());
  EXPECT_EQ(p.sent_documents, 0u);
  EXPECT_EQ(p.resumed, 50u);
  EXPECT_EQ(s.spool->stats().documents, 100u);
}

TEST(DataPort, StopsReadingWhileTheBacklogIsFullAndResumesWhenItDrains) {
  const std::string dir = FreshDir("backpressure");
  const std::string corpus = WriteCorpus(dir, 2000, 60);  // ~0.9 MB
  Service s;
  DataServerOptions o;
  o.backlog_limit_bytes = 64 << 10;
  o.inflight_limit_bytes = 16 << 10;
  ASSERT_TRUE(s.Start(dir, o).ok());
  IngestProgress p;
  IngestOptions client = s.Client("kjv");
  client.window_bytes = 1 << 20;
  auto run = std::async(std::launch::async, [&] { return Ingest(client, corpus, &p); });
  // Nothing consumes: the spool fills to about the limit (polled, 30 s at most) and stops there.
  for (auto end = std::chrono::steady_clock::now() + 30s;
       s.spool->stats().bytes < o.backlog_limit_bytes && std::chrono::steady_clock::now() < end;)
    std::this_thread::sleep_for(20ms);
  std::this_thread::sleep_for(500ms);  // time for a server that ignores the limit to read past it
  const uint64_t stored = s.spool->stats().bytes;
  EXPECT_GE(stored, o.backlog_limit_bytes);
  EXPECT_LT(stored, o.backlog_limit_bytes + o.inflight_limit_bytes + 4096)
      << "server kept reading past the backlog limit";
  EXPECT_EQ(run.wait_for(0ms), std::future_status::timeout) << "client finished although the server pushed back";
  // A consumer drains the spool: the rest flows.
  auto drain_until = std::chrono::steady_clock::now() + 60s;
  while (run.wait_for(20ms) == std::future_status::timeout && std::chrono::steady_clock::now() < drain_until) {
    SpoolStats st = s.spool->stats();
    s.spool->SetConsumed(s.spool->last_index() + 1, st.bytes);
  }
  ASSERT_EQ(run.wait_for(0ms), std::future_status::ready);
  Status st = run.get();
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(s.spool->stats().documents, 2000u);
}

// A raw client: sends frames, reads the server's first reply.
struct RawClient {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket{io};
  explicit RawClient(uint16_t port) {
    socket.connect({boost::asio::ip::make_address("127.0.0.1"), port});
    timeval limit{10, 0};  // a read that waits longer fails the test instead of hanging it
    setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  }
  // recv() itself, as asio's blocking read would wait past SO_RCVTIMEO.
  void ReadExactly(void* out, size_t n) {
    char* p = static_cast<char*>(out);
    while (n > 0) {
      const ssize_t got = ::recv(socket.native_handle(), p, n, 0);
      if (got <= 0) throw std::runtime_error(got == 0 ? "server closed the connection" : "no reply within 10 s");
      p += got;
      n -= static_cast<size_t>(got);
    }
  }
  void Send(const std::string& bytes) { boost::asio::write(socket, boost::asio::buffer(bytes)); }
  void Hello(const std::string& token = "secret", uint32_t version = wire::kProtocolVersion,
             const std::string& task = "kjv") {
    ClientFrame f;
    f.mutable_hello()->set_protocol_version(version);
    f.mutable_hello()->set_token(token);
    f.mutable_hello()->set_task(task);
    Send(wire::EncodeFrame(f));
  }
  void Doc(uint64_t seq, const std::string& id, const std::string& text) {
    ClientFrame f;
    f.mutable_document()->set_seq(seq);
    f.mutable_document()->set_id(id);
    f.mutable_document()->set_text(text);
    Send(wire::EncodeFrame(f));
  }
  ServerFrame Read() {
    unsigned char h[4];
    ReadExactly(h, sizeof h);
    std::string body(wire::DecodeLength(h), '\0');
    ReadExactly(body.data(), body.size());
    ServerFrame f;
    f.ParseFromString(body);
    return f;
  }
  // The error that ends the stream (skipping a hello reply and acks).
  ServerFrame ReadUntilError() {
    for (;;) {
      ServerFrame f = Read();
      if (f.has_error()) return f;
    }
  }
};

TEST(DataPort, BadInputGetsAClearErrorAndTheServerKeepsServingOthers) {
  const std::string dir = FreshDir("bad");
  Service s;
  DataServerOptions o;
  o.max_document_bytes = 1000;
  ASSERT_TRUE(s.Start(dir, o).ok());
  const uint16_t port = s.server->port();
  struct Case {
    std::string name;
    std::function<void(RawClient&)> send;
    ErrorReply::Code code;
    std::string says;
  };
  std::vector<Case> cases = {
      {"length over the limit",
       [](RawClient& c) {
         c.Hello();
         c.Send(std::string("\x7f\xff\xff\xff", 4));
       },
       ErrorReply::BAD_FRAME, "frames must be 1 to 5096 bytes"},
      {"large frame before the hello", [](RawClient& c) { c.Send(std::string("\0\0\x10\x01", 4)); },
       ErrorReply::BAD_FRAME, "frame of 4097 bytes before the hello"},
      {"zero-length frame", [](RawClient& c) { c.Send(std::string("\0\0\0\0", 4)); }, ErrorReply::BAD_FRAME,
       "frame of 0 bytes"},
      {"frame of neither kind", [](RawClient& c) { c.Send(std::string("\0\0\0\x02\x18\x01", 6)); },
       ErrorReply::BAD_FRAME, "neither a hello nor a document"},
      {"garbage body", [](RawClient& c) { c.Send(std::string("\0\0\0\x05\xff\xff\xff\xff\xff", 9)); },
       ErrorReply::BAD_FRAME, "not a peerd.ClientFrame"},
      {"wrong token", [](RawClient& c) { c.Hello("guess"); }, ErrorReply::UNAUTHENTICATED, "wrong data token"},
      {"wrong version", [](RawClient& c) { c.Hello("secret", 99); }, ErrorReply::BAD_HELLO, "protocol version 99"},
      {"bad task name", [](RawClient& c) { c.Hello("secret", wire::kProtocolVersion, "../etc"); },
       ErrorReply::BAD_HELLO, "task name"},
      {"document before hello", [](RawClient& c) { c.Doc(1, "a", "text"); }, ErrorReply::BAD_HELLO,
       "must open with a hello"},
      {"empty document",
       [](RawClient& c) {
         c.Hello();
         c.Doc(1, "a", "");
       },
       ErrorReply::BAD_DOCUMENT, "is empty"},
      {"document without id",
       [](RawClient& c) {
         c.Hello();
         c.Doc(1, "", "text");
       },
       ErrorReply::BAD_DOCUMENT, "has no id"},
      {"id over 1024 bytes",
       [](RawClient& c) {
         c.Hello();
         c.Doc(1, std::string(1025, 'i'), "text");
       },
       ErrorReply::BAD_DOCUMENT, "ids are at most 1024"},
      {"document over the limit",
       [](RawClient& c) {
         c.Hello();
         c.Doc(1, "big", std::string(1001, 'x'));
       },
       ErrorReply::BAD_DOCUMENT, "over the limit of 1000"},
      {"seq out of order",
       [](RawClient& c) {
         c.Hello();
         c.Doc(2, "a", "text");
       },
       ErrorReply::BAD_DOCUMENT, "seq must count up"},
      {"second hello",
       [](RawClient& c) {
         c.Hello();
         c.Hello();
       },
       ErrorReply::BAD_HELLO, "hello sent twice"},
  };
  for (const Case& c : cases) {
    RawClient client(port);
    c.send(client);
    ServerFrame f = client.ReadUntilError();
    EXPECT_EQ(f.error().code(), c.code) << c.name << ": " << f.error().message();
    EXPECT_NE(f.error().message().find(c.says), std::string::npos) << c.name << ": " << f.error().message();
  }
  EXPECT_EQ(s.spool->stats().documents, 0u) << "nothing from a refused stream may be stored";
  // A well-behaved client is still served.
  RawClient good(port);
  good.Hello();
  good.Doc(1, "a", "fine text");
  ServerFrame hello = good.Read(), ack = good.Read();
  EXPECT_TRUE(hello.has_hello());
  ASSERT_TRUE(ack.has_ack());
  EXPECT_EQ(ack.ack().seq(), 1u);
  EXPECT_EQ(s.spool->stats().documents, 1u);
}

// Bytes, not text: the model is byte-level, so a document that is not UTF-8 is stored as sent.
TEST(DataPort, DocumentsThatAreNotUtf8AreAcceptedAndStoredByteForByte) {
  const std::string dir = FreshDir("bytes");
  Service s;
  ASSERT_TRUE(s.Start(dir).ok());
  RawClient c(s.server->port());
  const std::string text("caf\xe9 \xff\xfe\x00 \xc3\x28", 10);
  c.Hello();
  c.Doc(1, "latin1", text);
  ASSERT_TRUE(c.Read().has_hello());
  ServerFrame ack = c.Read();
  ASSERT_TRUE(ack.has_ack()) << ack.DebugString();
  SpoolEntry stored;
  ASSERT_TRUE(s.spool->Get(1, &stored).ok());
  EXPECT_EQ(stored.text, text);
}

// A client that goes quiet costs a connection for a bounded time: no hello within the hello
// timeout, or half a frame and then nothing for the idle timeout, and the stream is closed with
// TIMEOUT — while a well-behaved client beside them is served.
TEST(DataPort, SilentAndHalfFrameClientsTimeOutWhileOthersAreServed) {
  const std::string dir = FreshDir("idle");
  Service s;
  DataServerOptions o;
  o.hello_timeout_ms = 300;
  o.idle_timeout_ms = 600;
  ASSERT_TRUE(s.Start(dir, o).ok());
  const auto t0 = std::chrono::steady_clock::now();
  RawClient silent(s.server->port()), half(s.server->port()), good(s.server->port());
  half.Hello();
  ClientFrame doc;
  doc.mutable_document()->set_seq(1);
  doc.mutable_document()->set_id("half");
  doc.mutable_document()->set_text(std::string(200, 'h'));
  half.Send(wire::EncodeFrame(doc).substr(0, 50));  // the header and a quarter of the body
  good.Hello();
  ASSERT_TRUE(good.Read().has_hello());
  for (uint64_t seq = 1; seq <= 5; ++seq) {  // one document every 200 ms: never idle for 600
    good.Doc(seq, "good" + std::to_string(seq), "text " + std::to_string(seq));
    ServerFrame ack = good.Read();
    ASSERT_TRUE(ack.has_ack()) << ack.DebugString();
    EXPECT_EQ(ack.ack().seq(), seq);
    std::this_thread::sleep_for(200ms);
  }
  ServerFrame e1 = silent.ReadUntilError();
  EXPECT_EQ(e1.error().code(), ErrorReply::TIMEOUT);
  EXPECT_NE(e1.error().message().find("no hello for 300 ms"), std::string::npos) << e1.error().message();
  ServerFrame e2 = half.ReadUntilError();
  EXPECT_EQ(e2.error().code(), ErrorReply::TIMEOUT);
  EXPECT_NE(e2.error().message().find("no frame for 600 ms"), std::string::npos) << e2.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_EQ(s.server->stats().timeouts, 2u);
  EXPECT_EQ(s.spool->stats().documents, 5u) << "only the good client's documents are stored";
}

// Over max_connections, a new connection is told UNAVAILABLE (which peer-ingest retries) rather
// than left waiting; once one closes, the next is served.
TEST(DataPort, ConnectionsOverTheLimitAreRefusedAsUnavailableUntilOneCloses) {
  const std::string dir = FreshDir("limit");
  Service s;
  DataServerOptions o;
  o.max_connections = 3;
  ASSERT_TRUE(s.Start(dir, o).ok());
  std::vector<std::unique_ptr<RawClient>> open;
  for (int i = 0; i < 3; ++i) {
    open.push_back(std::make_unique<RawClient>(s.server->port()));
    open.back()->Hello();
    ASSERT_TRUE(open.back()->Read().has_hello());
  }
  RawClient over(s.server->port());
  ServerFrame refused = over.ReadUntilError();
  EXPECT_EQ(refused.error().code(), ErrorReply::UNAVAILABLE);
  EXPECT_NE(refused.error().message().find("at most 3 data connections"), std::string::npos)
      << refused.error().message();
  open.pop_back();  // closes one
  ServerFrame reply;
  for (int attempt = 0; attempt < 50 && !reply.has_hello(); ++attempt) {
    std::this_thread::sleep_for(20ms);
    RawClient next(s.server->port());
    next.Hello();
    reply = next.Read();
  }
  EXPECT_TRUE(reply.has_hello()) << reply.DebugString();
  EXPECT_GE(s.server->stats().refused_connections, 1u);
}

// A client that vanishes in the middle of a frame leaves nothing behind, and the port goes on.
TEST(DataPort, DisconnectMidFrameStoresNothingAndTheNextClientIsServed) {
  const std::string dir = FreshDir("midframe");
  Service s;
  ASSERT_TRUE(s.Start(dir).ok());
  {
    RawClient c(s.server->port());
    c.Hello();
    ASSERT_TRUE(c.Read().has_hello());
    ClientFrame doc;
    doc.mutable_document()->set_seq(1);
    doc.mutable_document()->set_id("cut");
    doc.mutable_document()->set_text(std::string(1000, 'c'));
    c.Send(wire::EncodeFrame(doc).substr(0, 500));
  }  // closed here, half sent
  RawClient good(s.server->port());
  good.Hello();
  good.Doc(1, "whole", "whole text");
  ASSERT_TRUE(good.Read().has_hello());
  ASSERT_TRUE(good.Read().has_ack());
  EXPECT_EQ(s.spool->stats().documents, 1u);
  SpoolEntry stored;
  ASSERT_TRUE(s.spool->Get(1, &stored).ok());
  EXPECT_EQ(stored.id, "whole");
}

// A port that is not peerd's data port — silent, or answering HTTP like the admin API — ends the
// run within seconds with a message that says so, and nothing is retried.
TEST(Ingest, APortThatIsNotADataPortFailsWithinSecondsSayingSo) {
  const std::string dir = FreshDir("not_peerd");
  const std::string corpus = WriteCorpus(dir, 3);
  for (const std::string& answer : {std::string(), std::string("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
                                    std::string("\xff\xff\xff\xff", 4)}) {
    boost::asio::io_context io;
    boost::asio::ip::tcp::acceptor acceptor(io, {boost::asio::ip::make_address("127.0.0.1"), 0});
    std::atomic<int> accepted{0};
    std::atomic<bool> stop{false};
    std::thread server([&] {
      // Accepts every connection, answers `answer` (or nothing) and keeps it open, until stopped.
      std::vector<std::unique_ptr<boost::asio::ip::tcp::socket>> open;
      acceptor.non_blocking(true);
      for (auto until = std::chrono::steady_clock::now() + 20s; !stop && std::chrono::steady_clock::now() < until;) {
        auto socket = std::make_unique<boost::asio::ip::tcp::socket>(io);
        boost::system::error_code ec;
        acceptor.accept(*socket, ec);
        if (ec) {
          std::this_thread::sleep_for(10ms);
          continue;
        }
        ++accepted;
        socket->non_blocking(false);
        if (!answer.empty()) boost::asio::write(*socket, boost::asio::buffer(answer), ec);
        open.push_back(std::move(socket));
      }
    });
    IngestOptions o;
    o.server = "127.0.0.1:" + std::to_string(acceptor.local_endpoint().port());
    o.token = "secret";
    o.task = "t";
    o.hello_timeout_ms = 1000;
    o.max_reconnects = 1;  // once the fake server stops, a client still waiting gives up, not hangs
    IngestProgress p;
    const auto start = std::chrono::steady_clock::now();
    auto run = std::async(std::launch::async, [&] { return Ingest(o, corpus, &p); });
    run.wait_for(8s);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    stop = true;
    server.join();
    boost::system::error_code ignored;
    acceptor.close(ignored);
    Status st = run.get();
    EXPECT_FALSE(st.ok());
    EXPECT_LT(seconds, 5.0) << st.ToString();
    EXPECT_EQ(accepted.load(), 1) << "retried a peer that is not peerd: " << st.ToString();
    EXPECT_NE(st.message().find("is it peerd's data port"), std::string::npos) << st.message();
    const std::string why = answer.empty()                 ? "no answer to the hello"
                            : answer.rfind("HTTP", 0) == 0 ? "an HTTP answer"
                                                           : "4294967295 bytes announced";
    EXPECT_NE(st.message().find(why), std::string::npos) << st.message();
  }
}

TEST(HostPort, TakesIpv4LocalhostAndBracketedIpv6AndRefusesTheRestSayingWhy) {
  std::string host;
  uint16_t port = 0;
  ASSERT_TRUE(ParseHostPort("127.0.0.1:7070", &host, &port).ok());
  EXPECT_EQ(host, "127.0.0.1");
  EXPECT_EQ(port, 7070);
  ASSERT_TRUE(ParseHostPort("localhost:0", &host, &port).ok());
  EXPECT_EQ(host, "localhost");
  EXPECT_EQ(port, 0);
  ASSERT_TRUE(ParseHostPort("[::1]:65535", &host, &port).ok());
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, 65535);
  const std::pair<const char*, const char*> bad[] = {
      {"7070", "is not HOST:PORT"},         {":7070", "is not HOST:PORT"},     {"localhost:", "is not HOST:PORT"},
      {"::1:7070x", "no valid port"},       {"[::1]", "is not [IPV6]:PORT"},   {"[::1:7070", "is not [IPV6]:PORT"},
      {"127.0.0.1:65536", "no valid port"}, {"127.0.0.1:-1", "no valid port"},
  };
  for (const auto& [text, why] : bad) {
    Status st = ParseHostPort(text, &host, &port);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << text;
    EXPECT_NE(st.message().find(why), std::string::npos) << text << ": " << st.message();
  }
}

// "[::1]:0" and "localhost:0" bind loopback (localhost as 127.0.0.1) and report the address really
// bound, which a client can connect to as it is.
TEST(DataPort, ListensOnIpv6LoopbackAndLocalhostAndReportsTheAddressBound) {
  for (const auto& [listen, prefix] : {std::pair{"[::1]:0", "[::1]:"}, std::pair{"localhost:0", "127.0.0.1:"}}) {
    const std::string dir = FreshDir(std::string("listen_") + (listen[0] == '[' ? "v6" : "localhost"));
    Service s;
    ASSERT_TRUE(s.Start(dir, {}, listen).ok()) << listen;
    EXPECT_EQ(s.server->address(), prefix + std::to_string(s.server->port()));
    IngestProgress p;
    Status st = Ingest(s.Client("t"), WriteCorpus(dir, 5), &p);
    ASSERT_TRUE(st.ok()) << listen << ": " << st.ToString();
    EXPECT_EQ(p.acked_documents, 5u) << listen;
  }
  Service bad;
  Status st = bad.Start(FreshDir("listen_bad"), {}, "example.org:0");
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("'example.org' is not an IP address"), std::string::npos) << st.message();
}

TEST(DataPort, ClientReconnectsAndResendsAfterTheServerRestarts) {
  const std::string dir = FreshDir("restart");
  const std::string corpus = WriteCorpus(dir, 300, 40);
  Service s;
  DataServerOptions o;
  o.backlog_limit_bytes = 8 << 10;  // the first server stalls early
  ASSERT_TRUE(s.Start(dir, o).ok());
  const uint16_t port = s.server->port();
  IngestOptions client = s.Client("kjv");
  client.max_reconnects = 50;
  IngestProgress p;
  auto run = std::async(std::launch::async, [&] { return Ingest(client, corpus, &p); });
  for (auto end = std::chrono::steady_clock::now() + 30s;
       s.spool->stats().documents == 0 && std::chrono::steady_clock::now() < end;)
    std::this_thread::sleep_for(20ms);
  const uint64_t stored_before = s.spool->stats().documents;
  ASSERT_GT(stored_before, 0u) << "the first server stored nothing within 30 s";
  ASSERT_LT(stored_before, 300u) << "the first server should still be mid-stream";
  ASSERT_TRUE(s.Restart(dir, port).ok());  // the data port goes away mid-stream and comes back
  ASSERT_EQ(run.wait_for(60s), std::future_status::ready);
  Status st = run.get();
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_GE(p.reconnects, 1u);
  EXPECT_EQ(s.spool->stats().documents, 300u);  // every document once, whatever was resent
}

// A followed file that is truncated in place, then replaced by a new file of the same name (log
// rotation), is read again from each new start: nothing is dropped as a duplicate of the earlier
// content at the same offsets, and the replaced file's last bytes are read before the switch.
TEST(DocumentSource, FollowReadsATruncatedOrRotatedFileAgainFromItsStart) {
  const std::string dir = FreshDir("follow_rotate");
  const std::string path = dir + "/log.txt";
  { std::ofstream(path) << "alpha\n"; }
  std::unique_ptr<DocumentSource> src;
  ASSERT_TRUE(DocumentSource::Open({path}, {SplitMode::kLine, 0}, &src).ok());
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::vector<IngestDocument> docs;
  std::vector<std::string> restarts;
  src->Follow(&stop, [&](const std::string& why) {
    std::lock_guard<std::mutex> lock(mu);
    restarts.push_back(why);
  });
  std::thread reader([&] {
    for (IngestDocument d; src->Next(&d);) {
      std::lock_guard<std::mutex> lock(mu);
      docs.push_back(d);
    }
  });
  auto wait_for = [&](size_t n) {
    for (auto end = std::chrono::steady_clock::now() + 10s; std::chrono::steady_clock::now() < end;) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (docs.size() >= n) return true;
      }
      std::this_thread::sleep_for(10ms);
    }
    return false;
  };
  const bool first = wait_for(1);
  { std::ofstream(path, std::ios::trunc) << "beta\n"; }  // truncated, rewritten shorter
  const bool truncated = wait_for(2);
  // Rotation: the old file gets a last, unterminated line, is renamed away, and a new file takes
  // its name holding a line at the very offset and length of one read before.
  { std::ofstream(path, std::ios::app) << "gamma"; }
  std::filesystem::rename(path, path + ".1");
  { std::ofstream(path) << "alpha\n"; }
  const bool rotated = wait_for(4);
  stop = true;
  reader.join();
  ASSERT_TRUE(first && truncated && rotated) << "read " << docs.size() << " of 4 documents within the deadlines";
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0].text, "alpha\n");
  EXPECT_EQ(docs[0].id, path + "@0+6");
  EXPECT_EQ(docs[1].text, "beta\n");
  EXPECT_EQ(docs[1].id.rfind(path + "@0+5~1:", 0), 0u) << docs[1].id;
  EXPECT_EQ(docs[2].text, "gamma") << "the replaced file's unterminated tail";
  EXPECT_EQ(docs[3].text, "alpha\n");
  EXPECT_EQ(docs[3].id.rfind(path + "@0+6~2:", 0), 0u) << docs[3].id;
  std::set<std::string> ids;
  for (const auto& d : docs) ids.insert(d.id);
  EXPECT_EQ(ids.size(), docs.size()) << "every document a distinct id";
  ASSERT_EQ(restarts.size(), 2u);
  EXPECT_NE(restarts[0].find("truncated"), std::string::npos) << restarts[0];
  EXPECT_NE(restarts[1].find("rotated"), std::string::npos) << restarts[1];
}

// Following a file that stays quiet, the client notices that peerd restarted and resends what was
// not acknowledged without waiting for a new line.
TEST(DataPort, AFollowingClientResendsAfterARestartWhileNoNewLineArrives) {
  const std::string dir = FreshDir("follow_restart");
  const std::string corpus = WriteCorpus(dir, 300, 40);
  Service s;
  DataServerOptions o;
  o.backlog_limit_bytes = 8 << 10;  // the first server stalls early, with documents in flight
  ASSERT_TRUE(s.Start(dir, o).ok());
  const uint16_t port = s.server->port();
  IngestOptions client = s.Client("kjv");
  client.max_reconnects = 50;
  std::unique_ptr<DocumentSource> source;
  ASSERT_TRUE(DocumentSource::Open({corpus}, {}, &source).ok());
  std::atomic<bool> stop{false};
  source->Follow(&stop);
  IngestProgress p;
  auto run = std::async(std::launch::async, [&] { return IngestClient(client).Run(*source, &p); });
  for (auto end = std::chrono::steady_clock::now() + 30s;
       s.spool->stats().documents == 0 && std::chrono::steady_clock::now() < end;)
    std::this_thread::sleep_for(20ms);
  ASSERT_GT(s.spool->stats().documents, 0u) << "the first server stored nothing within 30 s";
  ASSERT_LT(s.spool->stats().documents, 300u) << "the first server should still be mid-stream";
  ASSERT_TRUE(s.Restart(dir, port).ok());
  // No line is appended to the file from here on.
  for (auto end = std::chrono::steady_clock::now() + 30s;
       s.spool->stats().documents < 300 && std::chrono::steady_clock::now() < end;)
    std::this_thread::sleep_for(50ms);
  EXPECT_EQ(s.spool->stats().documents, 300u) << "the follower did not resend within 30 s of the restart";
  stop = true;
  ASSERT_EQ(run.wait_for(60s), std::future_status::ready);
  Status st = run.get();
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_GE(p.reconnects, 1u);
  EXPECT_EQ(p.acked_documents, 300u);
}

}  // namespace
}  // namespace peerd
