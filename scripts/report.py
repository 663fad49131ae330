#!/usr/bin/python3
"""The pictures of a peerd run, without a browser: the forgetting matrix as a heatmap and the
curves (training bits/byte by step from the history, held-out bits/byte per task by step, each
task's phase end marked) as PNG and SVG, and the matrix with its metrics as Markdown.

peerctl report DIR fetches GET /v1/eval into DIR/report.json and GET /v1/history into
DIR/history.json, then runs this script (compiled into peerctl) on DIR. It writes DIR/report.md,
DIR/heatmap.png, DIR/heatmap.svg, DIR/curves.png and DIR/curves.svg, and prints the Markdown.
Needs Debian's python3-matplotlib.

usage: report.py DIR"""
import json, math, sys

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("report: drawing needs matplotlib: apt-get install python3-matplotlib (or scripts/setup.sh)")


def num(v):
    return float(v) if v is not None else float("nan")


def main():
    out = sys.argv[1]
    r = json.load(open(out + "/report.json"))
    rows = r.get("rows", [])
    if not rows:
        sys.exit("report: no evaluation rows yet (peerctl eval run)")
    try:
        history = json.load(open(out + "/history.json")).get("steps", [])
    except FileNotFoundError:
        history = []
    tasks = rows[-1]["tasks"]
    trained_since = r.get("trainedSincePrevious", [""] * len(rows))

    def score(row, t):
        return num(row["bitsPerByte"][row["tasks"].index(t)]) if t in row["tasks"] else float("nan")

    # Markdown: every row, what the spool says trained since the row before, the metrics.
    lines = ["# peerd: held-out bits per byte, row by row", "",
             "| row (step) | " + " | ".join(tasks) + " | trained since the row before |", "|---" * (len(tasks) + 2) + "|"]
    for i, row in enumerate(rows):
        since = trained_since[i] if i < len(trained_since) else ""
        lines.append(f"| {row.get('label') or 'row ' + str(i)} ({row['step']}) | " +
                     " | ".join(f"{score(row, t):.3f}" for t in tasks) + f" | {since or '–'} |")
    forgetting = r.get("forgetting", {})
    lines += ["", f"- final average ACC: **{num(r.get('acc')):.3f}** bits/byte (mean of the last row; lower is better)",
              f"- backward transfer BWT: {num(r.get('bwt')):+.3f} (negative = forgetting)",
              f"- forward transfer FWT: {num(r.get('fwt')):+.3f} (positive = earlier domains helped later ones)",
              f"- mean forgetting: {num(r.get('meanForgetting')):.3f} bits/byte",
              "- forgetting per task (final − best earlier): " +
              (", ".join(f"{t} {num(forgetting.get(t)):+.3f}" for t in tasks if t in forgetting) or "none yet"), ""]
    md = "\n".join(lines)
    open(out + "/report.md", "w").write(md + "\n")
    print(md)

    # The heatmap: rows × tasks, green = low bits/byte, red = high.
    matrix = [[score(row, t) for t in tasks] for row in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(tasks), 0.9 + 0.38 * len(rows)))
    image = ax.imshow(matrix, cmap="RdYlGn_r", aspect="auto")
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=[f"{row.get('label') or 'row ' + str(i)} @{row['step']}" for i, row in enumerate(rows)])
    for i, values in enumerate(matrix):
        for j, v in enumerate(values):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="held-out bits/byte")
    ax.set_title("forgetting matrix")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(f"{out}/heatmap.{ext}", dpi=110)
    plt.close(fig)

    # The curves: training bits/byte (history) and held-out bits/byte per task, phase ends marked.
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    if history:
        top.plot([int(p["step"]) + int(p.get("steps", 1)) - 1 for p in history], [num(p.get("bitsPerByte")) for p in history],
                 lw=0.8, color="#1f77b4")
    top.set_ylabel("training bits/byte")
    top.set_title("training loss by step" + ("" if history else " (no history)"))
    for t in tasks:
        points = [(int(row["step"]), score(row, t)) for row in rows if not math.isnan(score(row, t))]
        bottom.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=t)
    bottom.set_ylabel("held-out bits/byte")
    bottom.set_xlabel("training step")
    bottom.legend(fontsize=8, loc="upper right")
    for task, at in (r.get("trainedAt") or {}).items():
        if 0 <= at < len(rows):
            for axis in (top, bottom):
                axis.axvline(int(rows[at]["step"]), color="#999", ls="--", lw=0.8)
            top.annotate(f"{task} ends", (int(rows[at]["step"]), 1), xycoords=("data", "axes fraction"),
                         fontsize=7, rotation=90, va="top", ha="right", color="#555")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(f"{out}/curves.{ext}", dpi=110)
    plt.close(fig)
    print(f"report: {out}/report.md, heatmap.png, heatmap.svg, curves.png, curves.svg")


if __name__ == "__main__":
    main()
