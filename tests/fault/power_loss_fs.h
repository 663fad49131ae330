// PowerLossFs: a RocksDB file system that can lose power. Until PowerLoss() it passes everything to
// the real file system and remembers, for each file written, how many bytes a Sync/Fsync made
// durable; from PowerLoss() on every write, sync, create, rename and delete fails, as on a machine
// that is off; DropUnsyncedData() then cuts every file back to its last synced length — what a
// power cut leaves of data that was only in the page cache. (SIGKILL keeps the page cache, so a
// kill cannot tell a synced write from an unsynced one; this can.)
//
// Directory entries are not modelled: a file created or renamed and never covered by a
// directory fsync stays (RocksDB fsyncs its directory after creating a file and after renaming
// CURRENT, so this only makes the simulation kinder about renames, never about data).
#pragma once

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace peerd::testing {

class PowerLossFs : public rocksdb::FileSystemWrapper {
 public:
  using IOStatus = rocksdb::IOStatus;
  using IOOptions = rocksdb::IOOptions;
  using IODebugContext = rocksdb::IODebugContext;

  PowerLossFs() : FileSystemWrapper(rocksdb::FileSystem::Default()) {}
  static const char* kClassName() { return "PowerLossFs"; }
  const char* Name() const override { return kClassName(); }

  // From now on nothing reaches the disk.
  void PowerLoss() {
    std::lock_guard<std::mutex> lock(mu_);
    down_ = true;
  }
  // Cuts each file written through this file system back to its last synced length; call once
  // nothing holds the database open. Returns how many bytes were dropped.
  uint64_t DropUnsyncedData() {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t dropped = 0;
    for (const auto& [path, f] : files_) {
      std::error_code ec;
      const uint64_t size = std::filesystem::file_size(path, ec);
      if (ec || size <= f.synced) continue;
      std::filesystem::resize_file(path, f.synced, ec);
      if (!ec) dropped += size - f.synced;
    }
    return dropped;
  }

  IOStatus NewWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                           std::unique_ptr<rocksdb::FSWritableFile>* result, IODebugContext* dbg) override {
    if (IOStatus s = Refuse(); !s.ok()) return s;
    IOStatus s = target()->NewWritableFile(name, options, result, dbg);
    if (s.ok()) Track(name, /*existing=*/0, result);
    return s;
  }
  IOStatus ReopenWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                              std::unique_ptr<rocksdb::FSWritableFile>* result, IODebugContext* dbg) override {
    if (IOStatus s = Refuse(); !s.ok()) return s;
    std::error_code ec;
    const uint64_t existing = std::filesystem::exists(name, ec) ? std::filesystem::file_size(name, ec) : 0;
    IOStatus s = target()->ReopenWritableFile(name, options, result, dbg);
    if (s.ok()) Track(name, existing, result);
    return s;
  }
  IOStatus ReuseWritableFile(const std::string& name, const std::string& old_name, const rocksdb::FileOptions& options,
                             std::unique_ptr<rocksdb::FSWritableFile>* result, IODebugContext* dbg) override {
    if (IOStatus s = Refuse(); !s.ok()) return s;
    IOStatus s = target()->ReuseWritableFile(name, old_name, options, result, dbg);
    if (s.ok()) Track(name, 0, result);
    return s;
  }
  IOStatus RenameFile(const std::string& from, const std::string& to, const IOOptions& options,
                      IODebugContext* dbg) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (down_) return Down();
    IOStatus s = target()->RenameFile(from, to, options, dbg);
    if (s.ok()) {
      if (auto it = files_.find(from); it != files_.end()) {
        files_[to] = it->second;
        files_.erase(it);
      } else {
        files_.erase(to);  // a file not written here: whatever it holds was there before
      }
    }
    return s;
  }
  IOStatus DeleteFile(const std::string& name, const IOOptions& options, IODebugContext* dbg) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (down_) return Down();
    IOStatus s = target()->DeleteFile(name, options, dbg);
    if (s.ok()) files_.erase(name);
    return s;
  }
  IOStatus CreateDir(const std::string& name, const IOOptions& options, IODebugContext* dbg) override {
    if (IOStatus s = Refuse(); !s.ok()) return s;
    return target()->CreateDir(name, options, dbg);
  }
  IOStatus CreateDirIfMissing(const std::string& name, const IOOptions& options, IODebugContext* dbg) override {
    if (IOStatus s = Refuse(); !s.ok()) return s;
    return target()->CreateDirIfMissing(name, options, dbg);
  }

 private:
  struct FileState {
    uint64_t written = 0;  // bytes in the file, as written through here
    uint64_t synced = 0;   // of which a sync made durable
  };

  // A writable file that reports its writes and syncs to the file system.
  class File : public rocksdb::FSWritableFileOwnerWrapper {
   public:
    File(std::unique_ptr<rocksdb::FSWritableFile> file, PowerLossFs* fs, std::string name)
        : FSWritableFileOwnerWrapper(std::move(file)), fs_(fs), name_(std::move(name)) {}

    IOStatus Append(const rocksdb::Slice& data, const IOOptions& options, IODebugContext* dbg) override {
      return fs_->Write(name_, 0, data.size(), false, [&] { return target()->Append(data, options, dbg); });
    }
    IOStatus Append(const rocksdb::Slice& data, const IOOptions& options, const rocksdb::DataVerificationInfo& info,
                    IODebugContext* dbg) override {
      return fs_->Write(name_, 0, data.size(), false, [&] { return target()->Append(data, options, info, dbg); });
    }
    IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset, const IOOptions& options,
                              IODebugContext* dbg) override {
      return fs_->Write(name_, offset, data.size(), true,
                        [&] { return target()->PositionedAppend(data, offset, options, dbg); });
    }
    IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset, const IOOptions& options,
                              const rocksdb::DataVerificationInfo& info, IODebugContext* dbg) override {
      return fs_->Write(name_, offset, data.size(), true,
                        [&] { return target()->PositionedAppend(data, offset, options, info, dbg); });
    }
    IOStatus Truncate(uint64_t size, const IOOptions& options, IODebugContext* dbg) override {
      return fs_->Write(name_, size, 0, true, [&] { return target()->Truncate(size, options, dbg); });
    }
    IOStatus Flush(const IOOptions& options, IODebugContext* dbg) override {
      if (IOStatus s = fs_->Refuse(); !s.ok()) return s;
      return target()->Flush(options, dbg);
    }
    IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
      return fs_->Synced(name_, [&] { return target()->Sync(options, dbg); });
    }
    IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
      return fs_->Synced(name_, [&] { return target()->Fsync(options, dbg); });
    }
    IOStatus RangeSync(uint64_t offset, uint64_t nbytes, const IOOptions& options, IODebugContext* dbg) override {
      // sync_file_range starts write-back; it promises nothing about a power cut.
      if (IOStatus s = fs_->Refuse(); !s.ok()) return s;
      return target()->RangeSync(offset, nbytes, options, dbg);
    }

   private:
    PowerLossFs* fs_;
    std::string name_;
  };

  static IOStatus Down() { return IOStatus::IOError("simulated power loss: the disk is gone"); }
  IOStatus Refuse() {
    std::lock_guard<std::mutex> lock(mu_);
    return down_ ? Down() : IOStatus::OK();
  }
  void Track(const std::string& name, uint64_t existing, std::unique_ptr<rocksdb::FSWritableFile>* result) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      files_[name] = {existing, existing};  // what was there before was there before the power went
    }
    *result = std::make_unique<File>(std::move(*result), this, name);
  }
  // A write of `n` bytes at `offset` (positioned) or at the end; under the lock, so that a write
  // either happens before the power loss or fails.
  template <typename Op>
  IOStatus Write(const std::string& name, uint64_t offset, uint64_t n, bool positioned, Op op) {
    std::lock_guard<std::mutex> lock(mu_);
    if (down_) return Down();
    IOStatus s = op();
    if (s.ok()) {
      FileState& f = files_[name];
      f.written = positioned ? offset + n : f.written + n;
      f.synced = std::min(f.synced, f.written);
    }
    return s;
  }
  template <typename Op>
  IOStatus Synced(const std::string& name, Op op) {
    std::lock_guard<std::mutex> lock(mu_);
    if (down_) return Down();
    IOStatus s = op();
    if (s.ok()) files_[name].synced = files_[name].written;
    return s;
  }

  std::mutex mu_;
  bool down_ = false;
  std::map<std::string, FileState> files_;  // by path
};

}  // namespace peerd::testing
