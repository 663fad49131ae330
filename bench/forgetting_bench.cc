#include "bench/forgetting_bench.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <sstream>

#include "bench/json_lines.h"
#include "core/check_ok.h"
#include "core/config.h"
#include "core/evaluator.h"
#include "core/forgetting.h"
#include "core/model.h"
#include "core/routed_branches.h"
#include "core/runtime.h"
#include "core/text_batcher.h"
#include "core/text_file.h"
#include "core/trainer.h"

namespace peerd::bench {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Domain {
  std::string name, train, heldout;
};

struct Policy {
  std::string name;
  bool peer = false;    // PEER model (else the dense-FFN baseline)
  bool grow = false;    // a new segment per domain, the previous one frozen
  bool recipe = false;  // replay of earlier text + distillation towards the previous model
  bool routed = false;  // routing isolation: after the base phase only the new segment and its
                        // adapter train; a text runs the base or one domain's segment and adapter,
                        // chosen by the bigram router (core/text_router.h)
  double replay = -1;   // recipe: this share of each batch replayed instead of the config's
  double width = 1;     // dense: FFN width as a multiple of the matched one (--dense-widths)
  // Reference rows (--reference), dense, after the same base phase: `joint` trains on all streamed
  // domains at once (every row of a batch from a random domain, the stream's steps in all: the
  // upper bound of sharing); `oracle` fine-tunes one copy of the base per domain and scores each
  // task with its own model (the upper bound of isolation).
  bool joint = false, oracle = false;
};

const Policy kPolicies[] = {{"dense", false, false, false, false},
                            {"dense+recipe", false, false, true, false},
                            {"peer-all", true, false, false, false},
                            {"freeze-grow", true, true, false, false},
                            {"freeze-grow+recipe", true, true, true, false},
                            {"routed", true, true, false, true},
                            // Replayed rows train the new branch (the only one that trains), distilled towards the
                            // branch trained before: the recipe's budget spent on a routed pool.
                            {"routed+recipe", true, true, true, true}};
const Policy kReferences[] = {{"joint", false, false, false, false, -1, true, false},
                              {"oracle", false, false, false, false, -1, false, true}};

// One phase of the stream: a domain (an index into the tasks) trained for `steps` steps.
struct Phase {
  int task = 0;
  uint32_t steps = 0;
  bool pretrain = false;  // the broad base phase before the stream
};

// Steps per streamed domain unless --steps says otherwise; the base phase's schedule always spans this.
constexpr uint32_t kDefaultPhaseSteps = 150;

struct Knobs {
  Config base;                         // the PEER model and training (per domain: train.steps steps;
                                       // the recipe's replay share and distillation weight)
  uint32_t dense_hidden = 0;           // the dense baseline's FFN width (equal active parameters)
  float stream_lr = 0;                 // peak learning rate of the streamed phases (0: the config's)
  uint32_t config_warmup_steps = 0;    // the configuration's warmup, before a phase's length caps it
  TrainConfig later;                   // freeze-grow's training policy from the second domain on
  int64_t adapter_rank = 32;           // routed: rank of each segment's adapter (SegmentAdapterImpl::kFullRank: full)
  float adapter_lr_scale = 10;         // routed: learning-rate multiplier of the new segment's adapter
  float trunk_delta_lr_scale = 3;      // routed: … of its deltas of embeddings, norms and biases
  std::string seed_branch = "latest";  // routed: what a new branch starts as a copy of: the branch
                                       // trained last ("latest"), the old one that predicts its
                                       // first 4 KB best ("nearest"), or the base ("base")
  bool trunk_deltas = true;            // routed: adapters own deltas of the embeddings, norms and biases
  int64_t route_context = 0;           // routed: bytes before a window its route is chosen from (0: train.routeContext)
  bool route_by_model = false;         // routed: choose among branches by the model's likelihood of that
                                       // context (EvalOptions::candidates) instead of by the bigram router
  uint32_t route_candidates = 0;       // route_by_model: branches a text chooses among (RoutedBranches::
                                       // Candidates; 0: every branch)
  uint32_t routed_n_keys = 0;          // routed: sub-keys per half of its segments (0: the config's)
  int64_t eval_bytes = 0;
  uint32_t curve_every = 0;    // every this many steps of a streamed phase, score its domain (0: never)
  bool branch_scores = false;  // routed: at the end, score every task under every branch's route
  bool verbose = true;
};

// "name" (a folder of `corpus_dir`), "path/to/folder" (with train.txt and heldout.txt), or
// "name=TRAIN_FILE:HELDOUT_FILE".
Status LoadDomain(const std::string& spec, const std::string& corpus_dir, size_t train_bytes, Domain* d) {
  std::string train_path, heldout_path;
  if (auto eq = spec.find('='); eq != std::string::npos) {
    d->name = spec.substr(0, eq);
    const std::string files = spec.substr(eq + 1);
    const auto colon = files.find(':');
    if (colon == std::string::npos)
      return Status::InvalidArgument("domain '" + spec + "': write NAME=TRAIN_FILE:HELDOUT_FILE");
    train_path = files.substr(0, colon);
    heldout_path = files.substr(colon + 1);
  } else {
    const std::string dir = spec.find('/') != std::string::npos ? spec : corpus_dir + "/" + spec;
    d->name = std::filesystem::path(dir).filename().string();
    train_path = dir + "/train.txt";
    heldout_path = dir + "/heldout.txt";
  }
  if (Status st = ReadTextFile(train_path, &d->train); !st.ok())
    return Status::IOError(st.message() + " (the six domains: scripts/corpora.sh all)");
  if (Status st = ReadTextFile(heldout_path, &d->heldout); !st.ok()) return st;
  if (train_bytes > 0 && d->train.size() > train_bytes) d->train.resize(train_bytes);
  return Status::OK();
}

// The dense FFN width that gives the dense model the PEER model's active parameters per token with
// `segments` segments per PEER layer (and, with adapter_rank >= 0, one segment's adapter, which is
// what a routed token runs). Every segment's sub-keys count as active, as if all were scored for
// every token (a routed token scores two segments' only): matching the final, grown pool this
// way is the comparison least kind to PEER.
uint32_t MatchingDenseHidden(const ModelConfig& peer_model, size_t segments, int64_t adapter_rank, bool trunk_deltas) {
  ModelConfig grown = peer_model;
  grown.mutable_peer()->set_initial_segments(static_cast<uint32_t>(segments));
  TransformerLM grown_model(grown);
  if (adapter_rank >= 0) CheckOk(grown_model->AddAdapter(0, adapter_rank, trunk_deltas));
  const int64_t target = grown_model->ActiveParameters();
  ModelConfig m = peer_model;
  m.set_ffn(FFN_KIND_DENSE);
  auto active = [&](uint32_t h) {
    m.set_dense_hidden(h);
    return TransformerLM(m)->ActiveParameters();
  };
  const int64_t a1 = active(1), slope = active(2) - a1;  // every block's FFN grows with the width
  return static_cast<uint32_t>(std::max<int64_t>(1, std::llround(static_cast<double>(target - a1) / slope) + 1));
}

std::vector<double> EvaluateAll(TransformerLM& model, const std::vector<Domain>& domains, const EvalOptions& o) {
  std::vector<double> row;
  for (const Domain& d : domains) row.push_back(BitsPerByte(model, d.heldout, o));
  return row;
}

// Per task: the share of its held-out windows (of `context` bytes, routed as `o` says) that the
// router sends to `expected[task]`'s branch.
std::vector<double> RoutingAccuracy(const RoutedBranches& r, const std::vector<Domain>& tasks,
                                    const std::vector<int64_t>& expected, const EvalOptions& o, int64_t context) {
  std::vector<double> out;
  for (size_t j = 0; j < tasks.size(); ++j) {
    const std::string& text = tasks[j].heldout;
    const int64_t n = o.max_bytes > 0 ? std::min<int64_t>(o.max_bytes, text.size()) : text.size();
    int64_t right = 0, windows = 0;
    for (int64_t start = 0; start + 1 < n; start += context, ++windows) {
      const int64_t from = std::max<int64_t>(0, start - o.route_context);
      right += r.Choose(std::string_view(text).substr(from, start + 1 - from)) == expected[j];
    }
    out.push_back(windows ? static_cast<double>(right) / windows : 0.0);
  }
  return out;
}

// RoutingAccuracy when the model chooses the routes (EvalOptions::candidates): the share of each
// task's windows that ran its branch.
std::vector<double> ModelRoutingAccuracy(TransformerLM& model, const RoutedBranches& r,
                                         const std::vector<Domain>& tasks, const std::vector<int64_t>& expected,
                                         const EvalOptions& o) {
  std::vector<double> out;
  for (size_t j = 0; j < tasks.size(); ++j) {
    const TextScore score = ScoreText(model, tasks[j].heldout, o);
    const Route want = r.RouteOf(expected[j]);
    int64_t right = 0;
    for (size_t c : score.chosen) {
      const Route& ran = score.candidates[c];
      right += ran.adapter == want.adapter && ran.segments == want.segments;
    }
    out.push_back(score.chosen.empty() ? 0.0 : static_cast<double>(right) / score.chosen.size());
  }
  return out;
}

// Freezes every training segment (and so its adapter) and adds a fresh segment to every PEER layer;
// *id is the new segments' id (the same in every layer: they grow in step).
Status GrowAll(Trainer& trainer, uint32_t n_keys, int64_t* id) {
  auto layers = trainer.model()->PeerLayers();
  for (size_t l = 0; l < layers.size(); ++l) {
    std::vector<int64_t> training;
    for (const auto& s : layers[l]->segments())
      if (!s->frozen()) training.push_back(s->id());
    for (int64_t s : training)
      if (Status st = trainer.FreezeSegment(l, s); !st.ok()) return st;
    int64_t added = -1;
    if (Status st = trainer.AddSegment(l, n_keys, &added); !st.ok()) return st;
    if (l > 0 && added != *id) return Status::FailedPrecondition("PEER layers grew out of step");
    *id = added;
  }
  return Status::OK();
}

json RunPolicy(const Policy& p, const std::vector<Domain>& tasks, const std::vector<Phase>& stream, const Knobs& k) {
  const auto start = Clock::now();
  std::vector<int> streamed_tasks;  // the tasks the stream trains (not the base phase's)
  for (const Phase& ph : stream)
    if (!ph.pretrain && std::find(streamed_tasks.begin(), streamed_tasks.end(), ph.task) == streamed_tasks.end())
      streamed_tasks.push_back(ph.task);
  std::vector<Phase> phases = stream;
  if (p.joint) {  // the base phase, then one phase of the stream's steps over all its domains
    uint32_t total = 0;
    phases.clear();
    for (const Phase& ph : stream) (ph.pretrain ? phases.push_back(ph) : void(total += ph.steps));
    phases.push_back({-1, total, false});
  }
  Config c = k.base;
  if (p.routed && k.routed_n_keys > 0) c.mutable_model()->mutable_peer()->set_n_keys(k.routed_n_keys);
  if (!p.peer) {
    c.mutable_model()->set_ffn(FFN_KIND_DENSE);
    c.mutable_model()->set_dense_hidden(static_cast<uint32_t>(std::max(1.0, std::round(k.dense_hidden * p.width))));
  }
  if (!p.recipe) c.mutable_train()->set_distill_weight(0);
  if (p.replay >= 0) c.mutable_train()->set_replay_ratio(static_cast<float>(p.replay));
  const TrainConfig& tc = c.train();
  SeedCompute(tc.seed());
  TransformerLM model(c.model());
  Trainer trainer(model, tc);
  const int64_t batch = tc.batch_size(), context = c.model().context();
  std::vector<TextBatcher> fresh, replay;
  for (size_t i = 0; i < tasks.size(); ++i) {
    fresh.emplace_back(tasks[i].train, context, tc.seed() + i);
    if (p.recipe) replay.emplace_back(tasks[i].train, context, tc.seed() + 1000 + i);
  }
  std::mt19937_64 rng(tc.seed());
  auto error = [&](const Status& st) { return json{{"policy", p.name}, {"error", st.ToString()}}; };

  EvalOptions eval;
  eval.max_bytes = k.eval_bytes;
  RoutedBranches routing;
  const int64_t route_context = k.route_context > 0 ? k.route_context : int64_t{tc.route_context()};
  std::vector<int64_t> branch_of(tasks.size(), -1);  // routed: the branch each task was trained on
  std::map<int64_t, int> task_of_branch;             // and the task each branch was trained on
  json seeded_from = json::array();                  // per streamed phase: the task its branch copied
  int64_t latest_branch = -1;
  // How a routed policy's held-out windows choose their route: the bigram router, or the model's
  // own likelihood of the context under each candidate branch.
  auto routed_eval = [&] {
    if (!k.route_by_model) return routing.Options(eval, route_context);
    if (k.route_candidates > 0) return routing.ModelOptions(eval, route_context, k.route_candidates);
    EvalOptions o = routing.Options(eval, route_context);
    o.candidates = [&routing](std::string_view) {
      std::vector<Route> every;
      for (int64_t b : routing.router.routes()) every.push_back(routing.RouteOf(b));
      return every;
    };
    return o;
  };
  auto evaluate = [&] { return EvaluateAll(model, tasks, p.routed ? routed_eval() : eval); };
  ForgettingInput in;
  in.trained_at.assign(tasks.size(), -1);
  in.init = 0;
  in.rows.push_back(evaluate());
  // Routed by the model: the same model routed by the bigram router too, side by side.
  const bool both_routings = p.routed && k.route_by_model;
  std::vector<std::vector<double>> bigram_rows;
  double bigram_plasticity = 0;
  if (both_routings) bigram_rows.push_back(EvaluateAll(model, tasks, routing.Options(eval, route_context)));
  std::vector<std::string> labels = {"init"};
  json curves = json::array();  // --curve-every: per streamed phase, [step, bits/byte] of its domain
  double train_seconds = 0, plasticity = 0, distill_sum = 0;
  int64_t distill_n = 0, streamed = 0, stream_steps = 0;
  std::vector<torch::Tensor> base_state;  // oracle: the parameters after the base phase
  std::unique_ptr<Trainer> own;           // oracle: the trainer of the current domain's copy
  Trainer* active = &trainer;
  for (size_t phase = 0; phase < phases.size(); ++phase) {
    const bool mixed = phases[phase].task < 0;  // joint: every streamed domain at once
    const int d = mixed ? streamed_tasks.front() : phases[phase].task;
    if (p.oracle && !phases[phase].pretrain) {  // a fresh copy of the base for this domain
      torch::NoGradGuard no_grad;
      auto params = model->parameters();
      if (base_state.empty())
        for (const auto& t : params) base_state.push_back(t.detach().clone());
      for (size_t i = 0; i < params.size(); ++i) params[i].copy_(base_state[i]);
      own = std::make_unique<Trainer>(model, tc);
      active = own.get();
    }
    std::vector<int> earlier;  // tasks trained before this phase, other than this one
    for (size_t q = 0; q < phase; ++q)
      if (phases[q].task != d && std::find(earlier.begin(), earlier.end(), phases[q].task) == earlier.end())
        earlier.push_back(phases[q].task);
    int64_t branch = routing.base;
    if (phase > 0) {
      if (p.recipe) trainer.SetTeacher(CopyForTeacher(model));  // before the pool grows
      if (p.grow) {
        if (Status st = GrowAll(trainer, c.model().peer().n_keys(), &branch); !st.ok()) return error(st);
        if (p.routed) {
          // What adapts to this domain is owned by its segment: its experts and its adapter.
          if (Status st = model->AddAdapter(branch, k.adapter_rank, k.trunk_deltas); !st.ok()) return error(st);
          // The new branch starts as a copy of an old one (the base: nothing to copy).
          const int64_t seed =
              k.seed_branch == "latest" ? latest_branch
              : k.seed_branch == "nearest"
                  ? BestBranchFor(model, routing, tasks[d].train.substr(0, 4096), routing.router.routes())
                  : -1;
          latest_branch = branch;
          if (seed >= 0 && seed != routing.base) {
            if (Status st = model->CopyBranch(seed, branch); !st.ok()) return error(st);
          }
          seeded_from.push_back(seed >= 0 && seed != routing.base ? tasks[task_of_branch.at(seed)].name : "base");
          if (Status st = model->SetRoute(routing.RouteOf(branch)); !st.ok()) return error(st);
          TrainConfig owned = tc;
          owned.clear_train_groups();
          owned.add_train_groups("new-segment");
          owned.set_adapter_lr_scale(k.adapter_lr_scale);
          owned.set_trunk_delta_lr_scale(k.trunk_delta_lr_scale);
          trainer.SetConfig(owned);
        } else if (phase == 1) {
          trainer.SetConfig(k.later);
        }
      }
    }
    branch_of[d] = branch;
    task_of_branch[branch] = d;
    // The schedule: the base phase's warmup and cosine are always those of a default-length phase,
    // so that runs with other --steps (the learning–forgetting sweep) start from the same base; a
    // streamed phase's span its own steps, at --stream-lr when given.
    {
      TrainConfig t = active->config();
      const uint32_t span = phases[phase].pretrain ? kDefaultPhaseSteps : phases[phase].steps;
      const bool relr = !phases[phase].pretrain && k.stream_lr > 0 && t.lr() != k.stream_lr;
      if (t.steps() != span || relr) {
        t.set_steps(span);
        t.set_warmup_steps(std::min<uint32_t>(k.config_warmup_steps, span / 10));
        if (relr) {
          t.set_lr(k.stream_lr);
          t.set_min_lr(k.stream_lr / 10);
        }
        active->SetConfig(t);
      }
    }
    active->set_step(0);  // each domain gets the schedule (warmup, cosine) afresh
    // Replayed rows per step: batch · ratio on average, rounded at random per step, so that a
    // budget under one row a batch (1 % of 16) still replays its share.
    const double replay_rows = p.recipe && !earlier.empty() ? static_cast<double>(batch) * tc.replay_ratio() : 0;
    std::uniform_real_distribution<double> unit(0, 1);
    const auto t0 = Clock::now();
    double loss = 0;
    // The held-out bits/byte of the domain being trained along its phase (--curve-every): where
    // it stops improving, the model is full for that domain. Scored outside the timed training.
    json curve = json::array();
    double curve_seconds = 0;
    auto score_now = [&](uint32_t step) {
      const auto c0 = Clock::now();
      const EvalOptions o = p.routed ? routed_eval() : eval;
      curve.push_back({step, BitsPerByte(model, tasks[d].heldout, o)});
      curve_seconds += std::chrono::duration<double>(Clock::now() - c0).count();
    };
    const bool curved = k.curve_every > 0 && !mixed && !phases[phase].pretrain;
    for (uint32_t s = 0; s < phases[phase].steps; ++s) {
      if (curved && s % k.curve_every == 0) score_now(s);
      const int64_t replayed = std::min<int64_t>(
          batch - 1, static_cast<int64_t>(replay_rows) + (unit(rng) < replay_rows - std::floor(replay_rows)));
      std::vector<torch::Tensor> rows;
      for (int64_t r = 0; r < replayed; ++r) rows.push_back(replay[earlier[rng() % earlier.size()]].Next(1));
      torch::Tensor new_rows;
      if (mixed) {
        std::vector<torch::Tensor> picks;
        for (int64_t r = replayed; r < batch; ++r)
          picks.push_back(fresh[streamed_tasks[rng() % streamed_tasks.size()]].Next(1));
        new_rows = torch::cat(picks, 0);
      } else {
        new_rows = fresh[d].Next(batch - replayed);
      }
      if (p.routed) routing.router.Observe(branch, BatchBytes(new_rows));  // statistics, not text
      rows.push_back(new_rows);
      StepStats st = active->Step(torch::cat(rows, 0), replayed);
      loss += st.loss;
      distill_sum += st.distill;
      distill_n += replayed > 0;
    }
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count() - curve_seconds;
    train_seconds += secs;
    in.rows.push_back(evaluate());
    if (both_routings) bigram_rows.push_back(EvaluateAll(model, tasks, routing.Options(eval, route_context)));
    if (curved) {
      curve.push_back({phases[phase].steps, in.rows.back()[d]});
      curves.push_back({{"task", tasks[d].name}, {"phase", phase}, {"points", curve}});
    }
    const int row = static_cast<int>(in.rows.size() - 1);
    labels.push_back(mixed ? "after all (joint)" : (phases[phase].pretrain ? "base " : "after ") + tasks[d].name);
    for (int j : mixed ? streamed_tasks : std::vector<int>{d}) {
      in.trained_at[j] = row;
      if (phases[phase].pretrain) continue;
      plasticity += in.rows.back()[j];
      if (both_routings) bigram_plasticity += bigram_rows.back()[j];
      ++streamed;
    }
    if (!phases[phase].pretrain) stream_steps += phases[phase].steps;
    if (k.verbose) {
      std::fprintf(stderr, "  %-19s %2zu/%zu %-12s train loss %.3f bits/byte, held-out %.3f, %.0f tokens/s\n",
                   p.name.c_str(), phase + 1, phases.size(), tasks[d].name.c_str(),
                   loss / phases[phase].steps / std::log(2.0), in.rows.back()[d],
                   phases[phase].steps * batch * context / secs);
    }
  }
  if (p.oracle) {  // the final row: each task scored by its own model (the base's for the base text)
    std::vector<double> own_row(tasks.size(), NAN);
    for (size_t j = 0; j < tasks.size(); ++j)
      if (in.trained_at[j] >= 0) own_row[j] = in.rows[in.trained_at[j]][j];
    in.rows.push_back(own_row);
    labels.push_back("each by its own model");
  }
  const ForgettingMetrics m = ComputeForgettingMetrics(in);
  json forgetting = json::object();
  for (size_t j = 0; j < tasks.size(); ++j)
    if (!std::isnan(m.forgetting[j])) forgetting[tasks[j].name] = m.forgetting[j];
  json names = json::array();
  for (const Domain& d : tasks) names.push_back(d.name);
  const bool mixed_last = phases.back().task < 0;
  // Old text a policy must keep to go on: a replaying policy draws from every earlier task's
  // training text for as long as it trains; joint training needs all of it at once.
  uint64_t kept_old_text = 0;
  if (p.recipe)
    for (size_t q = 0; q + 1 < phases.size(); ++q)
      if (phases[q].task != phases.back().task) kept_old_text += tasks[phases[q].task].train.size();
  if (p.joint)
    for (int j : streamed_tasks) kept_old_text += tasks[j].train.size();
  json row = {{"policy", p.name},
              {"peer", p.peer},
              {"replay_ratio", p.recipe ? tc.replay_ratio() : 0.0},
              {"kept_old_text_bytes", kept_old_text},
              {"tasks", names},
              {"labels", labels},
              {"matrix", in.rows},
              {"mean_forgetting", m.mean_forgetting},
              {"forgetting", forgetting},
              {"bwt", m.bwt},
              {"fwt", m.fwt},
              {"acc", m.acc},
              {"plasticity_bpb", streamed ? plasticity / streamed : NAN},  // mean R[phase][domain just trained]
              {"last_domain_bpb", in.rows.back()[mixed_last ? streamed_tasks.back() : phases.back().task]},
              {"mean_distill_kl", distill_n ? distill_sum / distill_n : 0.0},
              {"total_params", model->TotalParameters()},
              {"active_params", model->ActiveParameters()},
              {"dense_hidden", p.peer ? 0u : c.model().dense_hidden()},
              {"train_tokens", stream_steps * batch * context},
              {"train_seconds", train_seconds},
              {"wall_seconds", std::chrono::duration<double>(Clock::now() - start).count()},
              {"config_seed", tc.seed()},
              {"steps_per_domain", tc.steps()},
              {"curves", curves},
              {"stream_lr", k.stream_lr > 0 ? k.stream_lr : tc.lr()}};
  if (p.routed) {
    row["routing_statistics_bytes"] = routing.router.StatisticsBytes();
    row["adapter_rank"] = k.adapter_rank == SegmentAdapterImpl::kFullRank ? json("full") : json(k.adapter_rank);
    row["adapter_lr_scale"] = k.adapter_lr_scale;
    row["trunk_delta_lr_scale"] = k.trunk_delta_lr_scale;
    row["trunk_deltas"] = k.trunk_deltas;
    row["seed_branch"] = k.seed_branch;
    row["seeded_from"] = seeded_from;
    row["route_by"] = k.route_by_model ? "model" : "bigram";
    if (k.route_by_model) row["route_candidates"] = k.route_candidates > 0 ? json(k.route_candidates) : json("all");
    if (both_routings) {
      ForgettingInput b = in;
      b.rows = bigram_rows;
      const ForgettingMetrics mb = ComputeForgettingMetrics(b);
      row["bigram_routing"] = {{"matrix", bigram_rows},
                               {"acc", mb.acc},
                               {"mean_forgetting", mb.mean_forgetting},
                               {"plasticity_bpb", streamed ? bigram_plasticity / streamed : NAN}};
    }
    json accuracy = json::object();
    const std::vector<double> acc = k.route_by_model
                                        ? ModelRoutingAccuracy(model, routing, tasks, branch_of, routed_eval())
                                        : RoutingAccuracy(routing, tasks, branch_of, routed_eval(), context);
    for (size_t j = 0; j < tasks.size(); ++j) accuracy[tasks[j].name] = acc[j];
    row["routing_accuracy"] = accuracy;
    if (k.branch_scores) {
      // What a router could at best do with these branches: each task under every route, the
      // whole held-out text on one. {"branches": [trained on], "scores": [task][branch]}.
      json trained_on = json::array(), scores = json::array();
      std::vector<int64_t> routes = {routing.base};
      for (const auto& [b, task] : task_of_branch)
        if (b != routing.base) routes.push_back(b);
      for (int64_t b : routes)  // the base without a base phase: "base"
        trained_on.push_back(task_of_branch.count(b) ? tasks[task_of_branch.at(b)].name : "base");
      const Route was = model->route();
      for (const Domain& t : tasks) {
        json per_branch = json::array();
        for (int64_t b : routes) {
          if (Status st = model->SetRoute(routing.RouteOf(b)); !st.ok()) return error(st);
          per_branch.push_back(BitsPerByte(model, t.heldout, eval));
        }
        scores.push_back(per_branch);
      }
      if (Status st = model->SetRoute(was); !st.ok()) return error(st);
      row["branch_scores"] = {{"branches", trained_on}, {"scores", scores}};
    }
  }
  return row;
}

void PrintPolicy(const json& r) {
  std::printf("\n%s — held-out bits/byte (rows: after each phase; columns: tasks)\n",
              r["policy"].get<std::string>().c_str());
  std::printf("%-22s", "");
  for (const auto& t : r["tasks"]) std::printf(" %11.11s", t.get<std::string>().c_str());
  std::printf("\n");
  for (size_t i = 0; i < r["matrix"].size(); ++i) {
    std::printf("%-22.22s", r["labels"][i].get<std::string>().c_str());
    for (const auto& v : r["matrix"][i]) std::printf(" %11.3f", v.get<double>());
    std::printf("\n");
  }
}

void PrintSummary(const std::vector<json>& rows) {
  std::printf("\n%-24s %9s %8s %8s %9s %7s %7s %7s %7s %8s %8s %8s %7s\n", "policy", "params", "active", "old KB",
              "forgetting", "BWT", "FWT", "ACC", "plast.", "F/dense", "ACC/d+r", "P/dense", "wall s");
  for (const json& r : rows) {
    if (r.contains("error")) {
      std::printf("%-24s error: %s\n", r["policy"].get<std::string>().c_str(), r["error"].get<std::string>().c_str());
      continue;
    }
    auto ratio = [&](const char* key) {
      char buf[32];
      if (!r.contains(key)) return std::string("–");
      std::snprintf(buf, sizeof buf, "%.3f", r[key].get<double>());
      return std::string(buf);
    };
    std::printf("%-24s %9lld %8lld %8.0f %10.3f %+7.3f %+7.3f %7.3f %7.3f %8s %8s %8s %7.0f\n",
                r["policy"].get<std::string>().c_str(), static_cast<long long>(r["total_params"].get<int64_t>()),
                static_cast<long long>(r["active_params"].get<int64_t>()),
                r["kept_old_text_bytes"].get<double>() / 1000, r["mean_forgetting"].get<double>(),
                r["bwt"].get<double>(), r["fwt"].get<double>(), r["acc"].get<double>(),
                r["plasticity_bpb"].get<double>(), ratio("forgetting_ratio_vs_dense").c_str(),
                ratio("acc_ratio_vs_dense_recipe").c_str(), ratio("plasticity_ratio_vs_dense").c_str(),
                r["wall_seconds"].get<double>());
  }
  std::printf(
      "\nforgetting: mean over tasks of final − best earlier bits/byte (Chaudhry); BWT < 0 is forgetting;\n"
      "ACC: mean final held-out bits/byte (lower is better); plast.: mean bits/byte on the domain just\n"
      "trained; old KB: old text the policy keeps to go on; ratios: F/dense = forgetting ÷ dense's,\n"
      "ACC/d+r = ACC ÷ dense+recipe's, P/dense = plasticity ÷ dense's.\n");
  for (const json& r : rows)
    if (r.contains("bigram_routing"))
      std::printf(
          "%s, the same model with the bigram router choosing the routes: ACC %.3f, forgetting %.3f, "
          "plast. %.3f\n",
          r["policy"].get<std::string>().c_str(), r["bigram_routing"]["acc"].get<double>(),
          r["bigram_routing"]["mean_forgetting"].get<double>(), r["bigram_routing"]["plasticity_bpb"].get<double>());
  if (rows.empty() || !rows.front().contains("acc_per_seed")) return;
  std::printf("\nmedians over seeds %s; per seed (ACC | forgetting | plasticity):\n",
              rows.front()["seeds"].dump().c_str());
  auto per_seed = [](const std::string& name, const json& figures) {
    std::printf("%-24s", name.c_str());
    for (const char* key : {"acc_per_seed", "mean_forgetting_per_seed", "plasticity_bpb_per_seed"}) {
      for (const auto& v : figures[key]) std::printf(" %.3f", v.get<double>());
      std::printf(" |");
    }
    std::printf("\n");
  };
  for (const json& r : rows) {
    if (r.contains("error")) continue;
    per_seed(r["policy"].get<std::string>(), r);
    if (r.contains("bigram_routing")) per_seed(r["policy"].get<std::string>() + "/bigram", r["bigram_routing"]);
  }
}

// Sets out[key] to the median over runs of figure(run)[key], and out[key + "_per_seed"] to the
// values in seed order.
void PutMedian(json& out, const std::vector<json>& runs, const std::function<const json&(const json&)>& figures,
               const std::string& key) {
  std::vector<double> v;
  for (const json& r : runs) v.push_back(figures(r)[key].get<double>());
  out[key + "_per_seed"] = v;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  out[key] = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// One row for several seeds of a policy: each figure the median over seeds, with its values per
// seed beside it ("acc_per_seed"), the same within "bigram_routing"; the matrices are the first
// seed's.
json MedianOverSeeds(const std::vector<json>& runs) {
  json out = runs.front();
  json seeds = json::array();
  for (const json& r : runs) seeds.push_back(r["config_seed"]);
  out["seeds"] = seeds;
  for (const char* key : {"mean_forgetting", "bwt", "fwt", "acc", "plasticity_bpb", "last_domain_bpb",
                          "mean_distill_kl", "train_seconds", "wall_seconds"})
    PutMedian(
        out, runs, [](const json& r) -> const json& { return r; }, key);
  if (out.contains("bigram_routing"))
    for (const char* key : {"acc", "mean_forgetting", "plasticity_bpb"})
      PutMedian(
          out["bigram_routing"], runs, [](const json& r) -> const json& { return r["bigram_routing"]; }, key);
  return out;
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

int ForgettingBench(int argc, char** argv) {
  CLI::App app{"peer-bench forgetting: continual-learning policies on one sequence of text domains"};
  std::string domains_arg = "kjv,c-code,fortunes-de,man-pages,sparv,python", corpus_dir = "data/corpora";
  std::string policies_arg, config_path, peer_blocks_arg, later_groups_arg = "all",
                                                          json_out = "bench-out/forgetting.json";
  std::string pretrain_arg = "broad:600", replay_sweep_arg, dense_widths_arg;
  uint32_t seeds = 1;
  bool reference = false;
  std::string adapter_rank_arg = "32";
  double adapter_lr_scale = 10, trunk_delta_lr_scale = 3;
  uint32_t steps = 150, repeat = 1, threads = 0, d_model = 0, layers = 0, n_keys = 0, context = 64, batch = 0;
  uint32_t matched_width = 0;
  size_t train_kb = 2048, heldout_kb = 24;
  uint32_t curve_every = 0;
  double replay = -1, distill = -1, expert_lr_scale = -1, later_backbone_lr_scale = -1, lr = 0;
  uint64_t seed = 0;
  bool as_json = false, quiet = false;
  app.add_option("--domains", domains_arg,
                 "comma-separated domains in training order: NAME (a folder of --corpus-dir), a folder path "
                 "with train.txt and heldout.txt, or NAME=TRAIN_FILE:HELDOUT_FILE")
      ->capture_default_str();
  app.add_option("--corpus-dir", corpus_dir, "where NAME domains live (scripts/corpora.sh writes them)")
      ->capture_default_str();
  app.add_option("--repeat", repeat, "train the sequence this many times (a longer stream)")->capture_default_str();
  app.add_option("--pretrain", pretrain_arg,
                 "DOMAIN[:STEPS]: a broad base phase before the stream, on text that is none of the streamed "
                 "domains, scored as a task like the others ('' = none; DOMAIN as in --domains)")
      ->capture_default_str();
  app.add_option("--policies", policies_arg,
                 "comma-separated subset of: dense, dense+recipe, peer-all, freeze-grow, freeze-grow+recipe, routed, "
                 "routed+recipe (default all but routed+recipe)");
  app.add_option("--adapter-rank", adapter_rank_arg,
                 "routed: rank of each segment's deltas, or 'full' (full-rank deltas)")
      ->capture_default_str();
  app.add_option("--adapter-lr-scale", adapter_lr_scale,
                 "routed: learning-rate multiplier of the new segment's "
                 "adapter (its low-rank factors)")
      ->capture_default_str();
  app.add_option("--trunk-delta-lr-scale", trunk_delta_lr_scale,
                 "routed: learning-rate multiplier of the adapter's "
                 "deltas of the embeddings, norms and biases")
      ->capture_default_str();
  std::string seed_arg = "latest";
  bool no_trunk_deltas = false;
  int64_t route_context = 0;
  uint32_t routed_n_keys = 0;
  app.add_option("--routed-n-keys", routed_n_keys,
                 "routed: sub-keys per half of its segments, n² experts each "
                 "(0: --n-keys / the config's)")
      ->capture_default_str();
  app.add_option("--route-context", route_context,
                 "routed: bytes of text before a window that choose its route "
                 "(0: the config's train.routeContext, 512)")
      ->capture_default_str();
  app.add_option("--seed-branch", seed_arg,
                 "routed: a new domain's branch starts as a copy of the branch trained "
                 "last (latest), of the old branch that predicts its first 4 KB best (nearest), or at the base (base)")
      ->check(CLI::IsMember({"latest", "nearest", "base"}))
      ->capture_default_str();
  app.add_flag("--no-trunk-deltas", no_trunk_deltas,
               "routed: adapters without deltas of the embeddings, norms and biases "
               "(low-rank map deltas only)");
  app.add_option("--config", config_path,
                 "JSON config of the PEER model and training (proto/config.proto) over embedded defaults");
  app.add_option("--steps", steps, "training steps per domain")->capture_default_str();
  app.add_option("--batch", batch, "sequences per step (default: the config's)");
  app.add_option("--context", context,
                 "bytes per sequence (half the service's 128: five policies in ~10 minutes on 2 cores)")
      ->capture_default_str();
  app.add_option("--d-model", d_model, "model width (default: the config's)");
  app.add_option("--layers", layers, "transformer blocks (default: the config's)");
  app.add_option("--peer-blocks", peer_blocks_arg, "comma-separated blocks that carry PEER (default: the config's)");
  app.add_option("--n-keys", n_keys,
                 "sub-keys per half of a segment: n_keys² experts per segment (default: the config's)");
  app.add_option("--lr", lr, "peak learning rate (default: the config's)");
  double stream_lr = 0;
  app.add_option("--stream-lr", stream_lr,
                 "peak learning rate of the streamed domains only, the base phase "
                 "keeping the config's (the learning–forgetting sweep)");
  app.add_option("--train-kb", train_kb, "training text per domain, KB (its first bytes)")->capture_default_str();
  app.add_option("--heldout-kb", heldout_kb, "held-out text scored per task and evaluation, KB")->capture_default_str();
  app.add_option("--curve-every", curve_every,
                 "score the domain being trained every this many steps of its phase (the JSON's curves: "
                 "where held-out loss stops improving)");
  app.add_option("--replay", replay,
                 "recipe: share of each batch replayed from earlier domains (default: the config's, 0.25)");
  app.add_option("--distill", distill,
                 "recipe: weight of KL(previous model ‖ model) on replayed rows (default: the config's, 1)");
  app.add_option("--expert-lr-scale", expert_lr_scale, "PEER policies: learning-rate multiplier of expert tables");
  app.add_option("--later-groups", later_groups_arg, "freeze-grow: policy groups that train from the second domain on")
      ->capture_default_str();
  app.add_option("--later-backbone-lr-scale", later_backbone_lr_scale,
                 "freeze-grow: backbone learning-rate multiplier from the second domain on");
  app.add_option("--threads", threads, "LibTorch threads (0 = all cores)")->capture_default_str();
  app.add_option("--seed", seed, "initialisation and batch order (default: the config's)");
  app.add_option("--seeds", seeds,
                 "run every policy with this many seeds (--seed, +1, …): figures are medians, "
                 "each with its values per seed")
      ->capture_default_str();
  app.add_flag("--reference", reference,
               "also the reference rows: joint (all streamed domains at once) and oracle "
               "(one copy of the base per domain), dense, after the same base phase");
  app.add_option("--replay-sweep", replay_sweep_arg,
                 "comma-separated replay shares (e.g. 0.01,0.05): each recipe policy "
                 "again per share, as POLICY@SHARE");
  app.add_option("--dense-widths", dense_widths_arg,
                 "comma-separated multiples of the matched FFN width (e.g. 0.5,2): dense and dense+recipe again per "
                 "multiple, as POLICY-xMULTIPLE (where dense saturates, and what a bigger one buys)");
  app.add_option("--matched-width", matched_width,
                 "the dense FFN width of equal active parameters, given instead of solved from the policies "
                 "run (a sweep split across processes: the width the whole run printed)");
  std::string route_by = "bigram";
  app.add_option("--route-by", route_by,
                 "routed: what chooses a held-out window's branch from the bytes before it: the bigram router "
                 "(bigram) or the model, by which branch predicts those bytes best (model: a pass over the text "
                 "per candidate)")
      ->check(CLI::IsMember({"bigram", "model"}))
      ->capture_default_str();
  uint32_t route_candidates = 0;
  app.add_option(
         "--route-candidates", route_candidates,
         "with --route-by model: the branches a text's windows choose among, the bigram router's most "
         "likely for the text and the newest (train.routeCandidates, as peerd runs it; 0: every route the router "
         "knows)")
      ->capture_default_str();
  bool branch_scores = false;
  app.add_flag("--branch-scores", branch_scores,
               "routed: at the end, score every task under every branch (the JSON's branch_scores: what the "
               "best choice of branch per task would reach)");
  app.add_flag("--json", as_json, "print one JSON object per policy instead of the tables");
  app.add_flag("--quiet", quiet, "no per-domain progress on stderr");
  app.add_option("--json-out", json_out, "also write the JSON lines to this file ('' = don't)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const Status& st) {
    std::fprintf(stderr, "peer-bench forgetting: %s\n", st.ToString().c_str());
    return 1;
  };
  Knobs k;
  k.base = DefaultConfig();
  if (!config_path.empty())
    if (Status st = LoadConfigFile(config_path, &k.base); !st.ok()) return fail(st);
  ModelConfig* m = k.base.mutable_model();
  TrainConfig* t = k.base.mutable_train();
  m->set_ffn(FFN_KIND_PEER);
  if (d_model) m->set_d_model(d_model);
  if (layers) m->set_n_layers(layers);
  if (context) m->set_context(context);
  if (n_keys) m->mutable_peer()->set_n_keys(n_keys);
  if (!peer_blocks_arg.empty()) {
    m->clear_peer_blocks();
    for (const std::string& b : Split(peer_blocks_arg)) m->add_peer_blocks(static_cast<uint32_t>(std::stoul(b)));
  }
  if (batch) t->set_batch_size(batch);
  if (lr > 0) t->set_lr(static_cast<float>(lr));
  if (lr > 0 && t->min_lr() > t->lr()) t->set_min_lr(t->lr() / 10);
  k.config_warmup_steps = t->warmup_steps();
  t->set_steps(steps);
  t->set_warmup_steps(std::min<uint32_t>(t->warmup_steps(), steps / 10));
  if (threads) t->set_threads(threads);
  if (seed) t->set_seed(seed);
  if (distill >= 0) t->set_distill_weight(static_cast<float>(distill));
  if (replay >= 0) t->set_replay_ratio(static_cast<float>(replay));
  if (expert_lr_scale >= 0) t->set_expert_lr_scale(static_cast<float>(expert_lr_scale));
  if (adapter_rank_arg == "full") {
    k.adapter_rank = SegmentAdapterImpl::kFullRank;
  } else {
    char* end = nullptr;
    const long r = std::strtol(adapter_rank_arg.c_str(), &end, 10);
    if (*end != '\0' || r < 1 || r > 4096)
      return fail(Status::InvalidArgument("--adapter-rank takes a rank in [1, 4096] or 'full', got '" +
                                          adapter_rank_arg + "'"));
    k.adapter_rank = r;
  }
  // The config's field (0: full rank) too, so that it is checked against the model's width.
  t->set_adapter_rank(k.adapter_rank == SegmentAdapterImpl::kFullRank ? 0 : static_cast<int32_t>(k.adapter_rank));
  k.later = *t;
  k.later.clear_train_groups();
  for (const std::string& g : Split(later_groups_arg)) k.later.add_train_groups(g);
  if (later_backbone_lr_scale >= 0) k.later.set_backbone_lr_scale(static_cast<float>(later_backbone_lr_scale));
  for (const Config& check : {k.base, [&] {
                                Config c = k.base;
                                *c.mutable_train() = k.later;
                                return c;
                              }()})
    if (Status st = ValidateConfig(check); !st.ok()) return fail(st);
  if (steps == 0 || repeat == 0 || seeds == 0)
    return fail(Status::InvalidArgument("--steps, --repeat and --seeds must be at least 1"));
  // The first entry of a comma-separated list that is not a number that `fits`; "" when all are.
  auto misfit = [](const std::string& list, auto fits) -> std::string {
    for (const std::string& x : Split(list)) {
      char* end = nullptr;
      const double v = std::strtod(x.c_str(), &end);
      if (*end != '\0' || !fits(v)) return x;
    }
    return "";
  };
  if (std::string bad = misfit(replay_sweep_arg, [](double v) { return v >= 0 && v < 1; }); !bad.empty())
    return fail(Status::InvalidArgument("--replay-sweep takes shares in [0, 1), got '" + bad + "'"));
  if (std::string bad = misfit(dense_widths_arg, [](double v) { return v > 0 && v <= 64; }); !bad.empty())
    return fail(Status::InvalidArgument("--dense-widths takes multiples in (0, 64], got '" + bad + "'"));
  k.eval_bytes = static_cast<int64_t>(heldout_kb) * 1000;
  k.curve_every = curve_every;
  k.branch_scores = branch_scores;
  k.route_by_model = route_by == "model";
  k.route_candidates = route_candidates;
  k.verbose = !quiet;
  k.adapter_lr_scale = static_cast<float>(adapter_lr_scale);
  k.trunk_delta_lr_scale = static_cast<float>(trunk_delta_lr_scale);
  k.stream_lr = static_cast<float>(stream_lr);
  k.seed_branch = seed_arg;
  k.trunk_deltas = !no_trunk_deltas;
  k.route_context = route_context;
  k.routed_n_keys = routed_n_keys;
  if (routed_n_keys > 0 && (routed_n_keys < m->peer().topk() || routed_n_keys > 65536))
    return fail(Status::InvalidArgument("--routed-n-keys must be 0 or in [top-k, 65536], got " +
                                        std::to_string(routed_n_keys)));

  std::vector<Policy> policies;
  if (policies_arg.empty())  // routed+recipe is asked for by name: the long stream's (bench/LONG.md)
    std::copy_if(std::begin(kPolicies), std::end(kPolicies), std::back_inserter(policies),
                 [](const Policy& p) { return p.name != "routed+recipe"; });
  for (const std::string& name : Split(policies_arg)) {
    auto it = std::find_if(std::begin(kPolicies), std::end(kPolicies), [&](const Policy& p) { return p.name == name; });
    if (it == std::end(kPolicies))
      return fail(Status::InvalidArgument(
          "unknown policy '" + name +
          "' (dense, dense+recipe, peer-all, freeze-grow, freeze-grow+recipe, routed, routed+recipe)"));
    policies.push_back(*it);
  }
  // The tasks: the base phase's text first (when there is one), then the streamed domains.
  std::vector<Domain> tasks;
  std::vector<Phase> phases;
  auto load = [&](const std::string& spec) -> Status {
    Domain d;
    if (Status st = LoadDomain(spec, corpus_dir, train_kb * 1000, &d); !st.ok()) return st;
    if (d.train.size() <= static_cast<size_t>(m->context()) + 1 || d.heldout.size() < 2)
      return Status::InvalidArgument("domain '" + d.name + "' has too little text for context " +
                                     std::to_string(m->context()));
    tasks.push_back(std::move(d));
    return Status::OK();
  };
  if (!pretrain_arg.empty()) {
    std::string spec = pretrain_arg;
    uint32_t pretrain_steps = 600;
    if (auto colon = spec.rfind(':'); colon != std::string::npos && colon + 1 < spec.size() &&
                                      spec.find_first_not_of("0123456789", colon + 1) == std::string::npos) {
      pretrain_steps = static_cast<uint32_t>(std::stoul(spec.substr(colon + 1)));
      spec.resize(colon);
    }
    if (pretrain_steps == 0) return fail(Status::InvalidArgument("--pretrain needs at least 1 step"));
    if (Status st = load(spec); !st.ok())
      return fail(Status::InvalidArgument("--pretrain " + pretrain_arg + ": " + st.message()));
    phases.push_back({0, pretrain_steps, true});
  }
  const int first_domain = static_cast<int>(tasks.size());
  for (const std::string& spec : Split(domains_arg))
    if (Status st = load(spec); !st.ok()) return fail(st);
  for (uint32_t r = 0; r < repeat; ++r)
    for (size_t i = first_domain; i < tasks.size(); ++i) phases.push_back({static_cast<int>(i), steps, false});
  for (size_t i = 0; i < tasks.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (tasks[i].name == tasks[j].name)
        return fail(Status::InvalidArgument("task '" + tasks[i].name + "' is given twice"));

  const bool any_routed = std::any_of(policies.begin(), policies.end(), [](const Policy& p) { return p.routed; });
  const int used_threads = SetComputeThreads(t->threads());
  ModelConfig widest = *m;  // the PEER model with the most active parameters: routed's, when it runs
  if (any_routed && routed_n_keys > 0) widest.mutable_peer()->set_n_keys(routed_n_keys);
  k.dense_hidden = matched_width > 0
                       ? matched_width
                       : MatchingDenseHidden(widest, phases.size(), any_routed ? k.adapter_rank : -1, k.trunk_deltas);
  std::fprintf(
      stderr, "peer-bench forgetting: %s%zu domains × %u, %u steps × %u × %u bytes each, %d threads, BLAS %s\n",
      pretrain_arg.empty() ? "" : ("base phase " + pretrain_arg + ", then ").c_str(), tasks.size() - first_domain,
      repeat, steps, t->batch_size(), m->context(), used_threads, BlasInfo().c_str());
  std::fprintf(stderr, "peer-bench forgetting: dense baseline FFN width %u (%s)\n", k.dense_hidden,
               matched_width > 0 ? "--matched-width"
               : any_routed      ? "the active parameters of the grown PEER model with one adapter"
                                 : "the active parameters of the grown PEER model");

  // The width sweep: each dense policy again per multiple of the matched width, right after it.
  for (const char* name : {"dense", "dense+recipe"}) {
    auto dense = std::find_if(policies.begin(), policies.end(), [&](const Policy& p) { return p.name == name; });
    if (dense == policies.end()) continue;
    std::vector<Policy> widths;
    for (const std::string& w : Split(dense_widths_arg)) {
      Policy p = *dense;
      p.width = std::stod(w);
      p.name = std::string(name) + "-x" + w;
      widths.push_back(p);
    }
    policies.insert(dense + 1, widths.begin(), widths.end());
  }
  if (reference) policies.insert(policies.end(), std::begin(kReferences), std::end(kReferences));
  // The replay-budget sweep: each recipe policy once more per budget, as POLICY@RATIO.
  for (const Policy& p : std::vector<Policy>(policies)) {
    if (!p.recipe) continue;
    for (const std::string& r : Split(replay_sweep_arg)) {
      Policy swept = p;
      swept.replay = std::stod(r);
      swept.name = p.name + "@" + r;
      policies.push_back(swept);
    }
  }
  std::vector<json> rows;
  for (const Policy& p : policies) {
    std::vector<json> runs;
    for (uint32_t i = 0; i < seeds; ++i) {
      Knobs ks = k;
      ks.base.mutable_train()->set_seed(k.base.train().seed() + i);
      ks.later.set_seed(k.base.train().seed() + i);
      runs.push_back(RunPolicy(p, tasks, phases, ks));
      if (runs.back().contains("error")) break;
    }
    rows.push_back(runs.size() == 1 || runs.back().contains("error") ? runs.back() : MedianOverSeeds(runs));
  }
  auto find = [&](const char* name) -> const json* {
    for (const json& r : rows)
      if (r["policy"] == name && !r.contains("error")) return &r;
    return nullptr;
  };
  const json *dense = find("dense"), *dense_recipe = find("dense+recipe");
  for (json& r : rows) {
    if (r.contains("error")) continue;
    if (dense && (*dense)["mean_forgetting"].get<double>() != 0)
      r["forgetting_ratio_vs_dense"] = r["mean_forgetting"].get<double>() / (*dense)["mean_forgetting"].get<double>();
    if (dense)
      r["plasticity_ratio_vs_dense"] = r["plasticity_bpb"].get<double>() / (*dense)["plasticity_bpb"].get<double>();
    if (dense_recipe) r["acc_ratio_vs_dense_recipe"] = r["acc"].get<double>() / (*dense_recipe)["acc"].get<double>();
    r["config"] = json::parse(ConfigToJson(k.base));
    r["later_groups"] = later_groups_arg;
    r["pretrain"] = pretrain_arg;
  }
  WriteJsonLines(json_out, rows);
  if (as_json) {
    PrintJsonLines(rows);
    return 0;
  }
  for (const json& r : rows)
    if (!r.contains("error")) PrintPolicy(r);
  PrintSummary(rows);
  return 0;
}

}  // namespace peerd::bench
