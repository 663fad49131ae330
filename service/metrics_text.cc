#include "service/metrics_text.h"

#include <cmath>
#include <cstdio>

namespace peerd {

namespace {

// A label value with \, " and newline escaped, as the format requires.
std::string Escaped(std::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

std::string Number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char b[32];
  if (v == std::floor(v) && std::abs(v) < 1e15)
    std::snprintf(b, sizeof b, "%.0f", v);
  else
    std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

}  // namespace

void PrometheusText::Family(const std::string& name, const char* type, const std::string& help) {
  family_ = name;
  text_ += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void PrometheusText::Sample(double value, const Labels& labels, const char* suffix) {
  text_ += family_ + suffix;
  if (!labels.empty()) {
    text_ += "{";
    for (size_t i = 0; i < labels.size(); ++i)
      text_ += (i ? "," : "") + labels[i].first + "=\"" + Escaped(labels[i].second) + "\"";
    text_ += "}";
  }
  text_ += " " + Number(value) + "\n";
}

void PrometheusText::Counter(const std::string& name, const std::string& help, double value) {
  Family(name, "counter", help);
  Sample(value);
}

void PrometheusText::Gauge(const std::string& name, const std::string& help, double value) {
  Family(name, "gauge", help);
  Sample(value);
}

void StepTimeHistogram::Observe(double seconds) {
  size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  if (i < kBounds.size()) counts[i]++;
  count++;
  sum += seconds;
}

void StepTimeHistogram::WriteTo(PrometheusText* out, const std::string& name, const std::string& help) const {
  out->Family(name, "histogram", help);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kBounds.size(); ++i) {
    cumulative += counts[i];
    char le[32];
    std::snprintf(le, sizeof le, "%g", kBounds[i]);
    out->Sample(double(cumulative), {{"le", le}}, "_bucket");
  }
  out->Sample(double(count), {{"le", "+Inf"}}, "_bucket");
  out->Sample(sum, {}, "_sum");
  out->Sample(double(count), {}, "_count");
}

void WriteTrainingMetrics(const TrainingMetrics& m, PrometheusText* out) {
  const StatusReply& s = m.status;
  out->Counter("peerd_training_steps_total", "Optimizer steps taken since the data directory was created.",
               double(s.step()));
  out->Counter("peerd_trained_tokens_total", "Tokens trained (fresh and replayed), all time.",
               double(s.tokens_trained()));
  out->Gauge("peerd_training_loss", "Mean training cross-entropy over the last logged window, nats per token.",
             s.recent_loss());
  out->Gauge("peerd_training_bits_per_byte", "The same loss in bits per byte.", s.recent_bits_per_byte());
  out->Gauge("peerd_learning_rate", "The learning rate of the next step.", s.learning_rate());
  out->Gauge("peerd_training_tokens_per_second", "Training speed over the last logged window.", s.tokens_per_second());
  m.step_seconds.WriteTo(out, "peerd_training_step_seconds", "Time of each training step since peerd started.");
  out->Gauge("peerd_training_stopped", "1 while training is stopped by an error (see /v1/status), else 0.",
             s.training_error().empty() ? 0 : 1);
  out->Gauge("peerd_training_paused", "1 while training is paused, else 0.", s.paused() ? 1 : 0);
  out->Gauge("peerd_last_checkpoint_step", "The step of the last checkpoint written.",
             double(s.last_checkpoint_step()));
  out->Gauge("peerd_checkpoint_failing", "1 while the last checkpoint failed (see /v1/status), else 0.",
             s.checkpoint_error().empty() ? 0 : 1);

  out->Counter("peerd_spool_documents_total", "Documents the spool acknowledged, all time.",
               double(s.spool_documents()));
  out->Counter("peerd_spool_received_bytes_total", "Text bytes the spool acknowledged, all time.",
               double(s.spool_bytes()));
  out->Gauge("peerd_spool_backlog_bytes", "Spooled text not yet trained.", double(s.spool_backlog_bytes()));
  out->Gauge("peerd_spool_backlog_documents", "Spooled documents not yet wholly trained.",
             double(s.spool_backlog_documents()));
  out->Gauge("peerd_spool_kept_bytes", "Text bytes the spool holds now.", double(s.spool_kept_bytes()));
  out->Gauge("peerd_ingest_stopped", "1 while the spool cannot acknowledge documents (see /v1/status), else 0.",
             s.ingest_error().empty() ? 0 : 1);

  out->Family("peerd_segments", "gauge", "Expert segments by state, over all PEER layers.");
  int training = 0, frozen = 0;
  for (const auto& seg : s.segments()) (seg.frozen() ? frozen : training)++;
  out->Sample(training, {{"state", "training"}});
  out->Sample(frozen, {{"state", "frozen"}});
  out->Family("peerd_segment_bytes", "gauge", "Row bytes of each segment (in memory or in the store).");
  for (const auto& seg : s.segments())
    out->Sample(double(seg.bytes()), {{"layer", std::to_string(seg.layer())}, {"segment", std::to_string(seg.id())}});
  out->Family("peerd_segment_usage_ratio", "gauge",
              "Share of each segment's experts retrieved at least once in the last evaluation.");
  for (const auto& seg : s.segments())
    out->Sample(seg.usage(), {{"layer", std::to_string(seg.layer())}, {"segment", std::to_string(seg.id())}});
  out->Gauge("peerd_parameters", "Parameters of the model.", double(s.total_parameters()));
  out->Gauge("peerd_active_parameters", "Parameters used per token.", double(s.active_parameters()));

  out->Counter("peerd_row_cache_hits_total", "Frozen-row reads answered by the row cache (cached residency).",
               double(m.cache.hits));
  out->Counter("peerd_row_cache_misses_total", "Frozen-row reads that went to the store (cached residency).",
               double(m.cache.misses));
  out->Gauge("peerd_row_cache_bytes", "Bytes the row cache holds.", double(m.cache.usage_bytes));

  if (s.world_size() > 1) {
    out->Gauge("peerd_world_size", "Ranks of the data-parallel job.", s.world_size());
    out->Gauge("peerd_ranks_agree", "1 when every rank's model digest equals rank 0's at the last comparison.",
               s.ranks_agree() ? 1 : 0);
    out->Gauge("peerd_collective_seconds_per_step", "Rank 0's time per step in collectives since start.",
               s.collective_seconds_per_step());
  }

  // The latest evaluation: a gauge per held-out task, and the forgetting metrics over all rows.
  if (m.report.rows_size() > 0) {
    const EvalRow& last = m.report.rows(m.report.rows_size() - 1);
    out->Family("peerd_task_bits_per_byte", "gauge", "Held-out bits per byte of each task at the last evaluation.");
    for (int i = 0; i < last.tasks_size() && i < last.bits_per_byte_size(); ++i)
      out->Sample(last.bits_per_byte(i), {{"task", last.tasks(i)}});
    out->Gauge("peerd_eval_step", "The step of the last evaluation.", double(last.step()));
    out->Gauge("peerd_eval_acc_bits_per_byte", "ACC: mean held-out bits per byte of the last evaluation.",
               m.report.acc());
    out->Gauge("peerd_eval_bwt_bits_per_byte", "BWT: backward transfer (negative: forgetting).", m.report.bwt());
    out->Gauge("peerd_eval_mean_forgetting_bits_per_byte",
               "Mean forgetting of the tasks trained before the last phase.", m.report.mean_forgetting());
  }
}

}  // namespace peerd
