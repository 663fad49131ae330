#include "service/batch_source.h"

#include "core/tokenizer.h"

namespace peerd {

namespace {

std::vector<int64_t> Tokens(const std::string& text, uint64_t from) {
  std::vector<int64_t> t;
  t.reserve(text.size() - std::min<size_t>(from, text.size()) + 1);
  for (size_t i = from; i < text.size(); ++i) t.push_back(static_cast<unsigned char>(text[i]));
  t.push_back(ByteTokenizer::kEndOfDocument);
  return t;
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
      buffer_.push_back({d.index, from, Tokens(d.text, from)});
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
    for (int64_t i = 0; i < take; ++i)
      if (p.tokens[i] != ByteTokenizer::kEndOfDocument) ++cursor_.consumed_bytes;
    p.tokens.erase(p.tokens.begin(), p.tokens.begin() + take);
    p.offset += take;
    if (p.tokens.empty()) buffer_.pop_front();
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

Status BatchSource::Replay(int64_t count, int64_t n, std::vector<torch::Tensor>* rows) {
  if (cursor_.index <= 1) return Status::OK();
  std::uniform_int_distribution<uint64_t> pick(1, cursor_.index - 1);
  for (int64_t r = 0; r < count; ++r) {
    std::vector<int64_t> tokens;
    for (uint64_t index = pick(rng_); static_cast<int64_t>(tokens.size()) < n && index < cursor_.index; ++index) {
      SpoolEntry doc;
      if (Status st = spool_->Get(index, &doc); !st.ok()) return st;
      std::vector<int64_t> t = Tokens(doc.text, 0);
      tokens.insert(tokens.end(), t.begin(), t.end());
    }
    if (static_cast<int64_t>(tokens.size()) < n) continue;  // too little old text yet
    std::uniform_int_distribution<size_t> start(0, tokens.size() - n);
    const size_t s = start(rng_);
    rows->push_back(torch::tensor(std::vector<int64_t>(tokens.begin() + s, tokens.begin() + s + n)));
  }
  return Status::OK();
}

torch::Tensor BatchSource::Next(int64_t batch, int64_t seq_len, double replay_ratio, bool allow_partial, Status* status,
                                int64_t* replayed_rows) {
  if (replayed_rows) *replayed_rows = 0;
  *status = Status::OK();
  const int64_t window = seq_len + 1;
  const int64_t replayed = std::min<int64_t>(batch - 1, std::llround(batch * replay_ratio));
  const int64_t fresh = batch - replayed;
  if (Status st = Fill(fresh * window); !st.ok()) {
    *status = st;
    return {};
  }
  const int64_t available = buffered_tokens() / window;
  if (available == 0 || (available < fresh && !allow_partial)) return {};
  std::vector<torch::Tensor> rows;
  if (Status st = Replay(replayed, window, &rows); !st.ok()) {
    *status = st;
    return {};
  }
  if (replayed_rows) *replayed_rows = static_cast<int64_t>(rows.size());
  for (int64_t i = 0; i < std::min(available, fresh); ++i) rows.push_back(Take(window));
  return torch::stack(rows);
}

}  // namespace peerd
