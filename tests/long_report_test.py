#!/usr/bin/python3
"""scripts/long_report.py on made-up runs of two seeds: medians and the per-seed ACC ratios, the
goal's verdict both ways, ACC along the stream, the width sweep ordered by width, the saturation
table, the section of the document it fills, a named one beside it (and the error when the
markers are missing), the plot, and the plot of the curves along each phase. usage: long_report_test.py SOURCE_DIR"""
import json, os, subprocess, sys, tempfile

src = sys.argv[1]
script = os.path.join(src, "scripts/long_report.py")
TASKS = ["broad", "a", "b"]
LABELS = ["init", "base broad", "after a", "after b"]


def row(policy, seed, final, forgetting, width=0, curves=()):
    # Rows: init, then after each phase; the last row is the final scores.
    matrix = [[6.0, 6.0, 6.0], [5.0, 5.5, 5.5], [5.2, 4.0, 5.0], final]
    return {"policy": policy, "config_seed": seed, "tasks": TASKS, "labels": LABELS, "matrix": matrix,
            "acc": sum(final) / 3, "mean_forgetting": forgetting, "plasticity_bpb": 4.0, "active_params": 1000,
            "total_params": 5000 if policy.startswith("routed") else 1000, "kept_old_text_bytes": 0,
            "wall_seconds": 10.0, "dense_hidden": width, "steps_per_domain": 40,
            "curves": [{"task": t, "phase": i + 1, "points": [[0, 5.0], [10, 4.5], [20, 4.2], [30, 4.1], [40, 4.0]]}
                       for i, t in enumerate(["a", "b"])] if curves else []}


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def run(*args, check=True):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=check)


with tempfile.TemporaryDirectory() as tmp:
    s1, s2 = os.path.join(tmp, "seed1.jsonl"), os.path.join(tmp, "seed2.jsonl")
    # Seed 1: routed's ACC 3.0 vs dense+recipe's 3.3 (ratio 0.909); seed 2: 3.2 vs 3.3 (0.970).
    write(s1, [row("dense", 1, [5.0, 5.0, 5.0], 0.5, width=100, curves=True),
               row("dense-x2", 1, [4.0, 4.0, 4.0], 0.4, width=200, curves=True),
               row("dense-x0.5", 1, [6.0, 6.0, 6.0], 0.6, width=50, curves=True),
               row("dense+recipe", 1, [3.3, 3.3, 3.3], 0.02), row("routed", 1, [3.0, 3.0, 3.0], 0.0)])
    write(s2, [row("dense", 2, [5.0, 5.0, 5.0], 0.5, width=100),
               row("dense+recipe", 2, [3.3, 3.3, 3.3], 0.04), row("routed", 2, [3.2, 3.2, 3.2], 0.01)])
    doc = os.path.join(tmp, "LONG.md")
    with open(doc, "w") as f:
        f.write("# head\n<!-- long_report.py: begin -->\nstale\n<!-- long_report.py: end -->\nprose after\n")
    summary, picture = os.path.join(tmp, "summary.json"), os.path.join(tmp, "long.svg")
    out = run("--doc", doc, "--json", summary, "--plot", picture, s1, s2).stdout

    s = json.load(open(summary))
    routed = s["goal"]["routed"]
    assert routed["seeds"] == [1, 2], routed
    assert abs(routed["acc_ratio_vs_dense_recipe"] - (3.0 / 3.3 + 3.2 / 3.3) / 2) < 1e-9, routed
    assert abs(routed["mean_forgetting"] - 0.005) < 1e-9 and abs(routed["dense_recipe_mean_forgetting"] - 0.03) < 1e-9
    assert routed["met"] is True, routed  # ratio 0.939 ≤ 0.97 and forgetting 0.005 ≤ 0.03
    assert abs(s["policies"]["routed"]["acc"] - 3.1) < 1e-9, s["policies"]["routed"]
    # ACC along the stream: after broad the mean over broad; after a over broad and a; then all three.
    along = s["policies"]["dense"]["acc_along_stream"]
    assert [round(v, 6) for v in along] == [5.0, 4.6, 5.0], along
    assert "| routed | 2 |" in out and "3.100 [3.000–3.200]" in out, out
    assert "**routed** vs dense+recipe (2 seeds)" in out and "**met**" in out, out
    # The width sweep lists the dense widths narrowest first.
    widths = [l.split("|")[1].strip() for l in out.splitlines() if l.startswith("| dense") and l.count("|") == 7]
    assert widths == ["dense-x0.5", "dense", "dense-x2", "dense+recipe"], widths
    # What the last quarter of each phase gained: 4.1 → 4.0.
    assert "| a | 5.000 | 4.500 | 4.200 | 4.100 | 4.000 | +0.100 |" in out, out
    text = open(doc).read()
    assert text.startswith("# head\n<!-- long_report.py: begin -->\n") and text.endswith(
        "<!-- long_report.py: end -->\nprose after\n"), text
    assert "stale" not in text and "| routed | 2 |" in text, text
    assert open(picture).read().lstrip().startswith(("<?xml", "<svg")), "the plot is not an SVG"
    # The curves along each phase: a panel per domain with a line per policy run with curves.
    curves = os.path.join(tmp, "curves.svg")
    run("--curves", curves, s1, s2)
    drawn = open(curves).read()
    assert drawn.lstrip().startswith(("<?xml", "<svg")), "the curves are not an SVG"
    for label in ("a: its own phase", "b: its own phase", "dense (1 seed)", "dense-x2 (1 seed)"):
        assert label in drawn, label
    no_curves = run("--curves", curves, s2, check=False)
    assert no_curves.returncode != 0 and "no run has curves" in no_curves.stderr, no_curves.stderr

    # A tagged run of other settings is a policy of its own; an untagged second row of a seed is refused.
    tagged = os.path.join(tmp, "other.jsonl")
    write(tagged, [row("routed", 1, [3.6, 3.6, 3.6], 0.0)])
    run("--json", summary, s1, s2, "rc512=" + tagged)
    s = json.load(open(summary))
    assert s["policies"]["routed@rc512"]["seeds"] == [1] and s["goal"]["routed@rc512"]["met"] is False, s["goal"]
    assert s["policies"]["routed"]["seeds"] == [1, 2], s["policies"]["routed"]
    twice = run(s1, s2, tagged, check=False)
    assert twice.returncode != 0 and "a second routed row of seed 1" in twice.stderr, twice.stderr

    # A run routed by the model also reports the same model routed by the bigram router, as
    # POLICY/bigram with its own ACC and goal; the curves are the model's row's alone.
    routed = row("routed", 1, [3.0, 3.0, 3.0], 0.0, curves=True)
    routed["bigram_routing"] = {"matrix": routed["matrix"][:-1] + [[3.2, 3.2, 3.2]], "acc": 3.2,
                                "mean_forgetting": 0.0, "plasticity_bpb": 4.1}
    by_model = os.path.join(tmp, "model.jsonl")
    write(by_model, [row("dense+recipe", 1, [3.3, 3.3, 3.3], 0.02, curves=True), routed])
    out = run("--json", summary, by_model).stdout
    s = json.load(open(summary))
    assert abs(s["policies"]["routed/bigram"]["acc"] - 3.2) < 1e-9 and abs(s["policies"]["routed"]["acc"] - 3.0) < 1e-9
    assert s["goal"]["routed/bigram"]["met"] is True and s["goal"]["routed"]["met"] is True, s["goal"]
    assert "| routed: gained |" in out and "routed/bigram: gained" not in out, out

    # Forgetting above dense+recipe's fails the goal, whatever the ACC.
    write(s2, [row("dense+recipe", 2, [3.3, 3.3, 3.3], 0.0), row("routed", 2, [3.2, 3.2, 3.2], 0.05)])
    write(s1, [row("dense+recipe", 1, [3.3, 3.3, 3.3], 0.0), row("routed", 1, [3.0, 3.0, 3.0], 0.05)])
    run("--json", summary, s1, s2)
    assert json.load(open(summary))["goal"]["routed"]["met"] is False

    # --section fills its own named markers and leaves the page's other report as it was.
    with open(doc, "w") as f:
        f.write("<!-- long_report.py: begin -->\nfirst\n<!-- long_report.py: end -->\n"
                "<!-- long_report.py s3000: begin -->\nstale\n<!-- long_report.py s3000: end -->\n")
    run("--doc", doc, "--section", "s3000", s1, s2)
    text = open(doc).read()
    assert text.startswith("<!-- long_report.py: begin -->\nfirst\n<!-- long_report.py: end -->\n"), text
    assert "stale" not in text and "| routed | 2 |" in text.split("s3000: begin -->", 1)[1], text
    missing = run("--doc", doc, "--section", "s9000", s1, check=False)
    assert missing.returncode != 0 and "no <!-- long_report.py s9000: begin -->" in missing.stderr, missing.stderr

    with open(doc, "w") as f:
        f.write("# no markers\n")
    failed = run("--doc", doc, s1, check=False)
    assert failed.returncode != 0 and "no <!-- long_report.py: begin -->" in failed.stderr, failed.stderr
    print("ok: medians, per-seed ratios, the goal both ways, ACC along the stream, widths, curves, doc, plot")
