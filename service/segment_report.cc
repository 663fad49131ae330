#include "service/segment_report.h"

#include <map>

#include "experts_store/expert_store.h"
#include "experts_store/row_dtype.h"

namespace peerd {

void StartUsageRecording(TransformerLM& model) {
  for (auto& layer : model->PeerLayers()) layer->StartUsageRecording();
}

void CountUsageWhileScoring(TransformerLM& model, EvalOptions* o) {
  for (auto& layer : model->PeerLayers()) layer->StopUsageRecording();
  o->before_scoring = [&model] {
    for (auto& layer : model->PeerLayers()) layer->ResumeUsageRecording();
  };
  o->after_scoring = [&model] {
    for (auto& layer : model->PeerLayers()) layer->StopUsageRecording();
  };
}

UsageBySegment StopUsageRecording(TransformerLM& model) {
  UsageBySegment usage;
  auto layers = model->PeerLayers();
  for (size_t l = 0; l < layers.size(); ++l) {
    layers[l]->StopUsageRecording();
    for (size_t pos = 0; pos < layers[l]->segments().size(); ++pos) {
      torch::Tensor counts = layers[l]->UsageCounts(pos);
      if (!counts.defined()) continue;
      const double total = counts.sum().item<double>(), n = counts.numel();
      double kl = 0;
      if (total > 0) {
        torch::Tensor p = counts.to(torch::kDouble) / total;
        torch::Tensor used = p.masked_select(p > 0);
        kl = (used * (used * n).log()).sum().item<double>();
      }
      usage[{static_cast<uint32_t>(l), static_cast<uint32_t>(layers[l]->segments()[pos]->id())}] = {
          (counts > 0).sum().item<double>() / n, kl, total};
    }
  }
  return usage;
}

void AddSegmentShares(const UsageBySegment& usage, ScoreReply* reply) {
  std::map<uint32_t, double> layer_total;
  for (const auto& [key, u] : usage) layer_total[key.first] += u.retrievals;
  for (const auto& [key, u] : usage) {
    ScoreReply::SegmentShare* s = reply->add_segments();
    s->set_layer(key.first);
    s->set_id(key.second);
    s->set_share(layer_total[key.first] > 0 ? u.retrievals / layer_total[key.first] : 0);
  }
}

SegmentsReply DescribeSegments(TransformerLM& model, const std::vector<SegmentManifest>& manifests,
                               const UsageBySegment& usage) {
  SegmentsReply reply;
  auto layers = model->PeerLayers();
  for (size_t l = 0; l < layers.size(); ++l) {
    for (const auto& seg : layers[l]->segments()) {
      SegmentInfo* s = reply.add_segments();
      s->set_layer(static_cast<uint32_t>(l));
      s->set_id(static_cast<uint32_t>(seg->id()));
      s->set_frozen(seg->frozen());
      s->set_state(seg->frozen() ? "frozen" : "training");
      s->set_n_keys(static_cast<uint32_t>(seg->n_keys()));
      s->set_experts(seg->num_experts());
      s->set_resident(seg->resident());
      RowDtype dtype = seg->resident() && seg->down.scalar_type() == torch::kBFloat16 ? ROW_DTYPE_BF16 : ROW_DTYPE_FP32;
      for (const auto& m : manifests)
        if (m.layer() == l && m.segment() == seg->id()) {
          dtype = m.dtype();
          s->set_checksum(m.checksum());
          s->set_frozen_at_step(m.frozen_at_step());
        }
      s->set_dtype(RowDtypeName(dtype));
      s->set_bytes(uint64_t(seg->num_experts()) * ExpertStore::RowBytes(dtype, static_cast<uint32_t>(seg->d_model())));
      if (auto u = usage.find({static_cast<uint32_t>(l), static_cast<uint32_t>(seg->id())}); u != usage.end()) {
        s->set_usage(u->second.share_used);
        s->set_usage_kl(u->second.kl_from_uniform);
      }
    }
  }
  return reply;
}

}  // namespace peerd
