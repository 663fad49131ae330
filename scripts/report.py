#!/usr/bin/python3
"""Turns the forgetting report peerd returns (GET /v1/eval, saved as OUT/report.json) into the
demo's matrix and metrics on stdout, OUT/report.md and the plot OUT/forgetting.svg.

usage: report.py OUT_DIR"""
import json, sys


def num(v):
    return float(v) if v is not None else float("nan")


def main():
    out = sys.argv[1]
    r = json.load(open(out + "/report.json"))
    rows = r.get("rows", [])
    if not rows:
        sys.exit("report.py: no evaluation rows")
    tasks = rows[-1]["tasks"]
    phases = [row for row in rows if row["label"] == "init" or row["label"].startswith("after ")]

    def score(row, t):
        return num(row["bitsPerByte"][row["tasks"].index(t)]) if t in row["tasks"] else float("nan")

    lines = ["# peerd demo: held-out bits per byte after each domain", "",
             "| after \\ task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for row in phases:
        lines.append(f"| {row['label']} (step {row['step']}) | " + " | ".join(f"{score(row, t):.3f}" for t in tasks) + " |")
    forgetting = r.get("forgetting", {})
    lines += ["", f"- final average ACC: **{num(r.get('acc')):.3f}** bits/byte (mean of the last row; lower is better)",
              f"- backward transfer BWT: {num(r.get('bwt')):+.3f} (negative = forgetting)",
              f"- forward transfer FWT: {num(r.get('fwt')):+.3f} (positive = earlier domains helped later ones)",
              f"- mean forgetting: {num(r.get('meanForgetting')):.3f} bits/byte",
              "- forgetting per task (final − best earlier): " +
              ", ".join(f"{t} {num(forgetting.get(t)):+.3f}" for t in tasks if t in forgetting), ""]
    md = "\n".join(lines)
    open(out + "/report.md", "w").write(md + "\n")
    print(md)

    # The plot: every evaluation row, one line per task, domain boundaries marked.
    W, H, L, R, T, B = 900, 460, 60, 150, 30, 50
    steps = [int(row["step"]) for row in rows]
    values = [score(row, t) for row in rows for t in tasks if score(row, t) == score(row, t)]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values) - 0.1, max(values) + 0.1
    X = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v: T + (y1 - v) / (y1 - y0) * (H - T - B)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">held-out bits per byte while training domain after domain</text>']
    for row in phases[1:]:
        x = X(int(row["step"]))
        svg.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#999" stroke-dasharray="4,3"/>')
        svg.append(f'<text x="{x - 4:.1f}" y="{H - B + 14}" text-anchor="end" fill="#555">{row["label"]}</text>')
    for k in range(6):
        v = y0 + (y1 - y0) * k / 5
        svg.append(f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
        svg.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W - R}" y2="{Y(v):.1f}" stroke="#eee"/>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">training step</text>')
    for i, t in enumerate(tasks):
        pts = [(X(int(row["step"])), Y(score(row, t))) for row in rows if score(row, t) == score(row, t)]
        c = colors[i % len(colors)]
        svg.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (c, " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)))
        svg.append(f'<text x="{W - R + 8}" y="{T + 16 * i + 10}" fill="{c}">{t}</text>')
    svg.append("</svg>")
    open(out + "/forgetting.svg", "w").write("\n".join(svg) + "\n")
    print(f"report: {out}/report.md, {out}/report.json, {out}/forgetting.svg")


if __name__ == "__main__":
    main()
