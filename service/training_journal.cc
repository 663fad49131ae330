#include "service/training_journal.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace peerd {

TrainingJournal::~TrainingJournal() {
  if (fd_ >= 0) close(fd_);
}

Status TrainingJournal::Open(const std::string& path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0)
    return Status::IOError("opening the training journal " + path + ": " + std::strerror(errno) +
                           ": give a writable path to --training-journal");
  path_ = path;
  return Status::OK();
}

Status TrainingJournal::Started(int64_t step, uint64_t index, uint64_t offset) {
  return Append("start " + std::to_string(step) + " " + std::to_string(index) + " " + std::to_string(offset) + "\n");
}

Status TrainingJournal::Trained(int64_t step, const std::vector<TrainedSpan>& spans) {
  std::string lines;
  for (const TrainedSpan& s : spans)
    lines += "step " + std::to_string(step) + " " + std::to_string(s.index) + " " + std::to_string(s.from) + " " +
             std::to_string(s.to) + "\n";
  return Append(lines);
}

Status TrainingJournal::Append(const std::string& lines) {
  if (fd_ < 0 || lines.empty()) return Status::OK();
  // One write: a kill lands before or after it, so a reader never sees half a step.
  const ssize_t n = write(fd_, lines.data(), lines.size());
  if (n == static_cast<ssize_t>(lines.size())) return Status::OK();
  return Status::IOError("writing the training journal " + path_ + ": " +
                         (n < 0 ? std::string(std::strerror(errno)) : "short write"));
}

Status TrainingJournal::Sync() {
  if (fd_ < 0 || fdatasync(fd_) == 0) return Status::OK();
  return Status::IOError("syncing the training journal " + path_ + ": " + std::strerror(errno));
}

}  // namespace peerd
