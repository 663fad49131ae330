#include "service/metrics_text.h"

#include <sstream>

namespace peerd {

std::string TrainingMetricsText(const StatusReply& s, const RowCache::Stats& cache) {
  std::ostringstream m;
  m << "# TYPE peerd_step counter\npeerd_step " << s.step() << "\n";
  m << "# TYPE peerd_tokens_trained_total counter\npeerd_tokens_trained_total " << s.tokens_trained() << "\n";
  m << "# TYPE peerd_loss gauge\npeerd_loss " << s.recent_loss() << "\n";
  m << "# TYPE peerd_tokens_per_second gauge\npeerd_tokens_per_second " << s.tokens_per_second() << "\n";
  m << "# TYPE peerd_spool_bytes gauge\npeerd_spool_bytes " << s.spool_bytes() << "\n";
  m << "# TYPE peerd_spool_backlog_bytes gauge\npeerd_spool_backlog_bytes " << s.spool_backlog_bytes() << "\n";
  m << "# TYPE peerd_spool_documents gauge\npeerd_spool_documents " << s.spool_documents() << "\n";
  m << "# TYPE peerd_segments gauge\n";
  int training = 0, frozen = 0;
  for (const auto& seg : s.segments()) (seg.frozen() ? frozen : training)++;
  m << "peerd_segments{state=\"training\"} " << training << "\npeerd_segments{state=\"frozen\"} " << frozen << "\n";
  m << "# TYPE peerd_segment_bytes gauge\n";
  for (const auto& seg : s.segments())
    m << "peerd_segment_bytes{layer=\"" << seg.layer() << "\",segment=\"" << seg.id() << "\"} " << seg.bytes() << "\n";
  m << "# TYPE peerd_segment_usage gauge\n";
  for (const auto& seg : s.segments())
    m << "peerd_segment_usage{layer=\"" << seg.layer() << "\",segment=\"" << seg.id() << "\"} " << seg.usage() << "\n";
  if (s.world_size() > 1) {
    m << "# TYPE peerd_world_size gauge\npeerd_world_size " << s.world_size() << "\n";
    m << "# TYPE peerd_ranks_agree gauge\npeerd_ranks_agree " << (s.ranks_agree() ? 1 : 0) << "\n";
    m << "# TYPE peerd_collective_seconds_per_step gauge\npeerd_collective_seconds_per_step "
      << s.collective_seconds_per_step() << "\n";
  }
  const double lookups = double(cache.hits + cache.misses);
  m << "# TYPE peerd_cache_hit_ratio gauge\npeerd_cache_hit_ratio " << (lookups > 0 ? cache.hits / lookups : 0) << "\n";
  return m.str();
}

}  // namespace peerd
