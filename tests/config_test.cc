// Configuration: defaults, merging, and rejection of bad values with a message naming the field.
#include <gtest/gtest.h>

#include <cctype>
#include <fstream>

#include "core/config.h"

namespace peerd {
namespace {

TEST(Config, DefaultsAreValid) { EXPECT_TRUE(ValidateConfig(DefaultConfig()).ok()); }

TEST(Config, OmittedFieldsKeepDefaultsAndGivenFieldsReplaceThem) {
  Config c;
  ASSERT_TRUE(ParseConfigJson(R"({"model": {"dModel": 64, "peerBlocks": [0]}, "train": {"lr": 0.01}})", &c).ok());
  EXPECT_EQ(c.model().d_model(), 64u);
  ASSERT_EQ(c.model().peer_blocks_size(), 1);
  EXPECT_EQ(c.model().peer_blocks(0), 0u);
  EXPECT_FLOAT_EQ(c.train().lr(), 0.01f);
  EXPECT_EQ(c.model().peer().topk(), DefaultConfig().model().peer().topk());
  EXPECT_EQ(c.train().steps(), DefaultConfig().train().steps());
}

struct BadConfig {
  const char* json;
  const char* field;  // the message must name it
};

class ConfigRejects : public ::testing::TestWithParam<BadConfig> {};

TEST_P(ConfigRejects, WithMessageNamingTheField) {
  Config c = DefaultConfig();
  const uint32_t before = c.model().d_model();
  Status st = ParseConfigJson(GetParam().json, &c);
  ASSERT_FALSE(st.ok()) << GetParam().json;
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find(GetParam().field), std::string::npos) << st.message();
  EXPECT_EQ(c.model().d_model(), before) << "a rejected config must leave the output untouched";
}

INSTANTIATE_TEST_SUITE_P(
    Catalogue, ConfigRejects,
    ::testing::Values(BadConfig{R"({"model": {"peer": {"nKeys": 0}}})", "model.peer.nKeys"},
                      BadConfig{R"({"model": {"peer": {"queryDim": 63}}})", "model.peer.queryDim"},
                      BadConfig{R"({"model": {"peer": {"nKeys": 8, "topk": 9}}})", "model.peer.topk"},
                      BadConfig{R"({"model": {"peer": {"topk": 0}}})", "model.peer.topk"},
                      BadConfig{R"({"model": {"peer": {"heads": 0}}})", "model.peer.heads"},
                      BadConfig{R"({"train": {"lr": -0.001}})", "train.lr"},
                      BadConfig{R"({"train": {"lr": 0.001, "minLr": 0.01}})", "train.minLr"},
                      BadConfig{R"({"train": {"trainGroups": ["everything"]}})", "train.trainGroups"},
                      BadConfig{R"({"model": {"dModel": 100, "nHeads": 3}})", "model.nHeads"},
                      BadConfig{R"({"model": {"nLayers": 2, "peerBlocks": [5]}})", "model.peerBlocks"},
                      BadConfig{R"({"model": {"nLayers": 0}})", "model.nLayers"},
                      BadConfig{R"({"model": {"dModle": 64}})", "dModle"},            // misspelt: unknown field
                      BadConfig{R"({"model": {"dModel": "big"}})", "model.d_model"},  // wrong type
                      BadConfig{R"({"model": {"dModel": 64)", "not valid JSON"},      // unreadable JSON
                      BadConfig{R"({"train": {"adapterRank": -1}})", "train.adapterRank"},
                      BadConfig{R"({"train": {"trunkDeltaLrScale": -1}})", "train.trunkDeltaLrScale"},
                      BadConfig{R"({"train": {"routed": true, "replayRatio": 0.25}})", "train.routed"},
                      BadConfig{R"({"model": {"ffn": "FFN_KIND_DENSE"}, "train": {"routed": true, "replayRatio": 0}})",
                                "train.routed"},
                      BadConfig{R"({"train": {"keepTrainedText": false, "replayRatio": 0.25}})",
                                "train.keepTrainedText"},
                      BadConfig{R"({"train": {"routeCandidates": 65}})", "train.routeCandidates"},
                      BadConfig{R"({"train": {"routeCandidates": 1}})", "train.routeCandidates"}),
    [](const ::testing::TestParamInfo<BadConfig>& info) {
      std::string name = std::to_string(info.index) + "_";
      for (const char* c = info.param.field; *c; ++c) name += std::isalnum(*c) ? *c : '_';
      return name;
    });

TEST(Config, UnreadableFileIsAnIOErrorNamingThePath) {
  Config c;
  Status st = LoadConfigFile("/nonexistent/peerd.json", &c);
  EXPECT_EQ(st.code(), Status::Code::kIOError);
  EXPECT_NE(st.message().find("/nonexistent/peerd.json"), std::string::npos);
}

TEST(Config, FileErrorsNameTheFileAndTheField) {
  const std::string path = ::testing::TempDir() + "/bad_config.json";
  std::ofstream(path) << R"({"train": {"lr": -1}})";
  Config c;
  Status st = LoadConfigFile(path, &c);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find(path), std::string::npos);
  EXPECT_NE(st.message().find("train.lr"), std::string::npos);
}

}  // namespace
}  // namespace peerd
