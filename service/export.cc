#include "service/export.h"

#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

namespace peerd {

namespace {

const char* SafetensorsDtype(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat: return "F32";
    case torch::kBFloat16: return "BF16";
    case torch::kHalf: return "F16";
    case torch::kDouble: return "F64";
    case torch::kLong: return "I64";
    case torch::kByte: return "U8";
    default: return nullptr;
  }
}

torch::ScalarType FromSafetensorsDtype(const std::string& name, bool* ok) {
  *ok = true;
  if (name == "F32") return torch::kFloat;
  if (name == "BF16") return torch::kBFloat16;
  if (name == "F16") return torch::kHalf;
  if (name == "F64") return torch::kDouble;
  if (name == "I64") return torch::kLong;
  if (name == "U8") return torch::kByte;
  *ok = false;
  return torch::kFloat;
}

}  // namespace

bool DefinedByTheArchitecture(const std::string& name) {
  constexpr std::string_view kMask = ".attn.mask";
  return name.size() >= kMask.size() && name.compare(name.size() - kMask.size(), kMask.size(), kMask) == 0;
}

Status ExportedTensors(const torch::nn::Module& model, NamedTensors* out) {
  out->clear();
  auto add = [&](const std::string& name, const torch::Tensor& t) -> Status {
    if (!t.defined())
      return Status::InvalidArgument(name +
                                     " is not held in memory (cached residency): export needs every row "
                                     "resident; restart peerd with --residency resident to export");
    if (!SafetensorsDtype(t.scalar_type()))
      return Status::InvalidArgument(
          name + " has a dtype an export cannot hold: " + std::string(c10::toString(t.scalar_type())));
    out->emplace_back(name, t);
    return Status::OK();
  };
  for (const auto& p : model.named_parameters())
    if (Status st = add(p.key(), p.value()); !st.ok()) return st;
  for (const auto& b : model.named_buffers())
    if (!DefinedByTheArchitecture(b.key()))
      if (Status st = add(b.key(), b.value()); !st.ok()) return st;
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

Status ReadExport(const std::string& dir, ExportManifest* manifest, NamedTensors* tensors) {
  const std::string path = dir + "/model.safetensors";
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument(path + " is not a peerd export: " + why + " (write one with peerctl export DIR)");
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::InvalidArgument("cannot read " + path + ": " + std::strerror(errno));
  std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (file.size() < 8) return bad("shorter than its header length");
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = header_bytes << 8 | static_cast<unsigned char>(file[i]);
  if (header_bytes > file.size() - 8) return bad("its header runs past the end of the file");
  const nlohmann::json header = nlohmann::json::parse(file.substr(8, header_bytes), nullptr, false);
  if (!header.is_object()) return bad("its header is not a JSON object");
  const auto meta = header.find("__metadata__");
  if (meta == header.end() || !meta->is_object() || !meta->contains("peerd") || !(*meta)["peerd"].is_string())
    return bad("its header has no peerd manifest");
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  if (!google::protobuf::util::JsonStringToMessage((*meta)["peerd"].get<std::string>(), manifest, options).ok())
    return bad("its manifest is unreadable");
  if (manifest->format() != "peerd-export-1") return bad("format '" + manifest->format() + "', not peerd-export-1");
  const uint64_t data_start = 8 + header_bytes, data_bytes = file.size() - data_start;
  tensors->clear();
  for (const std::string& name : manifest->tensors()) {
    const auto entry = header.find(name);
    if (entry == header.end() || !entry->is_object())
      return bad("the manifest names " + name + ", the header does not");
    bool known = false;
    const torch::ScalarType dtype = FromSafetensorsDtype(entry->value("dtype", ""), &known);
    const auto& shape = (*entry)["shape"];
    const auto& offsets = (*entry)["data_offsets"];
    if (!known || !shape.is_array() || !offsets.is_array() || offsets.size() != 2)
      return bad(name + " has an unknown dtype or no shape and offsets");
    std::vector<int64_t> sizes;
    int64_t numel = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 40)) return bad(name + " has a bad shape");
      sizes.push_back(d.get<int64_t>());
      numel *= sizes.back();
    }
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    torch::Tensor t = torch::empty(sizes, torch::TensorOptions().dtype(dtype));
    if (begin > end || end > data_bytes || end - begin != static_cast<uint64_t>(numel) * t.element_size())
      return bad(name + "'s bytes do not match its shape or lie outside the file");
    std::memcpy(t.data_ptr(), file.data() + data_start + begin, end - begin);
    tensors->emplace_back(name, t);
  }
  return Status::OK();
}

}  // namespace peerd
