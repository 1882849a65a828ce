// labelgen inspect --html: draws the page from the JSON in #data (html_report.py). Every string from the label
// set reaches the page as a text node (append / textContent), never as markup.
"use strict";

const DATA = JSON.parse(document.getElementById("data").textContent);
const TYPES = { u8: Uint8Array, u16: Uint16Array, u32: Uint32Array, i32: Int32Array, f32: Float32Array };

function unpack(spec) {   // [dtype, base64 of a little-endian typed array] -> the typed array
  if (!spec) return null;
  const bin = atob(spec[1]);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TYPES[spec[0]](bytes.buffer);
}

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function fmt(x, digits) {
  if (typeof x !== "number") return x === null || x === undefined ? "" : String(x);
  return Number.isInteger(x) ? x.toLocaleString("en") : x.toFixed(digits === undefined ? 3 : digits);
}

function text(id) {   // a token's text, its whitespace made visible
  const t = DATA.texts[String(id)];
  return (t === undefined ? "<id " + id + ">" : t).replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u2192");
}

function rows(table, header, data) {
  table.replaceChildren(el("tr", {}, ...header.map(h => el("th", {}, h))));
  for (const r of data) table.append(el("tr", {}, ...r.map(c => el("td", { className: typeof c === "number" ? "num" : "value" }, fmt(c)))));
}

// ---------------------------------------------------------------- the set: identity, sizes, coverage, shards

function drawSummary() {
  const s = DATA.summary;
  document.getElementById("title").textContent = "Label set: " + DATA.identity["label set"];
  rows(document.getElementById("identity"), ["", ""], Object.entries(DATA.identity).filter(([, v]) => v !== null)
    .map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v, null, 1) : v]));
  document.getElementById("sizes").textContent =
    fmt(s.bytes) + " bytes, " + fmt(s.bytes_per_position, 2) + " per position" +
    (DATA.kind === "topk" || DATA.kind === "scored" ? ", " + fmt(s.bytes_per_entry, 3) + " per stored entry" : "") +
    "; " + fmt(s.ratio_vs_raw_topk, 1) + "x smaller than raw int32 ids + fp32 logprobs, " +
    fmt(s.ratio_vs_full_fp8, 0) + "x smaller than the full vocabulary at 1 byte a probability";
  rows(document.getElementById("columns"), ["column", "bytes", "share"],
       Object.entries(s.bytes_by_column).map(([c, b]) => [c, b, fmt(b / s.bytes, 3)]));
  const hist = s.coverage_histogram;
  const box = document.getElementById("coverage");
  if (hist) {
    document.getElementById("coverage-figures").textContent =
      "mean " + fmt(s.coverage_mean) + ", p1 " + fmt(s.coverage_p1) + ", p5 " + fmt(s.coverage_p5) + ", p50 " +
      fmt(s.coverage_p50) + "; below 0.9: " + fmt(s["coverage_below_0.9"]) +
      "; the actual next token among the stored entries: " + fmt(s.target_in_topk);
    const top = Math.max(...hist, 1);
    box.replaceChildren(...hist.map((n, i) => el("div", { title: (i / hist.length).toFixed(2) + "-" +
      ((i + 1) / hist.length).toFixed(2) + ": " + n + " positions", style: "height:" + (100 * n / top) + "%" })));
  } else {
    document.getElementById("coverage-figures").textContent = DATA.kind === "sampled"
      ? fmt(s.unique_per_position, 1) + " distinct ids per position among " + s.draws + " draws"
      : "no coverage: " + DATA.kind + " labels store no distribution";
    box.remove();
  }
  rows(document.getElementById("shards"), ["shard", "rows", "positions", "bytes", "bytes/position",
       "actual token stored"], s.shards.map(r => [r.name, r.rows, r.positions, r.bytes, r.bytes_per_position,
       r.target_in_topk === undefined ? "" : r.target_in_topk]));
}

// ---------------------------------------------------------------- one example: its tokens and, per position, labels

function decode(ex) {   // the example's arrays, unpacked once, with each labelled position's entries located
  if (ex.cache) return ex.cache;
  const d = { tokens: unpack(ex.tokens), prompt: unpack(ex.prompt), logprob: unpack(ex.logprob),
              lens: unpack(ex.lens), ids: unpack(ex.ids), probs: unpack(ex.probs), counts: unpack(ex.counts),
              cov: unpack(ex.cov), tlp: unpack(ex.tlp), rank: unpack(ex.rank), first: ex.first || 0 };
  if (d.lens) {
    d.start = new Uint32Array(d.lens.length + 1);
    for (let i = 0; i < d.lens.length; i++) d.start[i + 1] = d.start[i] + d.lens[i];
  }
  ex.cache = d;
  return d;
}

function entries(d, row) {   // [{id, p, count?}] of labelled position `row`, by probability (or count)
  const out = [];
  const total = d.counts ? Array.from(d.counts.subarray(d.start[row], d.start[row + 1])).reduce((a, b) => a + b, 0) : 1;
  for (let j = d.start[row]; j < d.start[row + 1]; j++) {
    out.push(d.counts ? { id: d.ids[j], count: d.counts[j], p: d.counts[j] / total }
                      : { id: d.ids[j], p: d.probs[j] / DATA.prob_scale });
  }
  return out.sort((a, b) => b.p - a.p);
}

const MEASURES = {   // name -> (decoded example, labelled row, actual next token) -> a value in [0, 1], or null
  "coverage": (d, r) => d.cov ? d.cov[r] : null,
  "teacher entropy (stored entries)": (d, r) => {
    const e = entries(d, r);
    const mass = e.reduce((a, x) => a + x.p, 0);
    if (e.length < 2 || mass <= 0) return 1;
    const h = -e.reduce((a, x) => a + (x.p > 0 ? (x.p / mass) * Math.log(x.p / mass) : 0), 0);
    return 1 - h / Math.log(e.length);
  },
  "actual token's probability": (d, r, actual) => {
    if (d.tlp) return Math.exp(d.tlp[r]);
    const hit = entries(d, r).find(x => x.id === actual);
    return hit ? hit.p : 0;
  },
  "actual token's rank": (d, r) => d.rank ? 1 / (1 + d.rank[r]) : null,
  "completion token's logprob": (d, i) => d.logprob ? Math.exp(d.logprob[i]) : null,
};

function measuresFor(kind, ex) {
  if (kind === "tokens") return [];
  if (kind === "samples") return ["completion token's logprob"];
  const names = ["coverage", "teacher entropy (stored entries)", "actual token's probability", "actual token's rank"];
  return names.filter(n => (n !== "coverage" || ex.cov) && (n !== "actual token's rank" || ex.rank));
}

function colour(v) {   // 0 red .. 1 green
  if (v === null || v === undefined || Number.isNaN(v)) return "";
  const x = Math.max(0, Math.min(1, v));
  return "hsl(" + Math.round(120 * x) + ", 70%, 82%)";
}

let current = null;

function drawExample(index) {
  const ex = DATA.examples[index];
  const d = decode(ex);
  current = { ex, d, index };
  const head = "example " + index + ": " + ex.id + (ex.offset !== undefined ? ", a window from token " + ex.offset : "") +
    (ex.sample !== undefined ? ", completion " + ex.sample : "") + (ex.finish ? " (" + ex.finish + ")" : "");
  document.getElementById("example-head").textContent = head;
  const measure = document.getElementById("measure");
  const names = measuresFor(DATA.kind, ex);
  const keep = measure.value;
  measure.replaceChildren(...names.map(n => el("option", { value: n, textContent: n })));
  if (names.includes(keep)) measure.value = keep;
  const spans = [];
  if (d.prompt) {
    for (let i = 0; i < d.prompt.length; i++) spans.push(el("span", { className: "tok prompt", title: "prompt" }, text(d.prompt[i])));
    spans.push(el("span", {}, "\u2502"));
  }
  for (let t = 0; t < d.tokens.length; t++) {
    const span = el("span", { className: "tok" }, text(d.tokens[t]));
    span.dataset.pos = String(t);
    if (DATA.kind !== "samples" && (DATA.kind === "tokens" || t < d.first)) span.classList.add("unlabelled");
    spans.push(span);
  }
  document.getElementById("tokens").replaceChildren(...spans);
  paint();
  showToken(null);
}

function paint() {
  const { d } = current;
  const f = MEASURES[document.getElementById("measure").value];
  for (const span of document.querySelectorAll("#tokens .tok[data-pos]")) {
    const t = Number(span.dataset.pos);
    let v = null;
    if (f && DATA.kind === "samples") v = f(d, t);
    else if (f && t >= d.first && d.lens) v = f(d, t - d.first, d.tokens[t]);
    span.style.background = colour(v);
  }
}

function showToken(span) {
  const box = document.getElementById("detail");
  for (const s of document.querySelectorAll("#tokens .selected")) s.classList.remove("selected");
  if (!span) return;
  span.classList.add("selected");
  const { d } = current;
  const t = Number(span.dataset.pos);
  const actual = d.tokens[t];
  const parts = [el("p", { id: "detail-head" }, "token " + t + ": \u201c" + text(actual) + "\u201d (id " + actual + ")")];
  if (DATA.kind === "samples") {
    parts.push(el("p", {}, "its logprob when sampled: " + fmt(d.logprob[t]) + " (p " + fmt(Math.exp(d.logprob[t])) + ")"));
  } else if (DATA.kind === "tokens" || t < d.first || !d.lens) {
    parts.push(el("p", {}, "no labels predict this token"));
  } else {
    const r = t - d.first;
    const facts = ["predicted at position " + (t - 1)];
    if (d.cov) facts.push("coverage " + fmt(d.cov[r]));
    if (d.tlp) facts.push("actual token's logprob " + fmt(d.tlp[r]) + " (p " + fmt(Math.exp(d.tlp[r])) + ")");
    if (d.rank) facts.push("its rank in the teacher's distribution " + fmt(d.rank[r]));
    parts.push(el("p", { id: "detail-facts" }, facts.join("; ")));
    const table = el("table", { id: "entries" });
    table.append(el("tr", {}, ...["#", "token", "id", d.counts ? "draws" : "probability", ""].map(h => el("th", {}, h))));
    const listed = entries(d, r);
  const top = Math.max(...listed.map(e => e.p), 1e-9);
  listed.forEach((e, i) => {
      const row = el("tr", { className: "entry" + (e.id === actual ? " actual" : "") },
        el("td", { className: "num" }, i), el("td", { className: "value" }, text(e.id)),
        el("td", { className: "num id" }, e.id),
        el("td", { className: "num prob" }, d.counts ? e.count + " (" + fmt(e.p) + ")" : fmt(e.p)),
        el("td", {}, el("span", { className: "bar", style: "width:" + (8 * e.p / top) + "em" })));
      table.append(row);
    });
    parts.push(table);
  }
  box.replaceChildren(...parts);
}

function drawBrowser() {
  const select = document.getElementById("example");
  select.replaceChildren(...DATA.examples.map((ex, i) => el("option", { value: String(i), textContent: i + ": " + ex.id })));
  select.addEventListener("change", () => drawExample(Number(select.value)));
  document.getElementById("search").addEventListener("input", e => {
    const q = e.target.value;
    const i = DATA.examples.findIndex(ex => ex.id.includes(q));
    if (q && i >= 0) { select.value = String(i); drawExample(i); }
  });
  document.getElementById("measure").addEventListener("change", paint);
  const tokens = document.getElementById("tokens");
  tokens.addEventListener("mouseover", e => { if (e.target.dataset && e.target.dataset.pos) showToken(e.target); });
  tokens.addEventListener("click", e => { if (e.target.dataset && e.target.dataset.pos) showToken(e.target); });
  if (DATA.examples.length) drawExample(0);
}

drawSummary();
drawBrowser();
document.body.dataset.ready = "true";
