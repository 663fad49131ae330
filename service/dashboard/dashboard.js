// peerd's live page: reads the admin API (/v1/status, /v1/eval, /v1/history) with the session
// cookie, draws the curves, the forgetting heatmap and the tables as SVG, and refreshes every 5 s.
// No library, no network beyond peerd. When a draw completes, <body data-drawn> says how much
// was drawn and <body data-errors> how many script errors there were (tests/service_test.cc
// renders the page in headless Chromium and reads both).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
let errors = 0;
let history = [];        // HistoryPoint, oldest first
let evals = [];          // EvalRow, oldest first (from GET /v1/eval)
let lastSpool = null;    // {bytes, at}: the ingest rate between two refreshes
let refreshes = 0;

function showError(text) {
  errors++;
  document.body.dataset.errors = String(errors);
  const div = document.createElement("div");
  div.textContent = text;
  document.getElementById("errors").appendChild(div);
}
window.addEventListener("error", (e) => showError("script error: " + e.message));
window.addEventListener("unhandledrejection", (e) => showError("error: " + (e.reason && e.reason.message || e.reason)));

class Unauthorized extends Error {}

async function get(path) {
  const r = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (r.status === 401) throw new Unauthorized();
  const body = await r.json();
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (body.error && body.error.message || ""));
  return body;
}

// proto3 JSON writes 64-bit integers as strings.
const num = (v) => v === undefined || v === null ? 0 : Number(v);
const fmt = (v, digits = 3) => Number.isFinite(v) ? v.toFixed(digits) : "–";
const bytes = (v) => v >= 1e9 ? (v / 1e9).toFixed(2) + " GB" : v >= 1e6 ? (v / 1e6).toFixed(2) + " MB" : v >= 1e3 ? (v / 1e3).toFixed(1) + " kB" : v + " B";

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function cards(id, items) {
  const box = document.getElementById(id);
  box.replaceChildren();
  for (const [label, value] of items) {
    const c = document.createElement("div");
    c.className = "card";
    const b = document.createElement("b");
    b.textContent = value;
    c.append(b, label);
    box.appendChild(c);
  }
}

// A line chart of `series` ([{name, color, points: [[x, y]...]}]) with axes, and vertical
// `marks` ([{x, label}]). Returns the number of points drawn.
function lineChart(svg, series, marks = []) {
  svg.replaceChildren();
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height");
  const L = 48, R = 110, T = 10, B = 28;
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) {
    svg.appendChild(el("text", {x: L, y: H / 2}, "no data yet"));
    return 0;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (y1 - y) / (y1 - y0) * (H - T - B);
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}));
  svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    svg.appendChild(el("text", {x: 4, y: sy(y) + 4}, fmt(y, 2)));
    svg.appendChild(el("text", {x: sx(x) - 10, y: H - 8}, String(Math.round(x))));
  }
  // Phase ends in step order, their labels on three staggered lines so that close ones stay legible.
  marks.filter((m) => m.x >= x0 && m.x <= x1).sort((a, b) => a.x - b.x).forEach((m, i) => {
    svg.appendChild(el("line", {x1: sx(m.x), y1: T, x2: sx(m.x), y2: H - B, stroke: "#888", "stroke-dasharray": "4 3"}));
    svg.appendChild(el("text", {x: sx(m.x) - 3, y: H - B - 4 - 12 * (i % 3), "text-anchor": "end"}, m.label + " ends"));
  });
  let drawn = 0;
  series.forEach((s, i) => {
    if (s.points.length === 0) return;
    const d = s.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join("");
    svg.appendChild(el("path", {d, fill: "none", stroke: s.color || COLORS[i % COLORS.length], "stroke-width": 1.5}));
    if (s.points.length === 1) svg.appendChild(el("circle", {cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 3, fill: s.color || COLORS[i % COLORS.length]}));
    svg.appendChild(el("text", {x: W - R + 6, y: T + 14 * (i + 1), fill: s.color || COLORS[i % COLORS.length]}, s.name));
    drawn += s.points.length;
  });
  return drawn;
}

// At most `n` points: means over equal runs of the history (a chart is a few hundred pixels wide).
function thin(points, n) {
  if (points.length <= n) return points;
  const out = [], k = points.length / n;
  for (let i = 0; i < n; i++) {
    const run = points.slice(Math.floor(i * k), Math.floor((i + 1) * k));
    out.push([run[run.length - 1][0], run.reduce((a, p) => a + p[1], 0) / run.length]);
  }
  return out;
}

function drawStatus(s) {
  document.getElementById("state").textContent = s.state + " · step " + num(s.step);
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  cards("training-cards", [
    ["loss, bits/byte", fmt(num(s.recentBitsPerByte))],
    ["tokens/s", fmt(num(s.tokensPerSecond), 0)],
    ["learning rate", num(s.learningRate).toPrecision(3)],
    ["tokens trained", num(s.tokensTrained).toLocaleString()],
    ["parameters (active)", num(s.totalParameters).toLocaleString() + " (" + num(s.activeParameters).toLocaleString() + ")"],
    ["last checkpoint", "step " + num(s.lastCheckpointStep)],
  ]);
  const now = Date.now(), received = num(s.spoolBytes);
  const rate = lastSpool && now > lastSpool.at ? (received - lastSpool.bytes) / ((now - lastSpool.at) / 1000) : 0;
  lastSpool = {bytes: received, at: now};
  cards("ingest-cards", [
    ["backlog (not yet trained)", bytes(num(s.spoolBacklogBytes))],
    ["received, rate", bytes(received) + ", " + bytes(Math.max(0, Math.round(rate))) + "/s"],
    ["documents", num(s.spoolDocuments).toLocaleString()],
    ["text kept", bytes(num(s.spoolKeptBytes))],
  ]);
  const why = [["training", s.trainingError], ["ingest", s.ingestError], ["checkpoint", s.checkpointError]]
    .filter(([, e]) => e).map(([what, e]) => what + " stopped: " + e);
  document.getElementById("stopped").textContent = why.join("; ");

  const table = document.getElementById("segments");
  table.replaceChildren();
  const head = table.insertRow();
  for (const h of ["layer", "id", "state", "experts", "dtype", "bytes", "usage", "checksum"]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.appendChild(th);
  }
  for (const g of s.segments || []) {
    const row = table.insertRow();
    for (const v of [num(g.layer), num(g.id), g.state, num(g.experts).toLocaleString(), g.dtype, bytes(num(g.bytes)),
                     (100 * num(g.usage)).toFixed(1) + " %", g.frozen ? String(g.checksum) : "–"])
      row.insertCell().textContent = v;
  }
  return (s.segments || []).length;
}

// Where each task's phase ended (GET /v1/eval's trainedAt: the row after its ingest task trained).
function phaseMarks(report) {
  const rows = report.rows || [], marks = [];
  for (const [task, row] of Object.entries(report.trainedAt || {}))
    if (row >= 0 && row < rows.length) marks.push({x: num(rows[row].step), label: task});
  return marks;
}

function drawEvaluations(report) {
  const rows = report.rows || [];
  const tasks = rows.length ? rows[rows.length - 1].tasks : [];
  cards("forgetting-cards", [
    ["ACC, bits/byte (lower is better)", fmt(num(report.acc))],
    ["BWT (negative: forgetting)", fmt(num(report.bwt))],
    ["FWT", fmt(num(report.fwt))],
    ["mean forgetting", fmt(num(report.meanForgetting))],
  ]);
  const series = tasks.map((t, i) => ({
    name: t, color: COLORS[i % COLORS.length],
    points: rows.filter((r) => r.tasks.includes(t)).map((r) => [num(r.step), num(r.bitsPerByte[r.tasks.indexOf(t)])]),
  }));
  const taskPoints = lineChart(document.getElementById("task-chart"), series, phaseMarks(report));

  // The heatmap: a cell per (row, task), green for the lowest bits/byte, red for the highest.
  const svg = document.getElementById("heatmap");
  svg.replaceChildren();
  const cw = Math.max(40, Math.min(90, (560 - 170) / Math.max(1, tasks.length))), ch = 18, L = 170, T = 18;
  svg.setAttribute("height", T + ch * (rows.length + 1) + 8);
  svg.setAttribute("width", L + cw * tasks.length + 10);
  const values = rows.flatMap((r) => r.bitsPerByte.map(num)).filter(Number.isFinite);
  const lo = Math.min(...values), hi = Math.max(...values);
  const fits = Math.max(3, Math.floor(cw / 7));  // characters a column header has room for
  tasks.forEach((t, j) => svg.appendChild(el("text", {x: L + j * cw + 2, y: 12}, t.length > fits ? t.slice(0, fits - 1) + "…" : t)));
  let cells = 0;
  rows.forEach((r, i) => {
    const y = T + i * ch;
    svg.appendChild(el("text", {x: 2, y: y + 13}, (r.label || "row " + i).slice(0, 20) + " @" + num(r.step)));
    tasks.forEach((t, j) => {
      const k = r.tasks.indexOf(t);
      if (k < 0) return;
      const v = num(r.bitsPerByte[k]), f = hi > lo ? (v - lo) / (hi - lo) : 0;
      svg.appendChild(el("rect", {x: L + j * cw, y, width: cw - 2, height: ch - 2,
                                  fill: `hsl(${Math.round(120 * (1 - f))}, 65%, 72%)`}));
      svg.appendChild(el("text", {x: L + j * cw + 4, y: y + 13}, fmt(v, 2)));
      cells++;
    });
  });
  const forgetting = report.forgetting || {};
  const y = T + rows.length * ch;
  svg.appendChild(el("text", {x: 2, y: y + 13}, "forgetting"));
  tasks.forEach((t, j) => svg.appendChild(el("text", {x: L + j * cw + 4, y: y + 13}, t in forgetting ? fmt(forgetting[t], 2) : "–")));
  return {taskPoints, cells};
}

async function refresh() {
  // The whole history now and then (old points merge as it grows), what is new in between.
  const full = refreshes++ % 12 === 0 || history.length === 0;
  const since = full ? 0 : num(history[history.length - 1].step) + num(history[history.length - 1].steps) - 1;
  const [status, report, h] = await Promise.all([get("/v1/status"), get("/v1/eval"), get("/v1/history?limit=10000&since=" + since)]);
  history = full ? (h.steps || []) : history.concat(h.steps || []);
  evals = report.rows || [];
  const segments = drawStatus(status);
  const loss = thin(history.map((p) => [num(p.step) + num(p.steps) - 1, num(p.bitsPerByte)]), 400);
  const lossPoints = lineChart(document.getElementById("loss-chart"), [{name: "training", color: COLORS[0], points: loss}], phaseMarks(report));
  const {taskPoints, cells} = drawEvaluations(report);
  document.body.dataset.drawn = JSON.stringify({lossPoints, taskPoints, cells, segments, evaluations: evals.length});
}

async function start() {
  if (new URLSearchParams(location.search).get("login") === "failed")
    document.getElementById("login-error").classList.remove("hidden");
  try {
    await refresh();
  } catch (e) {
    if (e instanceof Unauthorized) {
      document.getElementById("login").classList.remove("hidden");
      document.body.dataset.drawn = "login";
      return;
    }
    document.getElementById("page").classList.remove("hidden");  // where the error shows
    throw e;
  }
  document.getElementById("page").classList.remove("hidden");
  setInterval(() => refresh().catch((e) => {
    if (e instanceof Unauthorized) location.reload();  // peerd restarted: sign in again
    else showError(String(e.message || e));
  }), REFRESH_MS);
}

document.body.dataset.errors = "0";
start().catch((e) => showError(String(e.message || e)));
