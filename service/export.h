// The model as a safetensors file (https://github.com/huggingface/safetensors: an 8-byte
// little-endian header length, a JSON header naming each tensor's dtype, shape and byte range,
// then the bytes), written a tensor at a time so that no second copy of the model is held.
// The header's "__metadata__" holds {"peerd": ExportManifest as JSON}. A routed model's router
// travels as the tensor kRouterTensor.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "proto/export.pb.h"

namespace peerd {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// The tensor a routed model's router travels as (uint8: BigramRouter::Serialize's bytes).
inline constexpr char kRouterTensor[] = "router.statistics";

// Whether buffer `name` is a constant the architecture defines (an attention mask), which an
// export leaves out and an import does not look for.
bool DefinedByTheArchitecture(const std::string& name);

// Every parameter and buffer of `model` by its module name (frozen rows in their stored dtype),
// but the attention masks (constants the architecture defines). InvalidArgument for a tensor of a
// dtype safetensors cannot name here, or rows not held in memory.
Status ExportedTensors(const torch::nn::Module& model, NamedTensors* out);

// Writes the safetensors file of `tensors` with `manifest` (its `tensors` filled in here) through
// `write` (false: the reader is gone, stop). IOError when a write fails.
Status WriteSafetensors(const NamedTensors& tensors, ExportManifest manifest,
                        const std::function<bool(const char* data, size_t size)>& write);

// Reads what `peerctl export DIR` wrote: DIR/model.safetensors, its tensors and the manifest in
// its header (DIR/config.json is the same manifest, for people and other tools). InvalidArgument,
// naming the file, for anything that is not such an export.
Status ReadExport(const std::string& dir, ExportManifest* manifest, NamedTensors* tensors);

}  // namespace peerd
