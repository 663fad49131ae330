// The training policy as the admin API shows and changes it (proto/admin.proto, Policy) and its
// mapping onto the training configuration. PUT /v1/policy, the checkpoint that records the policy
// and the restore that reads it back all go through these two functions, so a field is mapped
// once and a restored policy is the one that was set.
#pragma once

#include "experts_store/row_dtype.h"
#include "proto/admin.pb.h"
#include "proto/config.pb.h"

namespace peerd {

// `c` with the changes `policy` names; fields the policy leaves unset keep their value. A new
// `lr` pulls `min_lr` down to it when it was above (the schedule decays towards min_lr <= lr).
TrainConfig WithPolicy(TrainConfig c, const Policy& policy);

// The whole policy of a training configuration, every field set.
Policy PolicyOf(const TrainConfig& c, RowDtype freeze_dtype);

}  // namespace peerd
