#!/usr/bin/python3
"""The long stream's report (bench/LONG.md): medians over seeds of `peer-bench forgetting` runs,
the goal's comparison, the dense width sweep, where the dense model's held-out loss stops
improving, and a plot of ACC and of every domain's held-out loss along the stream.

usage: long_report.py [--doc LONG.md [--section NAME]] [--plot OUT.svg] [--curves OUT.svg] [--json OUT.json]
                      [TAG=]RUN.jsonl...
  RUN.jsonl: rows of `peer-bench forgetting --json-out`, one file per seed (scripts/long_stream.sh);
             TAG= names its policies POLICY@TAG (a run of other settings, e.g. rc128=…)
  --doc:  replace the text between the report markers of this Markdown file with the tables
  --section: the markers that name NAME ("<!-- long_report.py NAME: begin -->"), for a page with
          more than one report (another length of stream); without it, the unnamed markers
  --plot: draw ACC and each domain's held-out bits/byte after every phase, medians over seeds
  --curves: draw each domain's held-out bits/byte along its own phase (--curve-every), a line per
          policy run with curves, medians over its seeds: where a curve is flat, the model has
          stopped improving on that domain
  --json: the medians and the goal's verdict as one JSON object
A run with --route-by model also gives POLICY/bigram: the same model routed by the bigram router.
A run with --branch-scores also gets a table of each task on every branch (the best a router could
choose).
The tables go to stdout as well."""
import argparse, json, statistics, sys

GOAL_ACC_RATIO = 0.97  # grown PEER's final ACC at least 3 % lower (better) than dense+recipe's
RECIPE = "dense+recipe"
GROWN = "routed"  # the grown PEER policies: routed, routed+recipe, and their tagged runs


def load(paths):
    """{policy: {seed: row}} in the order policies first appear."""
    runs = {}
    for arg in paths:
        tag, _, path = arg.rpartition("=")
        for line in open(path):
            r = json.loads(line)
            if "error" in r:
                sys.exit(f"long_report.py: {path}: {r['policy']}: {r['error']}")
            if tag:
                r["policy"] += "@" + tag
            seed = r["config_seed"]
            if "bigram_routing" in r:  # --route-by model: the same model routed by bigrams too
                b = {**r, **r["bigram_routing"], "policy": r["policy"] + "/bigram"}
                del b["bigram_routing"]
                # Curves and branch scores run each domain on its own branch, whatever routes
                # the held-out windows: the model's row has them, the bigram router's would repeat them.
                b.pop("curves", None), b.pop("branch_scores", None)
                runs.setdefault(b["policy"], {})[seed] = b
            if seed in runs.get(r["policy"], {}):
                sys.exit(f"long_report.py: {path}: a second {r['policy']} row of seed {seed} (tag one of the runs)")
            runs.setdefault(r["policy"], {})[seed] = r
    if not runs:
        sys.exit("long_report.py: no rows in " + ", ".join(paths))
    return runs


def markers(section):
    """The markers of the report's section in the document: unnamed, or naming `section`."""
    name = f" {section}" if section else ""
    return f"<!-- long_report.py{name}: begin -->", f"<!-- long_report.py{name}: end -->"


def median(xs):
    return statistics.median(xs)


def spread(xs, fmt="{:.3f}"):
    """median [min–max] of several seeds; the value alone for one."""
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(median(xs))} [{fmt.format(min(xs))}–{fmt.format(max(xs))}]"


def trained(label):
    """The task a row of the matrix was scored after: "base broad", "after kjv"."""
    return label.split(" ", 1)[1]


def acc_along(row):
    """ACC after each phase: mean held-out bits/byte over the tasks trained so far."""
    tasks, so_far, out = row["tasks"], [], []
    for label, scores in zip(row["labels"][1:], row["matrix"][1:]):
        so_far.append(tasks.index(trained(label)))
        out.append(statistics.fmean(scores[j] for j in so_far))
    return out


def median_matrix(rows):
    return [[median(r["matrix"][i][j] for r in rows) for j in range(len(rows[0]["tasks"]))]
            for i in range(len(rows[0]["matrix"]))]


def goal_table(runs, out):
    recipe = runs.get(RECIPE, {})
    out.append("| policy | seeds | active params | all params | ACC bits/byte | mean forgetting | plasticity "
               "| ACC ÷ dense+recipe | old text kept | wall s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    verdicts = {}
    for policy, by_seed in runs.items():
        rows = [by_seed[s] for s in sorted(by_seed)]
        ratios = [by_seed[s]["acc"] / recipe[s]["acc"] for s in sorted(by_seed) if s in recipe]
        r0 = rows[0]
        out.append(
            f"| {policy} | {len(rows)} | {r0['active_params']:,} | {r0['total_params']:,} "
            f"| {spread([r['acc'] for r in rows])} | {spread([r['mean_forgetting'] for r in rows])} "
            f"| {spread([r['plasticity_bpb'] for r in rows])} | {spread(ratios) if ratios else '–'} "
            f"| {r0['kept_old_text_bytes'] / 1e6:.1f} MB | {median([r['wall_seconds'] for r in rows]):.0f} |")
        if policy.startswith(GROWN) and ratios:
            common = [s for s in sorted(by_seed) if s in recipe]
            f_grown = median([by_seed[s]["mean_forgetting"] for s in common])
            f_recipe = median([recipe[s]["mean_forgetting"] for s in common])
            verdicts[policy] = {
                "seeds": common,
                "acc_ratio_vs_dense_recipe": median(ratios),
                "mean_forgetting": f_grown,
                "dense_recipe_mean_forgetting": f_recipe,
                "met": median(ratios) <= GOAL_ACC_RATIO and f_grown <= f_recipe,
            }
    out.append("")
    out.append("Medians over seeds, [lowest–highest] beside them; ACC ÷ dense+recipe is the median of the "
               "per-seed ratios (same seed, same batches).")
    out.append("")
    for policy, v in verdicts.items():
        out.append(f"- **{policy}** vs dense+recipe ({len(v['seeds'])} seeds): ACC ratio "
                   f"{v['acc_ratio_vs_dense_recipe']:.4f} (goal ≤ {GOAL_ACC_RATIO}), mean forgetting "
                   f"{v['mean_forgetting']:.4f} vs {v['dense_recipe_mean_forgetting']:.4f} (goal ≤): "
                   f"**{'met' if v['met'] else 'not met'}**.")
    return verdicts


def width_table(runs, out):
    """The dense policies at every width run (dense-x2, dense+recipe@x2, …), narrowest first."""
    dense = [p for p in runs if p.startswith("dense")]
    if len({runs[p][min(runs[p])]["dense_hidden"] for p in dense}) < 2:
        return
    seeds = set.intersection(*(set(runs[p]) for p in dense))
    if not seeds:
        return
    out.append(f"Dense widths, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}:")
    out.append("")
    out.append("| policy | FFN width | active params | ACC bits/byte | mean forgetting | plasticity |")
    out.append("|---|---|---|---|---|---|")
    family = lambda p: p.split("@")[0].split("-x")[0]
    for p in sorted(dense, key=lambda p: (family(p) != "dense", runs[p][min(seeds)]["dense_hidden"])):
        rows = [runs[p][s] for s in sorted(seeds)]
        out.append(f"| {p} | {rows[0]['dense_hidden']:,} | {rows[0]['active_params']:,} "
                   f"| {spread([r['acc'] for r in rows])} | {spread([r['mean_forgetting'] for r in rows])} "
                   f"| {spread([r['plasticity_bpb'] for r in rows])} |")


def curve_table(runs, out):
    """Held-out bits/byte of the domain being trained along its phase (--curve-every)."""
    base, seed = next(((p, s) for p in ("dense", RECIPE) for s, r in sorted(runs.get(p, {}).items())
                       if r.get("curves")), (None, None))
    if seed is None:
        return
    dense = runs[base][seed]
    others = [p for p in runs if p != base and runs[p].get(seed, {}).get("curves")]
    steps = dense["steps_per_domain"]
    marks = [pt[0] for pt in dense["curves"][0]["points"]]
    quarter = [m for m in marks if m <= steps * 3 // 4][-1]

    def gain(c):  # bits/byte the last quarter of the phase gained: where it stops, it is full
        at = dict((pt[0], pt[1]) for pt in c["points"])
        return at[quarter] - at[marks[-1]]

    out.append(f"{base}, seed {seed}: the trained domain's held-out bits/byte along its phase of {steps} steps, "
               f"and what the steps after {quarter} gained (a model that has stopped improving gains ~0):")
    out.append("")
    head = " | ".join(f"step {m}" for m in marks)
    out.append(f"| domain | {head} | gained after {quarter} | " + " | ".join(f"{p}: gained" for p in others) + " |")
    out.append("|---" * (len(marks) + 2 + len(others)) + "|")
    for i, c in enumerate(dense["curves"]):
        cells = " | ".join(f"{pt[1]:.3f}" for pt in c["points"])
        rest = " | ".join(f"{gain(runs[p][seed]['curves'][i]):+.3f}" for p in others)
        out.append(f"| {c['task']} | {cells} | {gain(c):+.3f} | {rest} |")


def branch_table(runs, out):
    """--branch-scores: each task under its router's choice, its own branch and the best branch."""
    for policy, by_seed in runs.items():
        seed = next((s for s, r in sorted(by_seed.items()) if r.get("branch_scores")), None)
        if seed is None:
            continue
        r = by_seed[seed]
        trained_on, scores = r["branch_scores"]["branches"], r["branch_scores"]["scores"]
        final = r["matrix"][-1]
        out.append(f"{policy}, seed {seed}: each task at the end as routed, on the branch trained on it, and on the "
                   "branch that scores it best (the whole held-out text on one branch):")
        out.append("")
        out.append("| task | as routed | own branch | best branch | its bits/byte |")
        out.append("|---|---|---|---|---|")
        best_all = []
        for task, routed, per_branch in zip(r["tasks"], final, scores):
            own = per_branch[trained_on.index(task)] if task in trained_on else float("nan")
            b = min(range(len(per_branch)), key=per_branch.__getitem__)
            best_all.append(per_branch[b])
            out.append(f"| {task} | {routed:.3f} | {own:.3f} | {trained_on[b]} | {per_branch[b]:.3f} |")
        out.append(f"| ACC | {statistics.fmean(final):.3f} | | | {statistics.fmean(best_all):.3f} |")
        out.append("")


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = {p: median_matrix(list(by_seed.values())) for p, by_seed in runs.items()}
    first = next(iter(runs.values()))
    row0 = next(iter(first.values()))
    tasks, labels = row0["tasks"], [trained(l) for l in row0["labels"][1:]]
    cols = 4
    rows = (len(tasks) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows))
    axes = list(axes.flat)
    x = range(len(labels))
    colours = plt.get_cmap("tab10").colors
    values = [[] for _ in range(len(tasks) + 1)]  # what each panel draws: its scale leaves out spikes
    for n, (p, m) in enumerate(medians.items()):
        acc = acc_along({"tasks": tasks, "labels": row0["labels"], "matrix": m})
        style = dict(color=colours[n % len(colours)], linewidth=1.3, linestyle="-" if n < len(colours) else "--")
        axes[0].plot(x, acc, label=p, **style)
        values[0] += acc
        for j, task in enumerate(tasks):
            line = [m[i + 1][j] for i in x]
            axes[j + 1].plot(x, line, **style)
            values[j + 1] += line
    # A policy that forgets spikes far above the others; the panels keep the others readable and
    # let those spikes leave the top (the 75th percentile of what a panel draws, plus a margin).
    for a, v in zip(axes, values):
        v = sorted(v)
        low, high = v[0], v[(3 * len(v)) // 4]
        a.set_ylim(low - 0.05 * (high - low), high + 0.25 * (high - low))
    axes[0].set_title("ACC: mean over the tasks trained so far (lower is better)", fontsize=9)
    axes[0].legend(fontsize=7)
    for j, task in enumerate(tasks):
        axes[j + 1].set_title(f"{task} held-out", fontsize=9)
        axes[j + 1].axvline(labels.index(task), color="grey", linewidth=0.6, linestyle=":")
    for a in axes[len(tasks) + 1:]:
        a.axis("off")
    for a in axes[:len(tasks) + 1]:
        a.set_xticks(list(x))
        a.set_xticklabels(labels, rotation=90, fontsize=6)
        a.tick_params(axis="y", labelsize=7)
        a.set_ylabel("bits/byte", fontsize=7)
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    fig.suptitle(f"The long stream: held-out bits/byte after each phase (medians over seeds {seeds}; "
                 "dotted: the domain's own phase; higher values leave the top of a panel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = {p: [r for r in by_seed.values() if r.get("curves")] for p, by_seed in runs.items()}
    with_curves = {p: rows for p, rows in with_curves.items() if rows}
    if not with_curves:
        sys.exit("long_report.py: --curves: no run has curves (peer-bench forgetting --curve-every)")
    first = next(iter(with_curves.values()))[0]
    tasks = [c["task"] for c in first["curves"]]
    cols = 4
    fig, axes = plt.subplots((len(tasks) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(tasks) + 3) // 4)))
    axes = list(axes.flat)
    colours = plt.get_cmap("tab10").colors
    for n, (p, rows) in enumerate(with_curves.items()):
        for i, task in enumerate(tasks):
            steps = [pt[0] for pt in rows[0]["curves"][i]["points"]]
            line = [median(r["curves"][i]["points"][k][1] for r in rows) for k in range(len(steps))]
            axes[i].plot(steps, line, color=colours[n % len(colours)], linewidth=1.3, marker=".",
                         label=f"{p} ({len(rows)} seed{'s' if len(rows) > 1 else ''})")
    for i, task in enumerate(tasks):
        axes[i].set_title(f"{task}: its own phase", fontsize=9)
        axes[i].set_xlabel("step of the phase", fontsize=7)
        axes[i].set_ylabel("held-out bits/byte", fontsize=7)
        axes[i].tick_params(labelsize=7)
        # The first point is the domain before any step on it, far above the rest: leave it out of the scale.
        later = [v for l in axes[i].get_lines() for v in l.get_ydata()[1:]]
        if later:
            low, high = min(later), max(later)
            axes[i].set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    axes[0].legend(fontsize=7)
    for a in axes[len(tasks):]:
        a.axis("off")
    fig.suptitle("Each domain's held-out bits/byte along its own phase (medians over seeds; where a line is "
                 "flat, the model has stopped improving on it; the step-0 point leaves the top)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--doc")
    ap.add_argument("--section")
    ap.add_argument("--plot")
    ap.add_argument("--curves")
    ap.add_argument("--json")
    a = ap.parse_args()
    runs = load(a.runs)
    out = []
    verdicts = goal_table(runs, out)
    out.append("")
    width_table(runs, out)
    out.append("")
    curve_table(runs, out)
    out.append("")
    branch_table(runs, out)
    text = "\n".join(out).strip() + "\n"
    print(text)
    if a.plot:
        plot(runs, a.plot)
    if a.curves:
        plot_curves(runs, a.curves)
    if a.json:
        summary = {"policies": {p: {"seeds": sorted(by_seed),
                                    "acc": median([r["acc"] for r in by_seed.values()]),
                                    "mean_forgetting": median([r["mean_forgetting"] for r in by_seed.values()]),
                                    "plasticity_bpb": median([r["plasticity_bpb"] for r in by_seed.values()]),
                                    "acc_along_stream": acc_along({**next(iter(by_seed.values())),
                                                                   "matrix": median_matrix(list(by_seed.values()))})}
                                for p, by_seed in runs.items()},
                   "goal": verdicts}
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    if a.doc:
        begin, end = markers(a.section)
        doc = open(a.doc).read()
        if begin not in doc or end not in doc:
            sys.exit(f"long_report.py: {a.doc} has no {begin} … {end} section to fill")
        head, rest = doc.split(begin, 1)
        with open(a.doc, "w") as f:
            f.write(head + begin + "\n" + text + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
