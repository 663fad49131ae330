#include "service/policy.h"

#include <algorithm>

namespace peerd {

TrainConfig WithPolicy(TrainConfig c, const Policy& policy) {
  if (policy.train_groups_size()) {
    c.clear_train_groups();
    for (const auto& g : policy.train_groups()) c.add_train_groups(g);
  }
  if (policy.has_replay_ratio()) c.set_replay_ratio(static_cast<float>(policy.replay_ratio()));
  if (policy.has_distill_weight()) c.set_distill_weight(static_cast<float>(policy.distill_weight()));
  if (policy.has_lr()) {
    c.set_lr(static_cast<float>(policy.lr()));
    c.set_min_lr(std::min(c.min_lr(), c.lr()));
  }
  if (policy.has_routed()) c.set_routed(policy.routed());
  if (policy.has_keep_trained_text()) c.set_keep_trained_text(policy.keep_trained_text());
  if (policy.has_route_candidates()) c.set_route_candidates(policy.route_candidates());
  return c;
}

Policy PolicyOf(const TrainConfig& c, RowDtype freeze_dtype) {
  Policy p;
  for (const auto& g : c.train_groups()) p.add_train_groups(g);
  p.set_replay_ratio(c.replay_ratio());
  p.set_lr(c.lr());
  p.set_distill_weight(c.distill_weight());
  p.set_freeze_dtype(RowDtypeName(freeze_dtype));
  p.set_routed(c.routed());
  p.set_keep_trained_text(c.keep_trained_text());
  p.set_route_candidates(c.route_candidates());
  return p;
}

}  // namespace peerd
