// wanwu pool dashboard. No framework, no build step, nothing loaded from elsewhere.
// Every 2 s it reads GET v1/pool (workers, queue, GPUs, reaps), GET metrics (Prometheus
// text: rates and latency quantiles from the differences between successive samples,
// ~10 minutes of them kept here) and GET v1/pool/settings (the admin view). The settings
// form PATCHes v1/pool/settings with the operator's token as a Bearer header. "Try a
// photo" lists the classification models of GET v1/models and POSTs a dropped or picked
// file (multipart field "image") to v1/models/<name>/predict, showing what came back.
// URLs are relative to /dashboard, so a proxy's path prefix is kept.
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEEP_S = 600; // history kept and drawn
  const WINDOW_S = 60; // each chart point: rates and quantiles over the minute before it
  const MIN_SPAN_S = 10; // a point needs this much history: rates from one 2 s step are noise
  const FETCH_TIMEOUT_MS = 8000; // past it the gateway counts as unreachable
  const TOKEN_KEY = "wanwu.adminToken";
  const OPERATOR = "the dashboard"; // who the changes list and the gateway's log name
  const DEFAULT_WATERMARKS = { high: 0.9, low: 0.8 }; // WANWU_GPU_*_WATERMARK defaults
  const STATE_ORDER = ["starting", "idle", "busy", "stopping"];
  const EDITABLE = ["max_workers", "idle_ttl_s", "keepalive", "stem_cells", "model_ttl_s"];
  const COUNTERS = {
    cold: "wanwu_cold_starts_total",
    stem: "wanwu_stem_starts_total",
    warm: "wanwu_warm_hits_total",
    cached: "wanwu_cache_hits_total",
  };
  const LATENCY = "wanwu_request_seconds_bucket";
  const PREDICT_TIMEOUT_MS = 120000; // a cold start loads the model first
  const MODELS_RETRY_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const samples = []; // {t, counts: {cold, stem, warm, cached}, buckets: {le: count}}, counters made monotonic
  const view = { pool: null, admin: null, adminStatus: null }; // the latest answers
  let formDirty = false;
  let downSince = null;

  // -- small helpers ----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fill(node, ...children) {
    node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
  }

  function num(value, digits = 1) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toFixed(digits);
  }

  function latency(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return `${Number((seconds * 1000).toPrecision(3))} ms`;
    return `${Number(seconds.toPrecision(3))} s`;
  }

  function clock(date) {
    return date.toLocaleTimeString([], { hour12: false });
  }

  function when(at) {
    if (typeof at === "number") return new Date(at < 1e12 ? at * 1000 : at); // epoch seconds or ms
    const parsed = new Date(at);
    return Number.isNaN(parsed.getTime()) ? null : parsed;
  }

  function describe(value) {
    if (value === null || value === undefined) return "–";
    if (Array.isArray(value)) return value.length ? value.map(describe).join(", ") : "none";
    if (typeof value === "object") {
      const entries = Object.entries(value);
      if (!entries.length) return "none";
      return entries.map(([k, v]) => `${k}: ${typeof v === "object" && v !== null ? describe(v) : v}`).join("; ");
    }
    return String(value);
  }

  async function request(path, options = {}) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      return await fetch(path, { cache: "no-store", ...options, signal: abort.signal });
    } finally {
      clearTimeout(timer);
    }
  }

  async function errorText(response) {
    // The gateway's errors are {"error": {"code", "message"}}; anything else is shown as it came.
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && body.error) return `${response.status} ${body.error.code || ""}: ${body.error.message || ""}`.trim();
    } catch (_) {
      // not JSON
    }
    return `${response.status} ${response.statusText}${text ? ": " + text.slice(0, 200) : ""}`;
  }

  // -- Prometheus text --------------------------------------------------------------------

  function parseMetrics(text) {
    const series = [];
    const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split("\n")) {
      if (!raw || raw.startsWith("#")) continue;
      const match = line.exec(raw);
      if (!match) continue;
      const labels = {};
      for (const [, key, value] of (match[2] || "").matchAll(label)) labels[key] = value;
      const value = match[3] === "+Inf" ? Infinity : match[3] === "-Inf" ? -Infinity : parseFloat(match[3]);
      series.push({ name: match[1], labels, value });
    }
    return series;
  }

  function reading(series) {
    const counts = Object.fromEntries(Object.keys(COUNTERS).map((k) => [k, 0]));
    const buckets = {};
    for (const s of series) {
      for (const [key, name] of Object.entries(COUNTERS)) if (s.name === name) counts[key] += s.value;
      if (s.name === LATENCY) buckets[s.labels.le] = (buckets[s.labels.le] || 0) + s.value; // summed over models
    }
    return { counts, buckets };
  }

  // Counters go back to 0 when the gateway restarts: keep running totals that only grow.
  function grow(previous, raw, last) {
    if (previous === undefined) return raw;
    return previous + (raw >= (last ?? 0) ? raw - (last ?? 0) : raw);
  }

  let lastRaw = null;
  function addSample(text, t) {
    const now = reading(parseMetrics(text));
    const before = samples[samples.length - 1];
    const sample = { t, counts: {}, buckets: {} };
    for (const key of Object.keys(now.counts)) {
      sample.counts[key] = before ? grow(before.counts[key], now.counts[key], lastRaw.counts[key]) : now.counts[key];
    }
    const les = new Set([...Object.keys(now.buckets), ...(before ? Object.keys(before.buckets) : [])]);
    for (const le of les) {
      const raw = now.buckets[le] || 0;
      sample.buckets[le] = before ? grow(before.buckets[le] || 0, raw, lastRaw.buckets[le] || 0) : raw;
    }
    lastRaw = now;
    samples.push(sample);
    while (samples.length && samples[0].t < t - KEEP_S - WINDOW_S) samples.shift();
  }

  // The sample a window before samples[i]: the last one at or before t - WINDOW_S, or the first.
  function windowStart(i) {
    const from = samples[i].t - WINDOW_S;
    let j = 0;
    while (j + 1 < i && samples[j + 1].t <= from) j += 1;
    return j;
  }

  function quantile(q, newer, older) {
    const bounds = Object.keys(newer.buckets)
      .map((le) => ({ le: le === "+Inf" ? Infinity : parseFloat(le), key: le }))
      .sort((a, b) => a.le - b.le);
    if (!bounds.length) return null;
    const counts = bounds.map((b) => newer.buckets[b.key] - (older.buckets[b.key] || 0));
    const total = counts[counts.length - 1];
    if (!(total > 0)) return null;
    const rank = q * total;
    let k = counts.findIndex((c) => c >= rank);
    if (k < 0) k = counts.length - 1;
    if (bounds[k].le === Infinity) return k > 0 ? bounds[k - 1].le : null; // as histogram_quantile does
    const lower = k > 0 ? bounds[k - 1].le : 0;
    const below = k > 0 ? counts[k - 1] : 0;
    const inside = counts[k] - below;
    return inside > 0 ? lower + ((bounds[k].le - lower) * (rank - below)) / inside : bounds[k].le;
  }

  function points() {
    const out = [];
    for (let i = 1; i < samples.length; i += 1) {
      const j = windowStart(i);
      const span = samples[i].t - samples[j].t;
      if (span < MIN_SPAN_S) continue;
      const point = { t: samples[i].t, span };
      for (const key of Object.keys(COUNTERS)) {
        point[key] = ((samples[i].counts[key] - samples[j].counts[key]) / span) * 60;
      }
      point.p50 = quantile(0.5, samples[i], samples[j]);
      point.p99 = quantile(0.99, samples[i], samples[j]);
      out.push(point);
    }
    return out;
  }

  // -- charts -----------------------------------------------------------------------------

  const BOX = { left: 40, right: 392, top: 6, bottom: 124, width: 400, height: 142 };

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 5, 10]) if (value <= m * step) return m * step;
    return 10 * step;
  }

  function drawChart(node, pts, series, scale) {
    const end = pts.length ? pts[pts.length - 1].t : Date.now() / 1000;
    const x = (t) => BOX.left + ((t - (end - KEEP_S)) / KEEP_S) * (BOX.right - BOX.left);
    const y = (v) => BOX.bottom - scale.at(v) * (BOX.bottom - BOX.top);
    const parts = [svg("line", { class: "axis", x1: BOX.left, y1: BOX.bottom, x2: BOX.right, y2: BOX.bottom })];
    for (const tick of scale.ticks) {
      const ty = y(tick.value);
      parts.push(svg("line", { class: "axis", x1: BOX.left, y1: ty, x2: BOX.right, y2: ty, "stroke-dasharray": "2 3" }));
      parts.push(svg("text", { class: "tick", x: BOX.left - 4, y: ty + 3, "text-anchor": "end" }, tick.label));
    }
    for (let minutes = 10; minutes >= 0; minutes -= 2) {
      const tx = x(end - minutes * 60);
      const label = minutes ? `−${minutes} min` : "now";
      const anchor = minutes === 10 ? "start" : minutes ? "middle" : "end";
      parts.push(svg("text", { class: "tick", x: tx, y: BOX.height - 4, "text-anchor": anchor }, label));
    }
    for (const name of series) {
      let d = "";
      let pen = "M";
      for (const p of pts) {
        const v = p[name];
        if (v === null || v === undefined || p.t < end - KEEP_S) {
          pen = "M";
          continue;
        }
        d += `${pen}${x(p.t).toFixed(1)},${y(scale.clamp(v)).toFixed(1)} `;
        pen = "L";
      }
      if (d) parts.push(svg("path", { class: `series ${name}`, d }));
      const last = pts[pts.length - 1];
      if (last && last[name] !== null && last[name] !== undefined) {
        // The newest value as a dot: with little history a line is only a few pixels long.
        const at = { cx: x(last.t).toFixed(1), cy: y(scale.clamp(last[name])).toFixed(1), r: 2.5 };
        parts.push(svg("circle", { class: `dot ${name}`, ...at }));
      }
    }
    node.replaceChildren(...parts);
  }

  function linearScale(max) {
    const top = niceMax(max);
    const ticks = [0, top / 2, top].map((v) => ({ value: v, label: Number(v.toPrecision(3)).toString() }));
    return { at: (v) => v / top, clamp: (v) => Math.max(0, Math.min(top, v)), ticks };
  }

  function logScale(values) {
    const finite = values.filter((v) => v > 0);
    const lo = Math.min(-3, Math.floor(Math.log10(Math.min(...finite, 0.01))));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(Math.max(...finite, 0.1))));
    const ticks = [];
    for (let e = lo; e <= hi; e += 1) ticks.push({ value: 10 ** e, label: latency(10 ** e) });
    const at = (v) => (Math.log10(v) - lo) / (hi - lo);
    return { at, clamp: (v) => Math.max(10 ** lo, Math.min(10 ** hi, v)), ticks };
  }

  function renderTraffic() {
    const pts = points();
    const rates = ["cold", "stem", "warm", "cached"];
    const max = Math.max(0, ...pts.flatMap((p) => rates.map((k) => p[k])));
    drawChart($("rate-chart"), pts, rates, linearScale(max));
    const lat = pts.flatMap((p) => [p.p50, p.p99]).filter((v) => v !== null);
    drawChart($("latency-chart"), pts, ["p50", "p99"], logScale(lat));
    const last = pts[pts.length - 1];
    if (!last) return;
    const count = (key) => Math.round((last[key] * last.span) / 60);
    const lat50 = last.p50 === null ? "no requests" : `p50 ${latency(last.p50)}, p99 ${latency(last.p99)}`;
    $("traffic-now").textContent =
      `last ${Math.round(last.span)} s: ${count("cold")} cold (${count("stem")} from a stem cell), ` +
      `${count("warm")} warm, ${count("cached")} cached · latency ${lat50}`;
  }

  // -- pool -------------------------------------------------------------------------------

  function renderWorkers(pool) {
    const workers = pool.workers || [];
    $("capacity").textContent = `${workers.length} of ${pool.capacity} slots`;
    const groups = new Map();
    for (const w of workers) {
      const key = `${w.model}\u0000${w.state}`;
      if (!groups.has(key)) groups.set(key, { model: w.model, state: w.state, workers: [] });
      groups.get(key).workers.push(w);
    }
    const rank = (s) => (STATE_ORDER.includes(s) ? STATE_ORDER.indexOf(s) : STATE_ORDER.length);
    const sorted = [...groups.values()].sort((a, b) => a.model.localeCompare(b.model) || rank(a.state) - rank(b.state));
    const rows = sorted.map((g) => {
      const idle = g.workers
        .map((w) => w.idle_s)
        .filter((s) => s !== null && s !== undefined)
        .sort((a, b) => b - a);
      return el(
        "tr",
        { "data-model": g.model, "data-state": g.state },
        el("td", {}, g.model),
        el("td", {}, el("span", { class: `state state-${g.state}` }, g.state)),
        el("td", { class: "num" }, g.workers.length),
        el("td", { class: "idle-list" }, idle.length ? idle.map((s) => num(s)).join(", ") : "–"),
        el("td", { class: "num" }, g.workers.reduce((n, w) => n + (w.requests || 0), 0)),
      );
    });
    fill($("worker-groups-body"), ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "empty" }, "no workers"))]));
    const each = workers.map((w) =>
      el(
        "tr",
        {},
        el("td", {}, el("code", {}, w.id)),
        el("td", {}, w.model),
        el("td", {}, el("span", { class: `state state-${w.state}` }, w.state)),
        el("td", { class: "num" }, num(w.idle_s)),
        el("td", { class: "num" }, num(w.age_s)),
        el("td", { class: "num" }, w.requests),
        el("td", {}, w.device || "cpu"),
        el("td", { class: "num" }, num(w.gpu_mb, 0)),
      ),
    );
    fill($("workers-body"), ...(each.length ? each : [el("tr", {}, el("td", { colspan: 8, class: "empty" }, "no workers"))]));
    const backoff = Object.entries(pool.backoff_s || {});
    $("backoff").hidden = !backoff.length;
    $("backoff").textContent = backoff.length
      ? "Backing off after failed starts: " + backoff.map(([m, s]) => `${m} (${num(s)} s left)`).join(", ")
      : "";
  }

  function watermarks(settings) {
    const high = settings.gpu_high_watermark ?? settings.high_watermark;
    const low = settings.gpu_low_watermark ?? settings.low_watermark;
    if (typeof high === "number" && typeof low === "number") return { high, low, reported: true };
    return { ...DEFAULT_WATERMARKS, reported: false };
  }

  function renderGpus(pool) {
    const gpus = pool.gpus || [];
    const marks = watermarks(pool.settings || {});
    const pct = (f) => `${(f * 100).toFixed(0)} %`;
    $("watermarks").textContent =
      `Watermarks: high ${pct(marks.high)} (reaping starts), low ${pct(marks.low)} (reaping stops)` +
      (marks.reported ? "" : " — defaults; this gateway does not report its own");
    if (!gpus.length) {
      fill($("gpus"), el("p", { class: "empty" }, "no GPU"));
      return;
    }
    fill(
      $("gpus"),
      ...gpus.map((g) => {
        const fraction = g.total_mb > 0 ? g.used_mb / g.total_mb : 0;
        const used = el("div", { class: "gpu-used" });
        used.style.width = `${Math.min(100, fraction * 100)}%`;
        if (fraction > marks.high) used.classList.add("over-high");
        else if (fraction > marks.low) used.classList.add("over-low");
        const high = el("div", { class: "mark high", title: `high watermark ${pct(marks.high)}` });
        high.style.left = `${marks.high * 100}%`;
        const low = el("div", { class: "mark low", title: `low watermark ${pct(marks.low)}` });
        low.style.left = `${marks.low * 100}%`;
        const text = `${num(g.used_mb, 0)} of ${num(g.total_mb, 0)} MB (${pct(fraction)})`;
        return el(
          "div",
          { class: "gpu", "data-device": g.device },
          el("div", { class: "gpu-label" }, el("span", {}, `GPU ${g.device}`), el("span", {}, text)),
          el(
            "div",
            {
              class: "gpu-track",
              role: "img",
              "aria-label": `GPU ${g.device}: ${text}; high watermark ${pct(marks.high)}, low ${pct(marks.low)}`,
            },
            used,
            low,
            high,
          ),
        );
      }),
    );
  }

  function renderTable(body, entries, empty) {
    const rows = entries.map(([k, v]) => el("tr", {}, el("th", { scope: "row" }, k), el("td", { class: "num" }, v)));
    fill(body, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 2, class: "empty" }, empty))]));
  }

  function renderPool(pool) {
    view.pool = pool;
    renderWorkers(pool);
    const waiting = pool.waiting || {};
    $("wait-interactive").textContent = waiting.interactive ?? 0;
    $("wait-batch").textContent = waiting.batch ?? 0;
    $("queue-depth").textContent = pool.queue_depth ?? 0;
    renderGpus(pool);
    const reaps = Object.entries(pool.reaps || {}).sort((a, b) => b[1] - a[1]);
    renderTable($("reaps-body"), reaps, "none yet");
    const counters = Object.entries(pool.counters || {}).sort((a, b) => a[0].localeCompare(b[0]));
    const pairs = counters.flatMap(([k, v]) => [el("dt", {}, k.replaceAll("_", " ")), el("dd", { class: "num" }, v)]);
    fill($("counters"), ...(pairs.length ? pairs : [el("dt", { class: "empty" }, "none yet"), el("dd")]));
    renderSettings();
  }

  // -- settings ---------------------------------------------------------------------------

  function currentSettings() {
    const live = (view.pool && view.pool.settings) || {};
    const admin = (view.admin && view.admin.settings) || {};
    return { ...live, ...admin };
  }

  function renderSettings() {
    const settings = currentSettings();
    const order = [...EDITABLE, ...Object.keys(settings).filter((k) => !EDITABLE.includes(k)).sort()];
    const pairs = [];
    for (const key of order) {
      if (!(key in settings)) continue;
      pairs.push(el("dt", {}, key), el("dd", { "data-key": key }, describe(settings[key])));
    }
    const windows = view.pool && view.pool.keepalive ? view.pool.keepalive.models || {} : {};
    for (const [model, w] of Object.entries(windows)) {
      const text =
        w.keep_s === null
          ? `the TTL (${w.idle_times} idle times seen so far)`
          : `keep ${w.keep_s} s, pre-warm at ${w.prewarm_s} s (from ${w.idle_times} idle times)`;
      pairs.push(el("dt", {}, `keep-alive · ${model}`), el("dd", {}, text));
    }
    if (pairs.length) fill($("settings"), ...pairs);
    fillForm(settings);
  }

  function renderAdmin() {
    const note = $("admin-state");
    if (view.adminStatus === 404) {
      note.textContent = "This gateway has no settings endpoint (v1/pool/settings answered 404).";
    } else if (view.adminStatus && view.adminStatus !== 200) {
      note.textContent = `v1/pool/settings: ${view.adminStatus}`;
    } else if (view.admin) {
      const admin = view.admin.admin === "enabled" ? "admin enabled" : "admin disabled (no WANWU_ADMIN_TOKEN)";
      const file = view.admin.state_file ? `changes persist to ${view.admin.state_file}` : "no state file";
      note.textContent = `${admin}; ${file}`;
    }
    const changes = (view.admin && view.admin.changes) || [];
    const dated = changes.map((c, i) => ({ c, i, at: when(c.at) }));
    dated.sort((a, b) => (b.at && a.at ? b.at - a.at : 0) || b.i - a.i); // newest first
    const items = dated.slice(0, 30).map(({ c, at }) => {
      const what = Object.entries(c.changed || {}).map(([k, v]) => `${k} ${describe(v.old)} → ${describe(v.new)}`);
      return el(
        "li",
        {},
        el("span", { class: "when" }, `${at ? clock(at) : c.at} · ${c.who || "?"}${c.persisted ? " · persisted" : ""}`),
        el("br"),
        what.join("; ") || "no change",
      );
    });
    fill($("changes"), ...(items.length ? items : [el("li", { class: "empty" }, "none")]));
    renderSettings();
  }

  function field(key) {
    return $(`set-${key}`);
  }

  function ttlText(map) {
    return Object.entries(map || {})
      .map(([m, s]) => `${m}=${s}`)
      .join(", ");
  }

  function fillForm(settings) {
    if (formDirty) return; // never overwrite what the operator is typing
    for (const key of ["max_workers", "idle_ttl_s", "stem_cells", "keepalive"]) {
      if (settings[key] !== undefined) field(key).value = String(settings[key]);
    }
    if (settings.model_ttl_s !== undefined) field("model_ttl_s").value = ttlText(settings.model_ttl_s);
  }

  function parseTtls(text) {
    const out = {};
    for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
      const [model, seconds] = part.split("=").map((s) => s.trim());
      const value = Number(seconds);
      if (!model || seconds === undefined || seconds === "" || Number.isNaN(value)) {
        throw new Error(`per-model TTL: ${JSON.stringify(part)} is not model=seconds`);
      }
      out[model] = value;
    }
    return out;
  }

  function changedValues() {
    const settings = currentSettings();
    const body = {};
    for (const key of ["max_workers", "stem_cells", "idle_ttl_s"]) {
      const raw = field(key).value.trim();
      if (raw === "") continue;
      const value = Number(raw);
      if (Number.isNaN(value)) throw new Error(`${field(key).labels[0].textContent}: ${JSON.stringify(raw)} is not a number`);
      if (value !== settings[key]) body[key] = value;
    }
    if (field("keepalive").value !== settings.keepalive) body.keepalive = field("keepalive").value;
    const ttls = parseTtls(field("model_ttl_s").value);
    if (ttlText(ttls) !== ttlText(settings.model_ttl_s)) {
      body.model_ttl_s = { ...ttls };
      for (const model of Object.keys(settings.model_ttl_s || {})) {
        if (!(model in ttls)) body.model_ttl_s[model] = null; // taken out of the list: back to the default TTL
      }
    }
    return body;
  }

  function token() {
    return $("token").value.trim();
  }

  function syncToken() {
    const value = token();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("settings-fields").disabled = !value;
  }

  async function submit(event) {
    event.preventDefault();
    const error = $("form-error");
    const ok = $("form-ok");
    error.textContent = "";
    ok.textContent = "";
    let body;
    try {
      body = changedValues();
    } catch (problem) {
      error.textContent = problem.message;
      return;
    }
    const persist = $("set-persist").checked;
    if (!Object.keys(body).length && !persist) {
      ok.textContent = "Nothing to change: the form shows the current settings.";
      return;
    }
    if (persist) body.persist = true;
    $("apply").disabled = true;
    try {
      const response = await request("v1/pool/settings", {
        method: "PATCH",
        headers: {
          "Content-Type": "application/json",
          Authorization: `Bearer ${token()}`,
          "X-Wanwu-Operator": OPERATOR,
        },
        body: JSON.stringify(body),
      });
      if (!response.ok) {
        const hint = response.status === 401 ? " (check the admin token)" : "";
        error.textContent = `Not applied: ${await errorText(response)}${hint}`;
        return;
      }
      const answer = await response.json().catch(() => null);
      if (answer && answer.settings) {
        view.admin = { ...view.admin, ...answer };
        view.adminStatus = 200;
      }
      formDirty = false;
      $("set-persist").checked = false;
      ok.textContent = `Applied: ${Object.keys(body).filter((k) => k !== "persist").join(", ") || "persisted"}.`;
      renderAdmin();
      await refreshAdmin();
    } catch (problem) {
      error.textContent = `Not applied: the gateway is unreachable (${problem.message})`;
    } finally {
      $("apply").disabled = false;
    }
  }

  // -- try a photo ------------------------------------------------------------------------

  const trying = { models: new Map(), file: null, preview: null, asking: null, maxUploadMb: null };

  function size(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function milliseconds(ms) {
    return typeof ms === "number" && Number.isFinite(ms) ? latency(ms / 1000) : null;
  }

  function describeModel() {
    const info = trying.models.get($("try-model").value);
    const labels = info && Array.isArray(info.labels) ? info.labels.length : 0;
    const limit = trying.maxUploadMb ? `; photos up to ${trying.maxUploadMb} MB` : "";
    $("try-model-note").textContent = info ? `${labels} classes${info.default ? ", the gateway's default" : ""}${limit}` : "";
    fillLanguages(info);
  }

  const LANGUAGE_NAMES = { zh: "中文", en: "English" };

  // The languages a model answers in (GET /v1/models): its own labels (no `lang`
  // sent), then each translation; without translations the choice is disabled.
  function fillLanguages(info) {
    const select = $("try-lang");
    const before = select.value;
    select.replaceChildren();
    const own = info && typeof info.language === "string" ? info.language : null;
    const ownOption = el("option", { value: "" }, own ? LANGUAGE_NAMES[own] || own : "its own labels");
    if (own === "zh") ownOption.lang = "zh";
    select.append(ownOption);
    const languages = info && Array.isArray(info.languages) ? info.languages : [];
    for (const code of languages.filter((code) => typeof code === "string" && code && code !== own)) {
      const option = el("option", { value: code }, LANGUAGE_NAMES[code] || code);
      if (code === "zh") option.lang = "zh";
      select.append(option);
    }
    select.disabled = select.options.length < 2;
    if ([...select.options].some((option) => option.value === before)) select.value = before;
  }

  async function loadModels() {
    const select = $("try-model");
    try {
      const response = await request("v1/models", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(await errorText(response));
      const body = await response.json();
      const models = (Array.isArray(body.models) ? body.models : []).filter((m) => m && m.task === "classify");
      trying.models = new Map(models.map((m) => [String(m.name), m]));
      trying.maxUploadMb = body.limits && typeof body.limits.max_upload_mb === "number" ? body.limits.max_upload_mb : null;
      if (!models.length) {
        fill(select, el("option", { value: "" }, "no classification model"));
        select.disabled = true;
        $("try-model-note").textContent = "This gateway serves no classification model.";
        return;
      }
      const chosen = models.find((m) => m.default === true) || models[0];
      fill(select, ...models.map((m) => el("option", { value: m.name }, m.default === true ? `${m.name} (default)` : m.name)));
      select.value = String(chosen.name);
      select.disabled = false;
      describeModel();
      if (trying.file && !trying.asking) ask(); // a photo came before the list did
    } catch (problem) {
      fill(select, el("option", { value: "" }, "models unavailable"));
      select.disabled = true;
      const why = problem instanceof TypeError || problem.name === "AbortError" ? "the gateway is unreachable" : problem.message;
      $("try-model-note").textContent = `Could not list the models (${why}); retrying…`;
      setTimeout(loadModels, MODELS_RETRY_MS);
    }
  }

  function showPreview(file) {
    const img = $("try-preview");
    if (trying.preview) URL.revokeObjectURL(trying.preview);
    trying.preview = null;
    if (file.type.startsWith("image/")) {
      trying.preview = URL.createObjectURL(file);
      img.src = trying.preview;
      img.alt = `preview of ${file.name || "the photo"}`;
      img.hidden = false;
    } else {
      img.removeAttribute("src");
      img.alt = "";
      img.hidden = true; // not an image to this browser: the gateway will say what it is
    }
    $("try-drop-text").textContent = `${file.name || "photo"} (${size(file.size)}) · drop another or click to choose`;
  }

  function choose(file) {
    if (!file) return;
    trying.file = file;
    showPreview(file);
    ask();
  }

  function tryStatus(text, busy) {
    $("try-status").textContent = text;
    $("try-result").setAttribute("aria-busy", busy ? "true" : "false");
  }

  function tryError(...parts) {
    const error = $("try-error");
    fill(error, ...parts);
    error.hidden = !parts.length;
    if (parts.length) $("try-answer").hidden = true;
  }

  function failure(response, body) {
    const error = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : null;
    if (!error) {
      const what = `${response.status} ${response.statusText}`.trim();
      return [`The gateway answered ${what}, not a JSON error; see its log.`];
    }
    const parts = [el("code", { class: "code" }, `${response.status} ${error.code || "error"}`), `: ${error.message || "no message"}`];
    if (error.request_id) parts.push(el("span", { class: "request-id" }, ` (request ${error.request_id})`));
    return parts;
  }

  function bars(node, entries) {
    const items = entries.map((entry, i) => {
      const score = Math.max(0, Math.min(1, Number(entry && entry.score) || 0));
      const bar = el("span", { class: "bar-fill" });
      bar.style.width = `${(score * 100).toFixed(1)}%`;
      return el(
        "li",
        { class: i === 0 ? "bar first" : "bar" },
        el("span", { class: "bar-label" }, String(entry && entry.label !== undefined ? entry.label : "?")),
        el("span", { class: "bar-track", "aria-hidden": "true" }, bar),
        el("span", { class: "bar-pct" }, `${(score * 100).toFixed(1)} %`),
      );
    });
    fill(node, ...(items.length ? items : [el("li", { class: "empty" }, "none")]));
  }

  function renderPrediction(body) {
    const predictions = body.predictions;
    const top = body.result ?? (predictions.length ? predictions[0].label : null);
    $("try-top").textContent = top === null || top === undefined ? "–" : String(top);
    $("try-unsure").hidden = body.confident !== false;

    const start = $("try-start");
    if (typeof body.cold_start === "boolean") {
      const kind = body.cold_start ? "cold" : "warm";
      const how = typeof body.start === "string" && body.start !== kind ? ` · ${body.start}` : "";
      start.textContent = `${body.cold_start ? "cold start" : "warm"}${how}`;
      start.dataset.cold = String(body.cold_start);
      start.dataset.start = typeof body.start === "string" ? body.start : kind;
      const shade = ["stem", "cached"].includes(body.start) ? ` start-${body.start}` : ""; // coloured like the rate chart
      start.className = `start start-${kind}${shade}`;
      start.hidden = false;
    } else {
      start.textContent = "";
      start.hidden = true;
    }

    const timing = body.timing_ms && typeof body.timing_ms === "object" ? body.timing_ms : {};
    const parts = [];
    for (const key of ["queue", "spawn", "worker"]) {
      const text = milliseconds(timing[key]);
      if (text !== null && (key !== "spawn" || timing.spawn > 0 || body.cold_start)) parts.push(`${key} ${text}`);
    }
    const total = milliseconds(timing.total);
    $("try-time").textContent = total === null ? "" : `took ${total}${parts.length ? ` (${parts.join(", ")})` : ""}`;

    const by = [];
    if (body.model) by.push(`by ${body.model}`);
    if (body.cpu_fallback) by.push("on a CPU worker: no GPU had room");
    $("try-model-used").textContent = by.join(" ");

    const groups = Array.isArray(body.groups) ? body.groups : [];
    $("try-groups-box").hidden = !groups.length;
    bars($("try-groups"), groups);
    bars($("try-predictions"), predictions);
    $("try-answer").hidden = false;
  }

  async function ask() {
    const file = trying.file;
    const model = $("try-model").value;
    if (!file) return;
    if (trying.asking) trying.asking.abort(); // a newer photo, model or language wins
    trying.asking = null;
    if (!model) {
      tryStatus("Waiting for the list of models…", false);
      return;
    }
    const abort = new AbortController();
    trying.asking = abort;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      abort.abort();
    }, PREDICT_TIMEOUT_MS);
    const chosen = $("try-lang").value;
    const lang = chosen ? `?lang=${encodeURIComponent(chosen)}` : "";
    const form = new FormData();
    form.append("image", file, file.name || "photo");
    tryError();
    tryStatus(`Asking ${model}… (a cold start loads the model first)`, true);
    try {
      const response = await fetch(`v1/models/${encodeURIComponent(model)}/predict${lang}`, {
        method: "POST",
        body: form,
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal: abort.signal,
      });
      const text = await response.text();
      if (trying.asking !== abort) return;
      let body = null;
      try {
        body = JSON.parse(text);
      } catch (_) {
        // not JSON: said below
      }
      if (!response.ok) {
        tryStatus(`${file.name || "The photo"}: no answer from ${model}.`, false);
        tryError(...failure(response, body));
      } else if (!body || typeof body !== "object" || !Array.isArray(body.predictions)) {
        tryStatus(`${file.name || "The photo"}: no answer from ${model}.`, false);
        tryError(`The gateway answered ${response.status} but with no predictions in it.`);
      } else {
        tryStatus(`${file.name || "The photo"}: ${model} answered.`, false);
        renderPrediction(body);
      }
    } catch (problem) {
      if (trying.asking !== abort) return;
      tryStatus(`${file.name || "The photo"}: no answer from ${model}.`, false);
      tryError(
        timedOut
          ? `No answer in ${PREDICT_TIMEOUT_MS / 1000} s; the gateway may be busy, try again.`
          : `Could not reach the gateway (${problem.message}).`,
      );
    } finally {
      clearTimeout(timer);
      if (trying.asking === abort) trying.asking = null;
    }
  }

  function startTry() {
    const drop = $("try-drop");
    const input = $("try-file");
    const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
    drop.addEventListener("click", () => input.click());
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        input.click();
      }
    });
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (event) => {
        event.preventDefault();
        if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
        drop.classList.add("over");
      });
    }
    drop.addEventListener("dragleave", (event) => {
      if (!drop.contains(event.relatedTarget)) drop.classList.remove("over");
    });
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      const files = event.dataTransfer ? event.dataTransfer.files : null;
      if (!files || !files.length) {
        tryError("Drop a file: a photo from your computer.");
        return;
      }
      try {
        input.files = files; // the file input names the dropped photo, not the one picked before
      } catch (_) {
        input.value = "";
      }
      choose(files[0]);
    });
    // A photo dropped beside the zone would make the browser leave the dashboard to open it.
    for (const type of ["dragover", "drop"]) {
      window.addEventListener(type, (event) => {
        if (hasFiles(event)) event.preventDefault();
      });
    }
    input.addEventListener("change", () => choose(input.files && input.files[0]));
    $("try-preview").addEventListener("error", () => {
      $("try-preview").hidden = true; // a format this browser cannot show
    });
    $("try-model").addEventListener("change", () => {
      describeModel();
      ask();
    });
    $("try-lang").addEventListener("change", () => ask());
    loadModels();
  }

  // -- polling ----------------------------------------------------------------------------

  function setStatus(state, text) {
    const status = $("status");
    if (status.dataset.state !== state || status.textContent !== text) {
      status.dataset.state = state;
      status.textContent = text;
    }
    document.body.classList.toggle("stale", state === "unreachable");
  }

  async function refreshAdmin() {
    const response = await request("v1/pool/settings", { headers: { Accept: "application/json" } });
    view.adminStatus = response.status;
    view.admin = response.ok ? await response.json() : null;
    renderAdmin();
  }

  async function poll() {
    const t = Date.now() / 1000;
    const [pool, metrics, admin] = await Promise.allSettled([
      request("v1/pool", { headers: { Accept: "application/json" } }).then(async (r) => {
        if (!r.ok) throw new Error(await errorText(r));
        return r.json();
      }),
      request("metrics").then((r) => (r.ok ? r.text() : Promise.reject(new Error(`metrics: ${r.status}`)))),
      refreshAdmin(),
    ]);
    if (pool.status === "fulfilled") {
      downSince = null;
      setStatus("live", "live");
      $("updated").textContent = `updated ${clock(new Date())}`;
      renderPool(pool.value);
    } else {
      downSince = downSince || new Date();
      const why = pool.reason instanceof TypeError || pool.reason.name === "AbortError" ? "" : ` (${pool.reason.message})`;
      setStatus("unreachable", `unreachable${why}`);
      $("updated").textContent = `since ${clock(downSince)}; retrying every ${POLL_MS / 1000} s`;
    }
    if (metrics.status === "fulfilled") {
      addSample(metrics.value, t);
      renderTraffic();
    }
    if (admin.status === "rejected" && pool.status === "fulfilled") {
      view.adminStatus = null;
    }
    setTimeout(poll, Math.max(0, POLL_MS - (Date.now() / 1000 - t) * 1000));
  }

  function start() {
    $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
    syncToken();
    $("token").addEventListener("input", syncToken);
    $("forget-token").addEventListener("click", () => {
      $("token").value = "";
      syncToken();
    });
    for (const key of [...EDITABLE, "persist"]) {
      const input = field(key);
      input.addEventListener("input", () => {
        formDirty = true;
      });
      input.addEventListener("change", () => {
        formDirty = true;
      });
    }
    $("reset-form").addEventListener("click", () => {
      formDirty = false;
      $("form-error").textContent = "";
      $("form-ok").textContent = "";
      fillForm(currentSettings());
    });
    $("settings-form").addEventListener("submit", submit);
    startTry();
    renderTraffic();
    poll();
  }

  start();
})();
