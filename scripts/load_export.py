#!/usr/bin/python3
"""Builds the network of a peerd export in PyTorch and scores text with it.

    scripts/load_export.py DIR                  # what the export holds
    scripts/load_export.py DIR --score FILE     # bits/byte and per-byte log-probabilities (JSON)

DIR is what `peerctl export DIR` writes: model.safetensors (every parameter, frozen expert rows in
their stored dtype) and config.json (the model configuration and the frozen segments' manifests).
Needs only Debian's python3-torch. The network is the one core/model.h describes — byte tokens,
learned positions, pre-norm blocks of causal attention and a dense or PEER feed-forward layer,
the head tied to the token embedding — and scores a text the way peerd's /v1/score does: windows
of the context overlapping by one byte, every byte but the first predicted once. bf16 rows are
promoted to fp32 before use, as peerd promotes them.

A routed model (routing isolation, docs/DESIGN.md §4b: what `make demo` trains) comes with its
adapters and its byte-bigram router (core/text_router.h); each window then runs one branch, chosen
as peerd chooses it: with `routeCandidates` > 0 the candidate under which the model predicted the
windows in the `routeContext` bytes before it best, else (and for a text's first window) the
branch the router picks from those bytes and the window's own first byte.
"""
import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
          "I64": torch.int64, "U8": torch.uint8}
END_OF_DOCUMENT, VOCAB = 256, 257


def load_safetensors(path):
    """{name: tensor} and the header's metadata, read with the standard library and torch only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = bytearray(data[begin:end])
        t = torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]) if raw else torch.empty(0, dtype=DTYPES[info["dtype"]])
        tensors[name] = t.reshape(info["shape"])
    return tensors, metadata


class BigramRouter:
    """core/text_router.h: byte-bigram counts per branch, read from BigramRouter::Serialize's bytes,
    and its choice: every branch scored up to SCORE_ALL of them, else the clusters searched."""

    SCORE_ALL, PROBES, POSTERIOR_LEFT, NO_CLUSTER = 64, 8, 1e-9, 0xFFFFFFFF

    def __init__(self, tensor):
        raw = bytes(tensor.tolist())
        if raw[:4] not in (b"BGR1", b"BGR2"):
            sys.exit("load_export.py: the router's statistics are neither BGR2 nor BGR1")
        (self.beta,) = struct.unpack_from("<d", raw, 4)
        (n,) = struct.unpack_from("<Q", raw, 12)
        at, self.routes = 20, {}
        for _ in range(n):
            route, total = struct.unpack_from("<qQ", raw, at)
            at += 16
            first = struct.unpack_from("<256Q", raw, at)
            at += 2048
            single = struct.unpack_from("<256Q", raw, at)
            at += 2048
            (nonzero,) = struct.unpack_from("<I", raw, at)
            at += 4
            pair = {}
            for _ in range(nonzero):
                index, count = struct.unpack_from("<HI", raw, at)
                at += 6
                pair[index] = count
            self.routes[route] = (total, first, single, pair)
        # Clusters: members and the sum of their counts (BGR2; BGR1 bytes have none).
        self.clusters, self.unclustered = [], []
        if raw[:4] == b"BGR2":
            clusters, _ = struct.unpack_from("<II", raw, at)
            at += 8
            members = [[] for _ in range(clusters)]
            for route in sorted(self.routes):
                (k,) = struct.unpack_from("<I", raw, at)
                at += 4
                if k != self.NO_CLUSTER:
                    members[k].append(route)
                elif self.routes[route][0] > 0:
                    self.unclustered.append(route)
            self.clusters = [(m, self.sum_of(m)) for m in members]
        elif len(self.routes) > self.SCORE_ALL:
            sys.exit("load_export.py: a router of more than 64 branches saved without its clusters (BGR1): "
                     "export the model again with this peerd")

    def sum_of(self, routes):
        """The counts of a cluster: its members' added (bigram counts saturate at 2^32 − 1, as in C++)."""
        total, first, single, pair = 0, [0] * 256, [0] * 256, {}
        for route in routes:
            t, f, s, p = self.routes[route]
            total += t
            first = [x + y for x, y in zip(first, f)]
            single = [x + y for x, y in zip(single, s)]
            for index, count in p.items():
                pair[index] = min(pair.get(index, 0) + count, 0xFFFFFFFF)
        return total, first, single, pair

    def log_likelihood(self, counts, text):
        total, first, single, pair = counts
        s = 0.0
        for i in range(1, len(text)):
            a, b = text[i - 1], text[i]
            unigram = (single[b] + 1.0) / (total + 256.0)
            s += math.log((pair.get(a * 256 + b, 0) + self.beta * unigram) / (first[a] + self.beta))
        return s

    def ranked(self, text, k):
        """The k most likely routes (ties: the smallest id) among those searched, best first:
        BigramRouter::Ranked, operation for operation."""
        if len(text) < 2 or k == 0:
            return []
        candidates = sorted(self.routes)
        if len(self.routes) > self.SCORE_ALL and self.clusters:
            ranked = sorted((-self.log_likelihood(counts, text), c) for c, (_, counts) in enumerate(self.clusters))
            mass = sum(math.exp(ranked[0][0] - neg) for neg, _ in ranked)
            candidates, probed, i = list(self.unclustered), 0.0, 0
            while i < min(self.PROBES, len(ranked)) and (i == 0 or 1 - probed / mass >= self.POSTERIOR_LEFT):
                probed += math.exp(ranked[0][0] - ranked[i][0])
                candidates += self.clusters[ranked[i][1]][0]
                i += 1
        scored = sorted((-self.log_likelihood(self.routes[r], text), r) for r in candidates if self.routes[r][0] > 0)
        return [route for _, route in scored[:k]]

    def choose(self, text):
        """The most likely route, -1 when none has counts or no bigram: BigramRouter::Choose."""
        best = self.ranked(text, 1)
        return best[0] if best else -1

    def candidates(self, text, k):
        """RoutedBranches::Candidates: the k most likely for the text, the newest branch last."""
        out = self.ranked(text, k)
        newest = max(self.routes) if self.routes else None
        if k == 0 or newest is None or newest in out:
            return out
        return out[:k - 1] + [newest] if len(out) == k else out + [newest]


class Export:
    def __init__(self, directory):
        self.tensors, metadata = load_safetensors(os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json")) as f:
            self.manifest = json.load(f)
        if json.loads(metadata.get("peerd", "{}")).get("step") != self.manifest.get("step"):
            sys.exit("load_export.py: config.json and model.safetensors are not of the same export")
        model = self.manifest["config"]["model"]
        self.d = model.get("dModel", 128)
        self.layers = model.get("nLayers", 2)
        self.heads = model.get("nHeads", 4)
        self.context = model.get("context", 128)
        self.peer = model.get("peer", {})
        train = self.manifest["config"].get("train", {})
        self.route_context = train.get("routeContext", 512)
        self.route_candidates = train.get("routeCandidates", 0)  # absent: an export routed by bigrams alone
        rank = train.get("adapterRank", 32)
        self.adapter_scale = 1.0 if rank == 0 else 1.0 / math.sqrt(rank)
        routing = self.manifest.get("routing")
        self.router = BigramRouter(self.tensors["router.statistics"]) if routing else None
        if routing:
            self.base = routing["branches"][0]
            self.base_segments = routing.get("baseSegments") or [self.base]
        blocks = model.get("peerBlocks")  # core/config.cc PeerBlocks
        if model.get("ffn") != "FFN_KIND_PEER":
            self.peer_blocks = set()
        else:
            self.peer_blocks = set(blocks) if blocks else {self.layers // 2}

    def t(self, name):
        return self.tensors[name].float()

    # --- a branch's adapter (core/segment_adapter.h): deltas of maps and of trunk parameters ------
    def trunk_delta(self, adapter, name):
        key = f"adapter{adapter}.{name.replace('.', '_')}_d"
        return self.t(key) if adapter is not None and key in self.tensors else None

    def delta(self, adapter, name, x):
        """The adapter's change of map `name` at x, its bias delta included (None: no such map)."""
        if adapter is None:
            return None
        key = f"adapter{adapter}.{name.replace('.', '_')}"
        if key + "_w" in self.tensors:
            d = x @ self.t(key + "_w").t()
        elif key + "_a" in self.tensors:
            d = (x @ self.t(key + "_a").t()) @ self.t(key + "_b").t() * self.adapter_scale
        else:
            return None
        bias = self.trunk_delta(adapter, name + ".bias")
        return d if bias is None else d + bias

    def linear(self, x, weight, bias, adapter, name):
        y = F.linear(x, self.t(weight), self.t(bias) if bias else None)
        d = self.delta(adapter, name, x)
        return y if d is None else y + d

    def norm(self, x, name, adapter):
        w, b = self.t(name + ".weight"), self.t(name + ".bias")
        dw = self.trunk_delta(adapter, name + ".weight")
        if dw is not None:
            w, b = w + dw, b + self.trunk_delta(adapter, name + ".bias")
        return F.layer_norm(x, (self.d,), w, b)

    def route_of(self, text):
        """(adapter, segments) of the branch the router picks for `text` (routed_branches.cc)."""
        return self.route_of_branch(self.router.choose(text))

    def route_of_branch(self, branch):
        """RoutedBranches::RouteOf: (adapter, segments) of `branch`, the base's for -1 or the base."""
        if branch < 0 or branch == self.base:
            return None, set(self.base_segments)
        return branch, set(self.base_segments) | {branch}

    # --- the network, as core/model.cc computes it --------------------------------------------
    def attention(self, x, p, block, adapter):
        B, T, D = x.shape
        hd = D // self.heads
        q, k, v = self.linear(x, p + ".qkv.weight", p + ".qkv.bias", adapter, block + ".qkv").chunk(3, -1)
        q, k, v = (z.view(B, T, self.heads, hd).transpose(1, 2) for z in (q, k, v))  # [B, nh, T, hd]
        att = q @ k.transpose(-2, -1) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.linear(y, p + ".proj.weight", p + ".proj.bias", adapter, block + ".proj")

    def peer_layer(self, x, p, block, adapter, active):
        """PEER (core/peer_layer.h): product-key top-k per segment, top-k over their union."""
        h, dk, k = self.peer.get("heads", 8), self.peer.get("queryDim", 128), self.peer.get("topk", 16)
        xs = x.reshape(-1, self.d)  # [M, D]
        q = self.linear(xs, p + ".query_proj.weight", None, adapter, block + ".query")  # [M, h·dk]
        norm = self.peer.get("queryNorm", "QUERY_NORM_LAYER")
        if norm == "QUERY_NORM_LAYER":
            q = F.layer_norm(q, (h * dk,), self.t(p + ".norm_weight"), self.t(p + ".norm_bias"))
        elif norm == "QUERY_NORM_BATCH":
            q = F.batch_norm(q, self.t(p + ".running_mean"), self.t(p + ".running_var"), self.t(p + ".norm_weight"),
                             self.t(p + ".norm_bias"), training=False, eps=1e-5)
        q = q.view(-1, h, dk).transpose(0, 1)  # [h, M, dk]
        segments = sorted({n[len(p) + 1:].split(".")[0] for n in self.tensors
                           if n.startswith(p + ".segment")}, key=lambda s: int(s[len("segment"):]))
        if active is not None:  # the route's segments only
            segments = [s for s in segments if int(s[len("segment"):]) in active]
        scores, where, rows = [], [], []
        for s in segments:
            keys = self.t(f"{p}.{s}.sub_keys")  # [h, 2, n, dk/2]
            n, half = keys.shape[2], dk // 2
            s1, i1 = torch.bmm(q[..., :half], keys[:, 0].transpose(1, 2)).topk(k, -1)  # [h, M, k]
            s2, i2 = torch.bmm(q[..., half:], keys[:, 1].transpose(1, 2)).topk(k, -1)
            sums = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [h, M, k²]
            ids = (i1.unsqueeze(-1) * n + i2.unsqueeze(-2)).flatten(-2)
            best, pick = sums.topk(k, -1)
            scores.append(best)
            where.append(ids.gather(-1, pick) + sum(r[0].shape[0] for r in rows))  # index into the stacked rows
            rows.append((self.t(f"{p}.{s}.down"), self.t(f"{p}.{s}.up")))
        if len(scores) > 1:
            best, pick = torch.cat(scores, -1).topk(k, -1)
            index = torch.cat(where, -1).gather(-1, pick)
        else:
            best, index = scores[0], where[0]
        down = torch.cat([r[0] for r in rows])  # [N, D] over every segment
        up = torch.cat([r[1] for r in rows])
        M = xs.shape[0]
        w = best.transpose(0, 1).softmax(-1).reshape(M, 1, h * k)  # [M, 1, h·k]
        index = index.transpose(0, 1).reshape(-1)  # token-major [M·h·k]
        u = down[index].view(M, h * k, self.d)
        v = up[index].view(M, h * k, self.d)
        a = torch.bmm(u, xs.unsqueeze(2)).view(M, 1, h * k)  # u_e · x
        return torch.bmm(F.gelu(a) * w, v).view(x.shape)

    def forward(self, tokens, adapter=None, active=None):
        """tokens [B, T] -> logits [B, T, 257], under a route: an adapter id (or None) and the
        segment ids retrieval may use (None: all)."""
        T = tokens.shape[1]
        positions = torch.arange(T)
        x = F.embedding(tokens, self.t("tok_emb.weight")) + F.embedding(positions, self.t("pos_emb.weight"))
        d_tok, d_pos = self.trunk_delta(adapter, "tok_emb"), self.trunk_delta(adapter, "pos_emb")
        if d_tok is not None:
            x = x + F.embedding(tokens, d_tok)
        if d_pos is not None:
            x = x + F.embedding(positions, d_pos)
        for i in range(self.layers):
            b = f"block{i}"
            x = x + self.attention(self.norm(x, b + ".ln1", adapter), b + ".attn", b, adapter)
            n = self.norm(x, b + ".ln2", adapter)
            if i in self.peer_blocks:
                x = x + self.peer_layer(n, b + ".peer", b, adapter, active)
            else:
                hidden = F.gelu(self.linear(n, b + ".dense.fc.weight", b + ".dense.fc.bias", adapter, b + ".fc"))
                x = x + self.linear(hidden, b + ".dense.proj.weight", b + ".dense.proj.bias", adapter, b + ".fc_proj")
        hf = self.norm(x, "ln_f", adapter)
        head = self.t("tok_emb.weight") if d_tok is None else self.t("tok_emb.weight") + d_tok
        logits = hf @ head.t()
        d = self.delta(adapter, "head", hf)
        return logits if d is None else logits + d

    def score(self, text):
        """Bits per byte and ln p of every byte but the first, in windows as core/evaluator.cc cuts them."""
        data = list(text)
        n = len(data)
        if n < 2:
            sys.exit("load_export.py: a text to score needs at least 2 bytes")
        windows, start = [], 0
        while start + self.context + 1 <= n:
            windows.append((start, start + self.context))
            start += self.context
        if n - start >= 2:
            windows.append((start, n - 1))
        def window_log_probs(first, last, route):
            tokens = torch.tensor(data[first:last + 1]).unsqueeze(0)
            logp = self.forward(tokens[:, :-1], *route).log_softmax(-1)[0]  # [L, 257]
            return logp.gather(1, tokens[0, 1:].unsqueeze(1)).squeeze(1).tolist()

        def bigram_route(first):  # the bytes before the window and its first, never one it predicts
            return self.route_of(text[max(0, first - self.route_context):first + 1])

        log_probs, offsets = [], []
        with torch.no_grad():
            routes = []
            if self.router and self.route_candidates > 0:
                routes = [self.route_of_branch(b) for b in self.router.candidates(text, self.route_candidates)]
            if routes:
                # Routed by the model (core/evaluator.cc ChooseByCandidates): each window runs the
                # candidate under which the windows within route_context before it scored best.
                scored = [[window_log_probs(f, l, r) for f, l in windows] for r in routes]
                nats = [[-sum(lp) for lp in per_window] for per_window in scored]
                start = 0
                for w, (first, last) in enumerate(windows):
                    while start < w and windows[start][0] < first - self.route_context:
                        start += 1
                    if start < w:
                        sums = [sum(n[start:w]) for n in nats]
                        route = routes[sums.index(min(sums))]
                    else:  # nothing before it: the router's pick, a candidate or not
                        route = bigram_route(first)
                    log_probs += scored[routes.index(route)][w] if route in routes else \
                        window_log_probs(first, last, route)
                    offsets += list(range(first + 1, last + 1))
            else:
                for first, last in windows:
                    route = bigram_route(first) if self.router else (None, None)
                    log_probs += window_log_probs(first, last, route)
                    offsets += list(range(first + 1, last + 1))
        bits = -sum(log_probs) / len(log_probs) / math.log(2)
        return {"bitsPerByte": bits, "predictedBytes": len(log_probs), "logProbs": log_probs, "offsets": offsets}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="what `peerctl export DIR` wrote")
    parser.add_argument("--score", metavar="FILE", help="score this file's bytes; prints JSON")
    args = parser.parse_args()
    for name in ("model.safetensors", "config.json"):
        if not os.path.exists(os.path.join(args.dir, name)):
            sys.exit(f"load_export.py: no {name} in {args.dir} (write one with: peerctl export {args.dir})")
    torch.set_num_threads(1)
    model = Export(args.dir)
    if args.score:
        with open(args.score, "rb") as f:
            print(json.dumps(model.score(f.read())))
        return
    total = sum(t.numel() for t in model.tensors.values())
    print(f"{len(model.tensors)} tensors, {total} numbers; step {model.manifest.get('step')}; "
          f"{len(model.manifest.get('frozen', []))} frozen segments; d_model {model.d}, {model.layers} layers, "
          f"context {model.context}")


if __name__ == "__main__":
    main()
