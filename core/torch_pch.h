// Precompiled header for the targets that use LibTorch (<torch/torch.h> costs ~20 s per
// translation unit; precompiled, it is paid once per target).
#pragma once
#include <torch/torch.h>
