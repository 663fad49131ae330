#include "service/export.h"

#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include <cstring>

namespace peerd {

namespace {

const char* SafetensorsDtype(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat: return "F32";
    case torch::kBFloat16: return "BF16";
    case torch::kHalf: return "F16";
    case torch::kDouble: return "F64";
    case torch::kLong: return "I64";
    default: return nullptr;
  }
}

}  // namespace

Status ExportedTensors(const torch::nn::Module& model, NamedTensors* out) {
  out->clear();
  auto add = [&](const std::string& name, const torch::Tensor& t) -> Status {
    if (!t.defined())
      return Status::InvalidArgument(name + " is not held in memory (cached residency): export needs every row "
                                     "resident; restart peerd with --residency resident to export");
    if (!SafetensorsDtype(t.scalar_type()))
      return Status::InvalidArgument(name + " has a dtype an export cannot hold: " +
                                     std::string(c10::toString(t.scalar_type())));
    out->emplace_back(name, t);
    return Status::OK();
  };
  for (const auto& p : model.named_parameters())
    if (Status st = add(p.key(), p.value()); !st.ok()) return st;
  for (const auto& b : model.named_buffers()) {
    const std::string& name = b.key();
    if (name.size() >= 10 && name.compare(name.size() - 10, 10, ".attn.mask") == 0) continue;
    if (Status st = add(name, b.value()); !st.ok()) return st;
  }
  return Status::OK();
}

Status WriteSafetensors(const NamedTensors& tensors, ExportManifest manifest,
                        const std::function<bool(const char* data, size_t size)>& write) {
  manifest.clear_tensors();
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", SafetensorsDtype(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    manifest.add_tensors(name);
  }
  std::string manifest_json;
  if (!google::protobuf::util::MessageToJsonString(manifest, &manifest_json).ok())
    return Status::InvalidArgument("the export manifest cannot be written as JSON");
  header["__metadata__"] = {{"peerd", manifest_json}};
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<char>((uint64_t{text.size()} >> (8 * i)) & 0xff);
  auto fail = [] { return Status::IOError("the export's reader went away before the end"); };
  if (!write(length, 8) || !write(text.data(), text.size())) return fail();
  for (const auto& [name, t] : tensors) {
    const torch::Tensor c = t.detach().to(torch::kCPU).contiguous();  // little-endian: this machine's order
    const char* data = static_cast<const char*>(c.data_ptr());
    const size_t bytes = static_cast<size_t>(c.numel()) * c.element_size();
    for (size_t at = 0; at < bytes; at += size_t{1} << 20)
      if (!write(data + at, std::min(bytes - at, size_t{1} << 20))) return fail();
  }
  return Status::OK();
}

}  // namespace peerd
