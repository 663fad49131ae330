#include "service/batch_source.h"

#include <algorithm>

#include "core/tokenizer.h"

namespace peerd {

namespace {

std::vector<int64_t> Tokens(const std::string& text, uint64_t from) {
  return ByteTokenizer::Encode(std::string_view(text).substr(std::min<size_t>(from, text.size())),
                               /*end_of_document=*/true);
}

}  // namespace

int64_t BatchSource::buffered_tokens() const {
  int64_t n = 0;
  for (const Piece& p : buffer_) n += static_cast<int64_t>(p.tokens.size());
  return n;
}

Status BatchSource::Fill(int64_t want) {
  if (next_read_ == 0) next_read_ = cursor_.index;
  int64_t have = buffered_tokens();
  while (have < want && next_read_ <= spool_->last_index()) {
    std::vector<SpoolEntry> docs;
    if (Status st = spool_->Read(next_read_, 64, &docs); !st.ok()) return st;
    if (docs.empty()) break;
    for (SpoolEntry& d : docs) {
      const uint64_t from = d.index == cursor_.index ? cursor_.offset : 0;
      buffer_.push_back({d.index, from, d.task, Tokens(d.text, from)});
      have += static_cast<int64_t>(buffer_.back().tokens.size());
      next_read_ = d.index + 1;
    }
  }
  return Status::OK();
}

torch::Tensor BatchSource::Take(int64_t n) {
  std::vector<int64_t> out;
  out.reserve(n);
  while (static_cast<int64_t>(out.size()) < n) {
    Piece& p = buffer_.front();
    const int64_t take = std::min<int64_t>(n - out.size(), p.tokens.size());
    out.insert(out.end(), p.tokens.begin(), p.tokens.begin() + take);
    cursor_.tokens_by_task[p.task] += take;
    for (int64_t i = 0; i < take; ++i)
      if (p.tokens[i] != ByteTokenizer::kEndOfDocument) ++cursor_.consumed_bytes;
    if (!last_fresh_.empty() && last_fresh_.back().index == p.index && last_fresh_.back().to == p.offset)
      last_fresh_.back().to += take;
    else
      last_fresh_.push_back({p.index, p.offset, p.offset + take});
    p.tokens.erase(p.tokens.begin(), p.tokens.begin() + take);
    p.offset += take;
    if (p.tokens.empty()) {
      if (trained_indexed_) trained_[p.task].push_back(p.index);
      buffer_.pop_front();
    }
  }
  if (buffer_.empty()) {
    cursor_.index = next_read_;
    cursor_.offset = 0;
  } else {
    cursor_.index = buffer_.front().index;
    cursor_.offset = buffer_.front().offset;
  }
  return torch::tensor(out);
}

Status BatchSource::Replay(int64_t count, int64_t n, const std::string& current, std::vector<torch::Tensor>* rows) {
  if (count <= 0 || cursor_.index <= 1) return Status::OK();
  if (!trained_indexed_) {
    if (Status st = spool_->TaskIndex(cursor_.index, &trained_); !st.ok()) return st;
    trained_indexed_ = true;
  }
  for (int64_t r = 0; r < count;) {
    // Listed for each row: ForgetPruned below shortens the lists, and may drop a task altogether.
    std::vector<const std::vector<uint64_t>*> tasks;
    for (const auto& [task, indices] : trained_)
      if (task != current && !indices.empty()) tasks.push_back(&indices);
    if (tasks.empty()) return Status::OK();  // nothing (left) to replay: fresh rows take the place
    const std::vector<uint64_t>& docs = *tasks[std::uniform_int_distribution<size_t>(0, tasks.size() - 1)(rng_)];
    std::vector<int64_t> tokens;
    uint64_t pruned = 0;
    for (size_t at = std::uniform_int_distribution<size_t>(0, docs.size() - 1)(rng_);
         static_cast<int64_t>(tokens.size()) < n && at < docs.size(); ++at) {
      SpoolEntry doc;
      Status st = spool_->Get(docs[at], &doc);
      if (st.code() == Status::Code::kNotFound && docs[at] < spool_->pruned_before()) {
        pruned = docs[at];
        break;
      }
      if (!st.ok()) return st;
      std::vector<int64_t> t = Tokens(doc.text, 0);
      tokens.insert(tokens.end(), t.begin(), t.end());
    }
    if (pruned) {  // its text was pruned after this index was made: forget it, draw this row again
      ForgetPruned(pruned);
      continue;
    }
    ++r;
    if (static_cast<int64_t>(tokens.size()) < n) continue;  // too little old text there yet
    std::uniform_int_distribution<size_t> start(0, tokens.size() - n);
    const size_t s = start(rng_);
    rows->push_back(torch::tensor(std::vector<int64_t>(tokens.begin() + s, tokens.begin() + s + n)));
  }
  return Status::OK();
}

void BatchSource::ForgetPruned(uint64_t missing) {
  const uint64_t first_kept = spool_->pruned_before();
  for (auto it = trained_.begin(); it != trained_.end();) {
    std::vector<uint64_t>& indices = it->second;  // ascending
    indices.erase(indices.begin(), std::lower_bound(indices.begin(), indices.end(), first_kept));
    // `missing` too, whatever pruned_before says (a prune still in progress): so each call
    // shrinks the lists, and Replay's retries end.
    if (auto at = std::lower_bound(indices.begin(), indices.end(), missing); at != indices.end() && *at == missing)
      indices.erase(at);
    it = indices.empty() ? trained_.erase(it) : std::next(it);
  }
}

torch::Tensor BatchSource::Next(int64_t batch, int64_t seq_len, double replay_ratio, bool allow_partial, Status* status,
                                int64_t* replayed_rows) {
  if (replayed_rows) *replayed_rows = 0;
  *status = Status::OK();
  last_fresh_.clear();
  const int64_t window = seq_len + 1;
  const int64_t replay = std::min<int64_t>(batch - 1, std::llround(batch * replay_ratio));
  if (Status st = Fill(batch * window); !st.ok()) {
    *status = st;
    return {};
  }
  const int64_t available = buffered_tokens() / window;
  if (available == 0 || (available < batch - replay && !allow_partial)) return {};
  std::vector<torch::Tensor> rows;
  if (Status st = Replay(replay, window, buffer_.front().task, &rows); !st.ok()) {
    *status = st;
    return {};
  }
  const int64_t fresh = batch - static_cast<int64_t>(rows.size());
  if (available < fresh && !allow_partial) return {};
  if (replayed_rows) *replayed_rows = static_cast<int64_t>(rows.size());
  for (int64_t i = 0; i < std::min(available, fresh); ++i) rows.push_back(Take(window));
  return torch::stack(rows);
}

}  // namespace peerd
