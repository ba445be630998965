/* Conveyor dashboard: live cluster view from the dispatcher's snapshot stream (Server-Sent Events).
   No framework, no build step: DOM built with h(), charts drawn on <canvas> by hand. Text from the
   cluster (names, errors, output) only ever goes into textContent, never into HTML. */
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const PAGE = 50;
  const state = {
    snap: null,
    window: 300,
    page: 0,
    filter: "",
    remoteWorkers: null,
    fetchingWorkers: false,
    openFailures: new Set(),
    failuresKey: "",
    drawerId: null,
    drawerTimer: null,
    outputTab: "stdout",
    kpis: null,
  };

  // --- DOM and formatting helpers -------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k === "style") setStyle(el, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  // The page's Content-Security-Policy forbids style attributes; styles set through CSSOM are fine.
  function setStyle(el, text) {
    for (const decl of text.split(";")) {
      const i = decl.indexOf(":");
      if (i > 0) el.style.setProperty(decl.slice(0, i).trim(), decl.slice(i + 1).trim());
    }
  }

  const nf = new Intl.NumberFormat("en-US");
  const fmtInt = (n) => (n === null || n === undefined ? "–" : nf.format(Math.round(n)));
  function fmtCompact(n) {
    if (n === null || n === undefined) return "–";
    const a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e4) return (n / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
    return fmtInt(n);
  }
  function fmtRate(r) {
    if (r === null || r === undefined) return "–";
    if (r === 0) return "0";
    if (r < 10) return r.toFixed(r < 1 ? 2 : 1);
    return fmtCompact(r);
  }
  function fmtDuration(s) {
    if (s === null || s === undefined) return "–";
    if (s < 0.001) return "<1 ms";
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }
  const now = () => Date.now() / 1000;
  function ago(t) {
    if (!t) return "–";
    const s = Math.max(0, now() - t);
    if (s < 1) return "just now";
    return fmtDuration(s).replace(/\.\d+ s$/, " s") + " ago";
  }
  const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "–");

  async function getJSON(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error((body && body.error) || r.statusText);
    return body;
  }

  // --- connection -----------------------------------------------------------------------------------

  function setLive(s, text) {
    $("#live").dataset.state = s;
    $("#live-text").textContent = text || s;
  }

  function connect() {
    getJSON("/api/snapshot").then((s) => s && render(s)).catch(() => {});
    const es = new EventSource("/api/events");
    es.addEventListener("snapshot", (ev) => {
      setLive("live");
      render(JSON.parse(ev.data));
    });
    es.addEventListener("open", () => setLive("live"));
    es.addEventListener("error", () => setLive("lost", "reconnecting"));
  }

  // --- render ---------------------------------------------------------------------------------------

  function render(snap) {
    state.snap = snap;
    renderMeta(snap);
    renderKpis(snap);
    renderCharts();
    renderWorkers(snap);
    renderQueues(snap);
    renderRunning(snap);
    renderFailures(snap);
    renderRecent(snap);
    document.body.dataset.version = snap.version;
  }

  function renderMeta(snap) {
    const d = snap.dispatcher || {};
    $("#meta").replaceChildren(
      "dispatcher ", h("b", { text: d.endpoint || "?" }),
      " · instance ", h("b", { text: d.instance || "?" }),
      " · pid ", h("b", { text: String(d.pid || "?") }),
      " · up ", h("b", { text: fmtDuration(snap.uptime) }),
      ...journalNote(snap.journal),
    );
  }

  function journalNote(j) {
    // "journal: full" (or failing) while the dispatcher refuses new jobs; its reason as the tooltip.
    if (!j || j.state === "ok" || j.state === "off") return [];
    return [" · ", h("b", { class: "journal-bad", text: `journal: ${j.state}`, title: j.reason || "" })];
  }

  function kpi(key, label, tone) {
    const value = h("div", { class: "value" });
    const foot = h("div", { class: "foot" });
    const fill = h("i");
    const card = h("div", { class: `kpi tone-${tone}`, dataset: { kpi: key } },
      h("div", { class: "label", text: label }), value, foot, h("div", { class: "meter" }, fill));
    return { card, value, foot, fill };
  }

  function renderKpis(snap) {
    if (!state.kpis) {
      state.kpis = {
        workers: kpi("workers", "Workers", "accent"),
        slots: kpi("slots", "Busy slots", "slots"),
        queued: kpi("queued", "Queued", "warn"),
        running: kpi("running", "Running", "accent"),
        rate: kpi("throughput", "Throughput", "ok"),
        ok: kpi("succeeded", "Succeeded", "ok"),
        bad: kpi("failed", "Failed", "bad"),
        lost: kpi("misses", "Heartbeat misses", "warn"),
      };
      $("#kpis").replaceChildren(...Object.values(state.kpis).map((k) => k.card));
    }
    const k = state.kpis;
    const t = snap.totals || {};
    const modes = Object.entries(snap.modes || {}).map(([m, v]) => `${v.workers} ${m}`).join(" · ");
    k.workers.value.textContent = fmtInt(snap.workers_total);
    k.workers.foot.textContent = modes || "no worker registered";
    const busy = snap.slots.busy, total = snap.slots.total;
    k.slots.value.replaceChildren(fmtCompact(busy), h("small", { text: ` / ${fmtCompact(total)}` }));
    k.slots.foot.textContent = total ? `${Math.round((100 * busy) / total)}% in use` : "no slots";
    k.slots.fill.style.width = total ? `${(100 * busy) / total}%` : "0";
    k.queued.value.textContent = fmtCompact(snap.queued);
    const waits = [[snap.scheduled, "scheduled"], [snap.limited, "limited"], [snap.delayed, "waiting to retry"]]
      .filter(([n]) => n).map(([n, what]) => `${fmtInt(n)} ${what}`);  // work that waits in the dispatcher
    k.queued.foot.textContent = waits.length ? waits.join(" · ") : `${fmtInt(snap.queues_total)} queue(s)`;
    k.running.value.textContent = fmtCompact(snap.running);
    k.running.foot.textContent = `${fmtInt(snap.running_jobs.length)} reporting progress`;
    k.rate.value.replaceChildren(fmtRate(snap.throughput.last_10s), h("small", { text: " /s" }));
    k.rate.foot.textContent = `${fmtRate(snap.throughput.last_60s)}/s over 1 min`;
    k.ok.value.textContent = fmtCompact(t.succeeded);
    k.ok.foot.textContent = `${fmtCompact(t.submitted)} submitted · ${fmtCompact(t.retried)} retried`;
    k.bad.value.textContent = fmtCompact(t.failed);
    k.bad.foot.textContent = `${fmtCompact(t.cancelled)} cancelled` + (t.expired ? ` · ${fmtCompact(t.expired)} expired` : "");
    k.bad.card.classList.toggle("alert", (t.failed || 0) > 0);
    k.lost.value.textContent = fmtInt(snap.heartbeat_misses);
    k.lost.foot.textContent = "workers declared lost";
    for (const key of ["workers", "queued", "running", "rate", "ok", "bad", "lost"]) k[key].card.querySelector(".meter").hidden = true;
  }

  // --- charts ---------------------------------------------------------------------------------------

  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // The top of a 4-step axis whose steps are round numbers (1, 2, 2.5, 5 times a power of ten).
  function niceMax(v) {
    if (!(v > 0)) return 4;
    const raw = v / 4;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return 4 * m * p;
    return 40 * p;
  }

  function seriesWindow(snap) {
    const s = snap.series || { t: [] };
    const t1 = s.t.length ? s.t[s.t.length - 1] : now();
    const span = s.t.length ? t1 - s.t[0] : 0;
    const t0 = t1 - Math.min(state.window, Math.max(30, span));  // a young dispatcher: zoom in on what there is
    let i = 0;
    while (i < s.t.length && s.t[i] < t0) i++;
    const cut = (a) => (a || []).slice(i);
    return { t0, t1, t: cut(s.t), s, cut };
  }

  const charts = {};

  function drawChart(canvas, spec, hoverIdx) {
    const dpr = window.devicePixelRatio || 1;
    const rect = canvas.getBoundingClientRect();
    if (!rect.width) return;
    canvas.width = Math.round(rect.width * dpr);
    canvas.height = Math.round(rect.height * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const W = rect.width, H = rect.height;
    const pad = { l: 46, r: 12, t: 10, b: 24 };
    const iw = W - pad.l - pad.r, ih = H - pad.t - pad.b;
    const { t, t0, t1 } = spec;
    const n = t.length;
    canvas.dataset.points = String(n);

    // stacked series: tops are cumulative
    const tops = [];
    let base = new Array(n).fill(0);
    for (const s of spec.series) {
      const top = s.values.map((v, i) => (s.stack ? base[i] : 0) + (v || 0));
      tops.push({ s, low: s.stack ? base : null, top });
      if (s.stack) base = top;
    }
    // A context line (capacity) far above the data would flatten it: it then sets no scale, and is labelled.
    let ymax = 0;
    for (const { s, top } of tops) if (!s.context) for (const v of top) ymax = Math.max(ymax, v);
    const above = [];
    for (const { s, top } of tops) {
      if (!s.context || !n) continue;
      const m = Math.max(...top);
      if (m <= Math.max(ymax, 1) * 3) ymax = Math.max(ymax, m);
      else {
        above.push(`${s.name} ${fmtCompact(top[n - 1])} ↑`);
        s.hidden = true;
      }
    }
    ymax = niceMax(ymax * 1.08);
    const x = (tt) => pad.l + ((tt - t0) / Math.max(1, t1 - t0)) * iw;
    const y = (v) => pad.t + ih - (v / ymax) * ih;

    ctx.clearRect(0, 0, W, H);
    ctx.font = `11px ${css("--sans")}`;
    ctx.textBaseline = "middle";
    // grid and y labels
    ctx.strokeStyle = css("--line");
    ctx.lineWidth = 1;
    ctx.fillStyle = css("--faint");
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, yy);
      ctx.lineTo(W - pad.r, yy);
      ctx.stroke();
      ctx.fillText(Number.isInteger(v) ? fmtCompact(v) : fmtRate(v), pad.l - 7, yy);
    }
    // x labels: minutes (or 15 s steps for a 1 minute window) before now
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const span = t1 - t0;
    const step = span <= 60 ? 15 : span <= 150 ? 30 : span <= 300 ? 60 : 120;
    for (let back = 0; back <= span + 0.001; back += step) {
      const xx = x(t1 - back);
      if (xx < pad.l - 1) break;
      const label = back === 0 ? "now" : back < 60 ? `-${back}s` : `-${back / 60}m`;
      ctx.fillText(label, Math.min(Math.max(xx, pad.l + 10), W - pad.r - 12), H - pad.b + 7);
    }
    if (n < 2) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillStyle = css("--faint");
      ctx.font = `13px ${css("--sans")}`;
      ctx.fillText("collecting data…", pad.l + iw / 2, pad.t + ih / 2);
      return;
    }
    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.l, pad.t - 2, iw, ih + 4);
    ctx.clip();
    for (const { s, low, top } of tops) {
      if (s.hidden) continue;
      const color = css(s.color);
      if (s.fill) {
        const grad = ctx.createLinearGradient(0, pad.t, 0, pad.t + ih);
        grad.addColorStop(0, hexAlpha(color, 0.42));
        grad.addColorStop(1, hexAlpha(color, 0.06));
        ctx.fillStyle = grad;
        ctx.beginPath();
        ctx.moveTo(x(t[0]), y(top[0]));
        for (let i = 1; i < n; i++) ctx.lineTo(x(t[i]), y(top[i]));
        for (let i = n - 1; i >= 0; i--) ctx.lineTo(x(t[i]), y(low ? low[i] : 0));
        ctx.closePath();
        ctx.fill();
      }
      if (s.quiet && !s.values.some((v) => v > 0)) continue;  // a flat zero line would hide the axis
      ctx.strokeStyle = color;
      ctx.lineWidth = s.width || 1.7;
      ctx.setLineDash(s.dash ? [5, 4] : []);
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(x(t[0]), y(top[0]));
      for (let i = 1; i < n; i++) ctx.lineTo(x(t[i]), y(top[i]));
      ctx.stroke();
    }
    ctx.setLineDash([]);
    if (hoverIdx !== null && hoverIdx !== undefined && hoverIdx < n) {
      const xx = Math.round(x(t[hoverIdx])) + 0.5;
      ctx.strokeStyle = css("--line-2");
      ctx.beginPath();
      ctx.moveTo(xx, pad.t);
      ctx.lineTo(xx, pad.t + ih);
      ctx.stroke();
      for (const { s, top } of tops) {
        if (s.hidden) continue;
        ctx.fillStyle = css(s.color);
        ctx.beginPath();
        ctx.arc(xx, y(top[hoverIdx]), 3, 0, Math.PI * 2);
        ctx.fill();
      }
    }
    ctx.restore();
    if (above.length) {
      ctx.fillStyle = css("--slots");
      ctx.textAlign = "right";
      ctx.textBaseline = "top";
      ctx.font = `11px ${css("--sans")}`;
      ctx.fillText(above.join("  "), W - pad.r - 4, pad.t + 2);
    }
    spec.geom = { x, pad, iw };
  }

  function hexAlpha(color, a) {
    const m = /^#([0-9a-f]{6})$/i.exec(color);
    if (!m) return color;
    const v = parseInt(m[1], 16);
    return `rgba(${(v >> 16) & 255}, ${(v >> 8) & 255}, ${v & 255}, ${a})`;
  }

  function chartSpecs() {
    const snap = state.snap;
    if (!snap) return null;
    const w = seriesWindow(snap);
    const c = w.cut;
    return {
      throughput: {
        t: w.t, t0: w.t0, t1: w.t1,
        series: [
          { name: "succeeded", color: "--ok", values: c(w.s.succeeded), fill: true, unit: "/s", total: true },
          { name: "failed", color: "--bad", values: c(w.s.failed), fill: true, unit: "/s", total: true, quiet: true },
          { name: "cancelled", color: "--cancel", values: c(w.s.cancelled), unit: "/s", total: true, quiet: true },
        ],
      },
      load: {
        t: w.t, t0: w.t0, t1: w.t1,
        series: [
          { name: "queued", color: "--queued", values: c(w.s.queued), fill: true },
          { name: "running", color: "--running", values: c(w.s.running), fill: true },
          { name: "slots", color: "--slots", values: c(w.s.slots), dash: true, width: 1.3, context: true },
        ],
      },
    };
  }

  function renderCharts() {
    const specs = chartSpecs();
    if (!specs) return;
    for (const [name, spec] of Object.entries(specs)) {
      const canvas = $(`#chart-${name}`);
      charts[name] = { canvas, spec, hover: charts[name] ? charts[name].hover : null };
      drawChart(canvas, spec, charts[name].hover);
      const last = spec.series.reduce((a, s) => a + (s.total ? s.values[s.values.length - 1] || 0 : 0), 0);
      canvas.dataset.last = String(last);
      if (charts[name].hover !== null) showTip(name);
    }
  }

  function showTip(name) {
    const ch = charts[name];
    const tip = $(`#tip-${name}`);
    const i = ch.hover;
    if (i === null || !ch.spec.geom || i >= ch.spec.t.length) {
      tip.hidden = true;
      return;
    }
    tip.replaceChildren(h("div", { text: clock(ch.spec.t[i]), style: "color: var(--muted); margin-bottom: 2px" }),
      ...ch.spec.series.map((s) => h("div", {},
        h("span", { class: "k", style: `background: var(${s.color})` }),
        `${s.name} `, h("b", { text: (s.unit ? fmtRate(s.values[i]) : fmtInt(s.values[i])) + (s.unit || "") }))));
    tip.hidden = false;
    const xx = ch.spec.geom.x(ch.spec.t[i]);
    const wrap = tip.parentElement.getBoundingClientRect();
    const left = xx + 14 + tip.offsetWidth > wrap.width ? xx - 14 - tip.offsetWidth : xx + 14;
    tip.style.left = `${left}px`;
    tip.style.top = "12px";
  }

  function hookChart(name) {
    const canvas = $(`#chart-${name}`);
    canvas.addEventListener("mousemove", (ev) => {
      const ch = charts[name];
      if (!ch || !ch.spec.geom || ch.spec.t.length < 2) return;
      const rect = canvas.getBoundingClientRect();
      const px = ev.clientX - rect.left;
      const { t } = ch.spec;
      let best = 0, bestD = Infinity;
      for (let i = 0; i < t.length; i++) {
        const d = Math.abs(ch.spec.geom.x(t[i]) - px);
        if (d < bestD) { best = i; bestD = d; }
      }
      ch.hover = best;
      drawChart(canvas, ch.spec, best);
      showTip(name);
    });
    canvas.addEventListener("mouseleave", () => {
      const ch = charts[name];
      if (!ch) return;
      ch.hover = null;
      drawChart(canvas, ch.spec, null);
      showTip(name);
    });
  }

  // --- workers --------------------------------------------------------------------------------------

  function workerRow(w) {
    const pct = w.concurrency ? Math.min(100, (100 * w.running) / w.concurrency) : 0;
    const hb = w.last_seen_ago;
    const hbClass = hb > 3 ? "hb-bad" : hb > 1.5 ? "hb-late" : "hb-ok";
    return h("tr", { dataset: { worker: w.name } },
      h("td", { title: w.name },
        h("span", { class: "wname", text: w.name }),
        w.draining ? h("span", { class: "pill draining", text: "draining" }) : null,
        w.tags.length ? h("span", { class: "tags" }, w.tags.map((t) => h("span", { class: "tag", text: t }))) : null),
      h("td", { class: "mono", text: w.host }),
      h("td", {}, h("span", { class: `pill ${w.mode}`, text: w.mode })),
      h("td", {}, h("div", { class: "load" },
        h("div", { class: "track" }, h("div", { class: `fill${pct >= 100 ? " full" : ""}`, style: `width: ${pct}%` })),
        h("span", { class: "txt", text: `${fmtInt(w.running)} / ${fmtInt(w.concurrency)}` }))),
      h("td", { class: "num", text: fmtCompact(w.done) }),
      h("td", { class: `num ${hbClass}`, text: `${hb.toFixed(1)} s` }));
  }

  function renderWorkers(snap) {
    const remote = state.filter || snap.workers_total > PAGE;
    const modes = Object.entries(snap.modes || {});
    $("#modes").replaceChildren(...modes.map(([m, v]) =>
      h("span", { class: `pill ${m}` }, m, h("small", { text: `${v.busy}/${v.slots}` }))));
    if (remote) {
      fetchWorkers();
      return;
    }
    const workers = [...snap.workers].sort((a, b) => a.name.localeCompare(b.name));
    showWorkers(workers, snap.workers_total, 0);
  }

  function fetchWorkers() {
    if (state.fetchingWorkers) return;
    state.fetchingWorkers = true;
    const q = new URLSearchParams({ offset: state.page * PAGE, limit: PAGE, q: state.filter });
    getJSON(`/api/workers?${q}`)
      .then((r) => showWorkers(r.workers, r.total, r.offset))
      .catch(() => {})
      .finally(() => { state.fetchingWorkers = false; });
  }

  function showWorkers(workers, total, offset) {
    $("#workers-count").textContent = fmtInt(state.snap ? state.snap.workers_total : total);
    const body = $("#workers tbody");
    if (!workers.length) {
      body.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: 6,
        text: state.filter ? "No worker matches the filter." : "No worker registered yet. Start one with: conveyor worker --connect ADDRESS" })));
    } else {
      body.replaceChildren(...workers.map(workerRow));
    }
    const pager = $("#workers-pager");
    if (total <= PAGE) {
      pager.replaceChildren();
      return;
    }
    const pages = Math.ceil(total / PAGE);
    pager.replaceChildren(
      h("button", { text: "‹ prev", disabled: state.page === 0 || null, onclick: () => { state.page--; fetchWorkers(); } }),
      h("span", { text: `${fmtInt(offset + 1)}–${fmtInt(Math.min(total, offset + PAGE))} of ${fmtInt(total)} (busiest first)` }),
      h("button", { text: "next ›", disabled: state.page >= pages - 1 || null, onclick: () => { state.page++; fetchWorkers(); } }),
    );
  }

  // --- queues and progress --------------------------------------------------------------------------

  function renderQueues(snap) {
    $("#queues-count").textContent = fmtInt(snap.queues_total);
    const qs = snap.queues || [];
    if (!qs.length) {
      $("#queues").replaceChildren(h("div", { class: "placeholder", text: "Nothing queued: every job has a worker." }));
      return;
    }
    const max = Math.max(...qs.map((q) => q.queued));
    $("#queues").replaceChildren(...qs.slice(0, 12).map((q) => h("div", { class: "bar-row" },
      h("div", { class: "name" }, "mode ", h("b", { text: q.mode || "any" }),
        q.tags.length ? [" · tags ", h("b", { text: q.tags.join(", ") })] : null),
      h("div", { class: "n", text: fmtInt(q.queued) }),
      h("div", { class: "track" }, h("i", { style: `width: ${(100 * q.queued) / max}%` })))));
  }

  function renderRunning(snap) {
    const jobs = snap.running_jobs || [];
    if (!jobs.length) {
      $("#running").replaceChildren(h("div", { class: "placeholder", text: "No running job is reporting progress (conveyor.progress)." }));
      return;
    }
    $("#running").replaceChildren(...jobs.slice(0, 30).map((j) => {
      const pct = j.fraction === null || j.fraction === undefined ? null : 100 * j.fraction;
      return h("div", { class: "prog" },
        h("div", { class: "line1" },
          h("button", { class: "job", text: shortId(j.id), title: j.id, onclick: () => openJob(j.id) }),
          h("span", { class: "fn", text: j.fn }),
          h("span", { class: "pct", text: pct === null ? "…" : `${pct.toFixed(0)}%` })),
        h("div", { class: "track" }, h("i", { style: `width: ${pct === null ? 0 : pct}%` })),
        h("div", { class: "msg", text: [j.message, j.worker && `on ${j.worker}`].filter(Boolean).join(" · ") }));
    }));
  }

  const shortId = (id) => (id.length > 18 ? id.slice(0, 8) + "…" + id.slice(-6) : id);

  // --- failures and recent jobs ---------------------------------------------------------------------

  function renderFailures(snap) {
    const fs = snap.failures || [];
    $("#failures-count").textContent = fmtInt(fs.length);
    const key = fs.map((f) => f.id).join(",");
    if (key === state.failuresKey) {
      for (const el of document.querySelectorAll("#failures .when")) el.textContent = ago(Number(el.dataset.t));
      return;
    }
    state.failuresKey = key;
    if (!fs.length) {
      $("#failures").replaceChildren(h("div", { class: "placeholder", text: "No failures. Failed jobs appear here with their traceback." }));
      return;
    }
    $("#failures").replaceChildren(...fs.map((f) => {
      const e = f.error || {};
      const det = h("details", { class: "failure", dataset: { job: f.id }, open: state.openFailures.has(f.id) || null,
        ontoggle: (ev) => { if (ev.target.open) state.openFailures.add(f.id); else state.openFailures.delete(f.id); } },
        h("summary", {},
          h("div", { class: "err" }, h("span", { class: "etype", text: e.type || e.kind || "error" }), ": ", e.message || ""),
          h("div", { class: "where" },
            h("span", { class: "mono", text: f.fn }),
            h("span", { text: f.worker ? `on ${f.worker}` : "never ran" }),
            h("span", { text: `${f.attempts} attempt${f.attempts === 1 ? "" : "s"}` }),
            h("span", { class: "when", dataset: { t: f.finished_at }, text: ago(f.finished_at) }))),
        e.traceback ? h("pre", { class: "tb", text: e.traceback }) : h("div", { class: "placeholder", style: "padding: 8px 11px", text: "No traceback (" + (e.kind || "?") + ")." }),
        h("div", { class: "actions" }, h("button", { class: "job", text: `details and output of ${f.id} →`, onclick: () => openJob(f.id) })));
      return det;
    }));
  }

  function renderRecent(snap) {
    const jobs = snap.recent || [];
    const fns = snap.functions || [];
    $("#functions-sub").textContent = fns.length ? `${fns.length} function${fns.length === 1 ? "" : "s"} seen` : "";
    const body = $("#recent tbody");
    if (!jobs.length) {
      body.replaceChildren(h("tr", { class: "empty" }, h("td", { colspan: 6, text: "No job has finished yet." })));
      return;
    }
    body.replaceChildren(...jobs.map((j) => h("tr", { dataset: { job: j.id } },
      h("td", {}, h("button", { class: "job", text: shortId(j.id), title: j.id, onclick: () => openJob(j.id) })),
      h("td", { class: "mono", title: j.fn, text: j.fn }),
      h("td", { title: j.error || "" }, h("span", { class: `pill ${j.state}`, text: j.state })),
      h("td", { text: j.worker || "–" }),
      h("td", { class: "num", text: fmtDuration(j.duration) }),
      h("td", { class: "num", text: ago(j.finished_at) }))));
  }

  // --- job drawer -----------------------------------------------------------------------------------

  function closeJob() {
    state.drawerId = null;
    clearTimeout(state.drawerTimer);
    $("#drawer").hidden = true;
    $("#scrim").hidden = true;
  }

  function openJob(id) {
    id = id.trim();
    if (!id) return;
    state.drawerId = id;
    state.outputTab = "stdout";
    clearTimeout(state.drawerTimer);
    $("#job-title").textContent = id;
    $("#job-sub").textContent = "loading…";
    $("#job-body").replaceChildren();
    $("#drawer").hidden = false;
    $("#scrim").hidden = false;
    loadJob(id);
  }

  function loadJob(id) {
    getJSON(`/api/jobs/${encodeURIComponent(id)}`)
      .then((job) => {
        if (state.drawerId !== id) return;
        showJob(job);
        if (["running", "queued", "waiting"].includes(job.state)) state.drawerTimer = setTimeout(() => loadJob(id), 1000);
      })
      .catch((err) => {
        if (state.drawerId !== id) return;
        $("#job-sub").textContent = "";
        $("#job-body").replaceChildren(h("div", { class: "placeholder", text: String(err.message || err) }));
      });
  }

  function fact(k, v) {
    return h("div", { class: "fact" }, h("div", { class: "k", text: k }), h("div", { class: "v" }, v));
  }

  function showJob(job) {
    $("#job-title").textContent = job.id;
    $("#job-sub").textContent = job.fn || "";
    const body = [];
    const duration = job.duration !== undefined ? job.duration : jobDuration(job);
    body.push(h("div", { class: "facts" },
      fact("State", h("span", { class: `pill ${job.state}`, text: job.state })),
      fact("Worker", job.worker || "–"),
      fact("Attempts", String(job.attempts !== undefined ? job.attempts : "–")),
      fact("Submitted", job.submitted_at ? `${clock(job.submitted_at)} (${ago(job.submitted_at)})` : "–"),
      fact("Finished", job.finished_at ? `${clock(job.finished_at)} (${ago(job.finished_at)})` : "–"),
      fact("Duration", fmtDuration(duration))));
    if (job.progress) {
      const pct = job.progress.fraction === null ? null : 100 * job.progress.fraction;
      body.push(h("div", { class: "prog" },
        h("div", { class: "line1" }, h("span", { class: "fn", text: job.progress.message || "running" }),
          h("span", { class: "pct", text: pct === null ? "…" : `${pct.toFixed(0)}%` })),
        h("div", { class: "track" }, h("i", { style: `width: ${pct || 0}%` }))));
    }
    const err = typeof job.error === "object" && job.error ? job.error : null;
    if (err) {
      body.push(h("div", { class: "errbox" },
        h("div", {}, h("span", { class: "etype", text: err.type || err.kind }), ": ", err.message || ""),
        err.traceback ? h("pre", { class: "tb", text: err.traceback }) : null));
    } else if (typeof job.error === "string" && job.error) {
      body.push(h("div", { class: "errbox" }, h("span", { class: "etype", text: job.error })));
    }
    const graph = graphSection(job);
    if (graph) body.push(graph);
    if (job.history && job.history.length) {
      body.push(h("div", {}, h("div", { class: "section-title", text: "Attempts" }),
        h("table", { class: "table" },
          h("thead", {}, h("tr", {}, ["#", "Worker", "Started", "Duration", "Outcome"].map((c) => h("th", { text: c })))),
          h("tbody", {}, job.history.map((a) => h("tr", {},
            h("td", { text: String(a.attempt) }), h("td", { text: a.worker }), h("td", { text: clock(a.started) }),
            h("td", { text: a.finished ? fmtDuration(a.finished - a.started) : "running" }),
            h("td", { title: a.error || "", text: a.error || (a.finished ? "ok" : "…") })))))));
    }
    const output = job.output || {};
    const streams = ["stdout", "stderr", "log"].filter((s) => output[s]);
    const section = h("div", {}, h("div", { class: "section-title", text: "Output" }));
    if (!streams.length) {
      section.append(h("div", { class: "placeholder",
        text: job.held === false ? "The dispatcher no longer holds this job's output." : "Nothing captured on stdout, stderr or logging." }));
    } else {
      if (!streams.includes(state.outputTab)) state.outputTab = streams[0];
      const pre = h("pre", { class: "out", dataset: { stream: state.outputTab }, text: output[state.outputTab] });
      const tabs = h("div", { class: "tabs" }, streams.map((s) => h("button", {
        class: s === state.outputTab ? "on" : "", dataset: { stream: s },
        onclick: () => { state.outputTab = s; showJob(job); } }, s, h("small", { text: fmtCompact(output[s].length) }))));
      section.append(tabs, pre);
      requestAnimationFrame(() => { pre.scrollTop = pre.scrollHeight; });
    }
    body.push(section);
    $("#job-body").replaceChildren(...body);
  }

  // A job's place in a graph (docs/workflows.md): its parents, its dependants, the root it blames.
  function graphSection(job) {
    const err = typeof job.error === "object" && job.error ? job.error : {};
    const root = job.root || err.root;
    const parents = job.parents || [];
    const children = job.children || [];
    if (!parents.length && !children.length && !root) return null;
    const links = (ids) => h("div", { class: "v" }, ids.length ? ids.slice(0, 50).map((id) =>
      h("button", { class: "job", text: shortId(id), title: id, dataset: { job: id }, onclick: () => openJob(id) }))
      : "–", ids.length > 50 ? ` and ${ids.length - 50} more` : "");
    const facts = [
      h("div", { class: "fact graph-parents" }, h("div", { class: "k", text: "Parents" }), links(parents)),
      h("div", { class: "fact graph-children" }, h("div", { class: "k", text: "Dependants" }), links(children)),
    ];
    if (job.state === "waiting" && job.waiting_for) facts.push(fact("Waiting for", `${job.waiting_for} parent(s)`));
    if (root) {
      facts.push(h("div", { class: "fact graph-root" }, h("div", { class: "k", text: "Blamed on" }), h("div", { class: "v" },
        h("button", { class: "job", text: shortId(root), title: root, dataset: { job: root }, onclick: () => openJob(root) }),
        err.root_fn ? ` (${err.root_fn})` : "")));
    }
    return h("div", {}, h("div", { class: "section-title", text: "Graph" }), h("div", { class: "facts" }, facts));
  }

  function jobDuration(job) {
    const hist = job.history || [];
    const last = hist[hist.length - 1];
    if (!last) return null;
    return (last.finished || now()) - last.started;
  }

  // --- wiring ---------------------------------------------------------------------------------------

  function init() {
    for (const b of document.querySelectorAll("#window button")) {
      b.addEventListener("click", () => {
        state.window = Number(b.dataset.s);
        for (const o of document.querySelectorAll("#window button")) o.classList.toggle("on", o === b);
        renderCharts();
      });
    }
    hookChart("throughput");
    hookChart("load");
    let filterTimer = null;
    $("#worker-filter").addEventListener("input", (ev) => {
      clearTimeout(filterTimer);
      filterTimer = setTimeout(() => {
        state.filter = ev.target.value.trim().toLowerCase();
        state.page = 0;
        if (state.snap) renderWorkers(state.snap);
      }, 200);
    });
    $("#find").addEventListener("submit", (ev) => {
      ev.preventDefault();
      openJob($("#find-id").value);
    });
    $("#drawer-close").addEventListener("click", closeJob);
    $("#scrim").addEventListener("click", closeJob);
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeJob(); });
    window.addEventListener("resize", () => renderCharts());
    const hash = decodeURIComponent(location.hash.slice(1));
    if (hash.startsWith("job=")) openJob(hash.slice(4));
    connect();
  }

  window.conveyorDashboard = { openJob, state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
