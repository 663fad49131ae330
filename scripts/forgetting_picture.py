#!/usr/bin/python3
"""The learning–forgetting picture: mean forgetting against plasticity, one point per policy and
(learning rate, steps per domain) of a sweep of `peer-bench forgetting` runs, so that policies are
compared at matched plasticity rather than at one setting. Lower is better on both axes.

usage: forgetting_picture.py OUT.svg RUN.jsonl...   (rows of peer-bench forgetting --json-out)
Prints the points as a table too."""
import json, sys

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, paths = sys.argv[1], sys.argv[2:]
    points = []  # (policy, lr, steps, plasticity, forgetting, old text kept)
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if "error" in r:
                sys.exit(f"forgetting_picture.py: {path}: {r['policy']}: {r['error']}")
            points.append((r["policy"], r["stream_lr"], r["steps_per_domain"], r["plasticity_bpb"],
                           r["mean_forgetting"], r["kept_old_text_bytes"]))
    if not points:
        sys.exit("forgetting_picture.py: no rows in " + ", ".join(paths))
    policies = sorted({p[0] for p in points}, key=lambda name: [q[0] for q in points].index(name))

    print(f"{'policy':<22} {'lr':>8} {'steps':>6} {'plasticity':>10} {'forgetting':>10} {'old text kept':>14}")
    for p in sorted(points, key=lambda p: (policies.index(p[0]), p[1], p[2])):
        print(f"{p[0]:<22} {p[1]:>8.4g} {p[2]:>6} {p[3]:>10.3f} {p[4]:>10.3f} {p[5]:>14,}")

    W, H, L, R, T, B = 760, 480, 70, 190, 30, 50
    xs, ys = [p[3] for p in points], [p[4] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.08 or 0.1, (y1 - y0) * 0.08 or 0.05
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v: H - B - (v - y0) / (y1 - y0) * (H - T - B)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">Forgetting against plasticity (bits/byte; lower is better on both)</text>']
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        svg.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W - R}" y2="{Y(v):.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        u = x0 + (x1 - x0) * i / 5
        svg.append(f'<line x1="{X(u):.1f}" y1="{T}" x2="{X(u):.1f}" y2="{H - B}" stroke="#eee"/>')
        svg.append(f'<text x="{X(u):.1f}" y="{H - B + 16}" text-anchor="middle">{u:.2f}</text>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">plasticity: bits/byte on each '
               f'domain just after training it</text>')
    svg.append(f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 '
               f'{(T + H - B) / 2})">mean forgetting</text>')
    for i, policy in enumerate(policies):
        colour = COLOURS[i % len(COLOURS)]
        mine = sorted((p for p in points if p[0] == policy), key=lambda p: p[3])
        svg.append('<polyline fill="none" stroke="%s" stroke-opacity="0.4" points="%s"/>'
                   % (colour, " ".join(f"{X(p[3]):.1f},{Y(p[4]):.1f}" for p in mine)))
        for p in mine:
            svg.append(f'<circle cx="{X(p[3]):.1f}" cy="{Y(p[4]):.1f}" r="4" fill="{colour}"/>')
            svg.append(f'<text x="{X(p[3]) + 6:.1f}" y="{Y(p[4]) - 5:.1f}" font-size="9" fill="{colour}">'
                       f'{p[1]:g}×{p[2]}</text>')
        kept = "keeps old text" if any(p[5] for p in mine) else "keeps no old text"
        svg.append(f'<text x="{W - R + 12}" y="{T + 20 * i + 12}" fill="{colour}">{policy} ({kept})</text>')
    svg.append(f'<text x="{W - R + 12}" y="{T + 20 * len(policies) + 16}" font-size="10" fill="#555">'
               f'labels: peak lr × steps per domain</text>')
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
