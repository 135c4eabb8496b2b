// trainwire dashboard: reads the proxy's JSON API and draws everything itself (no libraries, no build step).
// Every text from the store goes into the page with textContent, never as HTML.
"use strict";

const REFRESH_MS = 5000;
const PAGE_SIZE = 25;       // sessions per page; `#size=N` in the URL overrides it
const FILTERS = ["status", "agent", "task", "has", "size"];
const HAS = ["failed", "untrainable"];  // `#has=failed,untrainable`: sessions with such calls
const KEY_ITEM = "trainwire.key";
const SVG = "http://www.w3.org/2000/svg";

const st = {
  cursors: [null],          // cursor of each sessions page seen; the last one is the page shown
  filters: null,            // from the URL fragment: status, agent, task, size
  nextCursor: null,
  busy: false,
  again: null,              // a refresh asked for while one was running (filters, paging): runs right after
  needKey: false,
  detailId: null,
  detailJson: null,
  openInputs: new Set(),    // calls whose whole input is unfolded: kept open across refreshes
};

// --- small helpers ------------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function num(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
  return String(+x.toFixed(4));
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:` +
    `${p(d.getSeconds())}`;
}

function hashParams() { return new URLSearchParams(location.hash.replace(/^#/, "")); }

// The URL fragment holds the view (filters, open session), so a view can be bookmarked and shared.
function hashWith(changes) {
  const p = hashParams();
  for (const [k, v] of Object.entries(changes)) { if (v) p.set(k, v); else p.delete(k); }
  return "#" + p.toString();
}

function sessionHref(id) { return hashWith({ session: id }); }

function readFilters() {
  const p = hashParams();
  const next = Object.fromEntries(FILTERS.map((k) => [k, (p.get(k) || "").trim()]));
  next.has = hasList(next.has).join(",");
  if (JSON.stringify(next) !== JSON.stringify(st.filters)) { st.filters = next; st.cursors = [null]; }
  $("f-status").value = next.status; $("f-agent").value = next.agent; $("f-task").value = next.task;
  const has = hasList(next.has);
  for (const k of HAS) {  // the attribute too, so the state shows in the DOM (and a saved page)
    $("f-" + k).checked = has.includes(k);
    $("f-" + k).toggleAttribute("checked", has.includes(k));
  }
}

function hasList(value) { return (value || "").split(",").map((x) => x.trim()).filter((x) => HAS.includes(x)); }

// --- API ----------------------------------------------------------------------------------------------------

class AuthError extends Error {}

function getKey() { try { return sessionStorage.getItem(KEY_ITEM); } catch (e) { return null; } }
function setKey(k) {
  try { if (k) sessionStorage.setItem(KEY_ITEM, k); else sessionStorage.removeItem(KEY_ITEM); } catch (e) { /* */ }
}

async function api(path) {
  const key = getKey();
  const r = await fetch(path, { headers: key ? { Authorization: "Bearer " + key } : {}, cache: "no-store" });
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  const message = (body && body.error && body.error.message) || `HTTP ${r.status}`;
  if (r.status === 401) throw new AuthError(message);
  if (!r.ok) { const e = new Error(message); e.status = r.status; throw e; }
  return body;
}

// Relative paths: the page lives at <prefix>/ui, so "sessions" is <prefix>/sessions behind a path prefix too.
const idPath = (id) => id.split("/").map(encodeURIComponent).join("/");

// --- auth ---------------------------------------------------------------------------------------------------

function showAuth(message) {
  st.needKey = true;
  $("main").hidden = true;
  $("auth").hidden = false;
  $("error").hidden = true;
  const had = !!getKey();
  if (had) setKey(null);
  $("auth-message").textContent = had
    ? `401 Unauthorized: the key was refused (${message}). Enter the admin key.`
    : `401 Unauthorized: this proxy requires an admin key (${message}). Enter it to see the dashboard.`;
  $("status").textContent = "admin key required";
  $("forget-key").hidden = true;
  $("auth-key").focus();
}

// --- counts -------------------------------------------------------------------------------------------------

function card(title, rows) {
  return h("div", { class: "card" }, h("h3", {}, title),
    h("dl", {}, rows.map(([label, id, value, cls]) => [
      h("dt", {}, label), h("dd", { id, class: cls || null }, typeof value === "string" ? value : num(value))])));
}

function renderCounts(stats) {
  const ss = stats.sessions, c = stats.calls, r = stats.rewards, q = stats.write_queue || {};
  const wp = stats.write_path || {}, rj = stats.rejected || {}, ad = stats.admission || {};
  const box = $("counts");
  box.replaceChildren(
    card("Sessions", [["total", "n-sessions-total", ss.total],
      ...["open", "finished", "claimed", "trained", "skipped"].map((k) => [k, "n-sessions-" + k, ss[k] || 0]),
      ...Object.keys(ss).filter((k) => !["total", "open", "finished", "claimed", "trained", "skipped"].includes(k))
        .map((k) => [k, "n-sessions-" + k, ss[k]])]),
    card("Calls", [["total", "n-calls-total", c.total], ["trainable", "n-calls-trainable", c.trainable],
      ["failed", "n-calls-failed", c.failed, c.failed ? "bad" : null],
      ["untrainable", "n-calls-untrainable", c.untrainable || 0, c.untrainable ? "warn" : null]]),
    card("Calls by API", Object.keys(c.by_api || {}).length
      ? Object.entries(c.by_api).map(([k, n]) => [k, "n-api-" + k, n]) : [["none yet", "n-api-none", 0]]),
    card("Rewards", [["total", "n-rewards-total", r.total], ["final", "n-rewards-final", r.final],
      ["intermediate", "n-rewards-intermediate", r.intermediate],
      ["closed without reward", "n-rewards-noreward", r.finished_without_reward]]),
    card("Orphaned rewards", [["rewards", "n-orphaned", stats.orphaned_rewards, stats.orphaned_rewards ? "warn" : null],
      ["sessions", "n-orphaned-sessions", r.orphaned_sessions]]),
    card("Write queue", [["calls", "n-queue-calls", q.calls, q.calls ? "warn" : null],
      ["rewards", "n-queue-rewards", q.rewards, q.rewards ? "warn" : null]]),
    card("Write path", [
      ["database", "n-db-state", wp.database_down_since ? "away since " + when(new Date(wp.database_down_since * 1000).toISOString()) : "answering",
        wp.database_down_since ? "bad" : null],
      ["refused rows", "n-rejected", rj.rows || 0, rj.rows ? "bad" : null],
      ["journaled (this process)", "n-journaled", wp.journal_appended || 0]]),
    card("Training backlog", [
      ["rewarded, not yet trained", "n-backlog", ad.backlog ?? "—", ad.full ? "warn" : null],
      ["--max-backlog", "n-max-backlog", ad.max_backlog ? ad.max_backlog : "off"],
      ["new sessions refused (429, this process)", "n-refused", ad.refused || 0, ad.refused ? "warn" : null]]),
  );
  if (rj.rows) {
    box.append(h("p", { class: "banner error", id: "rejected-note" },
      `${rj.rows} row(s) the database refused as data are kept in ${rj.journal_dir}/rejected-*.jsonl; ` +
      "fix the cause, then run `trainwire replay-rejected`."));
  }
}

// --- charts -------------------------------------------------------------------------------------------------

// series: [{name, cls, points: [{x, y, lo, hi, label, attrs}]}]; draws axes, an optional band, a line and dots.
function niceTicks(lo, hi, n) {
  const raw = (hi - lo) / n;
  let step = Math.pow(10, Math.floor(Math.log10(raw)));
  const err = raw / step;
  step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= Math.ceil(hi / step) * step + step / 2; v += step) {
    ticks.push(+v.toPrecision(12));
  }
  return ticks;
}

function lineChart(box, series, opts) {
  const W = 440, H = 220, R = 10, T = 10, B = 28, P = 8;  // P: room inside the axes for the dots
  const pts = series.flatMap((se) => se.points).filter((p) => Number.isFinite(p.y));
  if (!pts.length) { box.replaceChildren(h("p", { class: "muted empty" }, opts.empty)); return; }
  const xs = pts.map((p) => p.x);
  const ys = pts.flatMap((p) => [p.y, p.lo, p.hi]).filter(Number.isFinite);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) || 1; y0 -= d / 2; y1 += d / 2; }
  const yTicks = niceTicks(y0, y1, 4);
  [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  // The left margin fits the longest tick label ("4.00e-6" needs more room than "0.5"): 12px digits are ~7px wide.
  const yLabels = yTicks.map((y) => num(y));
  const L = Math.max(34, 14 + 7 * Math.max(...yLabels.map((t) => t.length)));
  const X = (x) => L + P + (x - x0) / (x1 - x0) * (W - L - R - 2 * P);
  const Y = (y) => T + P + (1 - (y - y0) / (y1 - y0)) * (H - T - B - 2 * P);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "aria-label": opts.title });
  yTicks.forEach((y, i) => {
    svg.append(s("line", { class: "grid", x1: L, x2: W - R, y1: Y(y), y2: Y(y) }),
      s("text", { class: "tick", x: L - 6, y: Y(y) + 4, "text-anchor": "end" }, yLabels[i]));
  });
  const xTicks = opts.xTicks || [...new Set(xs)];
  const every = Math.max(1, Math.ceil(xTicks.length / 10));
  xTicks.forEach((x, i) => {
    if (i % every === 0 || i === xTicks.length - 1) {
      svg.append(s("text", { class: "tick", x: X(x), y: H - B + 17, "text-anchor": "middle" }, opts.xLabel(x)));
    }
  });
  svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }),
    s("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  for (const se of series) {
    const ok = se.points.filter((p) => Number.isFinite(p.y));
    const band = ok.filter((p) => Number.isFinite(p.lo) && Number.isFinite(p.hi));
    if (band.length > 1) {
      const d = band.map((p) => `${X(p.x)},${Y(p.hi)}`).concat(band.slice().reverse().map((p) => `${X(p.x)},${Y(p.lo)}`));
      svg.append(s("polygon", { class: "band " + se.cls, points: d.join(" ") }));
    }
    if (ok.length > 1) svg.append(s("polyline", { class: "line " + se.cls, points: ok.map((p) => `${X(p.x)},${Y(p.y)}`).join(" ") }));
    if (ok.length <= 60 || opts.dots) {
      for (const p of ok) {
        svg.append(s("circle", { class: "pt " + se.cls, cx: X(p.x), cy: Y(p.y), r: 4, ...(p.attrs || {}) },
          s("title", {}, p.label)));
      }
    }
  }
  box.replaceChildren(svg);
}

function renderVersionChart(stats) {
  const rows = (stats.reward_by_policy_version || []).filter((v) => v.policy_version !== null && v.mean !== null);
  lineChart($("chart-versions"), [{ name: "mean", cls: "s1", points: rows.map((v) => ({
    x: v.policy_version, y: v.mean,
    label: `v${v.policy_version}: mean ${num(v.mean)} over ${v.rewarded} rewarded of ${v.sessions} sessions`,
    attrs: { "data-version": v.policy_version, "data-mean": v.mean },
  })) }], { title: "mean final reward by policy version", dots: true, empty: "No rewarded sessions yet.",
    xTicks: rows.map((v) => v.policy_version), xLabel: (x) => "v" + x });
}

function renderStepCharts(steps) {
  const asc = steps.slice().sort((a, b) => a.step - b.step);
  const m = (r, k) => (r.metrics && Number.isFinite(r.metrics[k]) ? r.metrics[k] : NaN);
  lineChart($("chart-reward"), [{ name: "reward", cls: "s1", points: asc.map((r) => {
    const y = m(r, "reward/mean"), sd = m(r, "reward/std");
    return { x: r.step, y, lo: y - sd, hi: y + sd, label: `step ${r.step}: reward ${num(y)} ± ${num(sd)}`,
      attrs: { "data-step": r.step } };
  }) }], { title: "reward per train step", empty: "No train steps yet.", xLabel: (x) => String(x) });
  lineChart($("chart-loss"), [{ name: "loss", cls: "s2", points: asc.map((r) => ({
    x: r.step, y: m(r, "loss"), label: `step ${r.step}: loss ${num(m(r, "loss"))}`, attrs: { "data-step": r.step },
  })) }], { title: "loss per train step", empty: "No train steps yet.", xLabel: (x) => String(x) });
  // Only steps with samples served by the weights being trained measure agreement (the trainer says so).
  const measured = asc.filter((r) => Number.isFinite(m(r, "agreement/mean_abs_dlogp")));
  lineChart($("chart-agreement"), ["mean_abs_dlogp", "max_abs_dlogp"].map((k, i) => ({
    name: k, cls: i ? "s2" : "s1", points: measured.map((r) => ({
      x: r.step, y: m(r, "agreement/" + k),
      label: `step ${r.step}: ${k.replace(/_/g, " ")} ${num(m(r, "agreement/" + k))} over ` +
        `${num(m(r, "agreement/tokens"))} tokens`, attrs: { "data-step": r.step, "data-metric": k },
    })),
  })), { title: "train-inference agreement", dots: true,
    empty: "No step has measured it yet (it needs samples served by the version being trained).",
    xLabel: (x) => String(x) });
  // Off-policy training (trainwire train --off-policy): what each step trained and dropped, and its IS weights.
  const counted = asc.filter((r) => Number.isFinite(m(r, "sessions/trained")));
  lineChart($("chart-sessions"), [["trained", "sessions/trained"], ["dropped", "sessions/dropped_stale"]].map(
    ([name, k], i) => ({ name, cls: i ? "s2" : "s1", points: counted.map((r) => ({
      x: r.step, y: m(r, k), label: `step ${r.step}: ${name} ${num(m(r, k))} sessions (staleness ${staleness(r.metrics)})`,
      attrs: { "data-step": r.step, "data-metric": name },
    })) })), { title: "sessions trained and dropped as stale", dots: true, empty: "No train steps yet.",
    xLabel: (x) => String(x) });
  const weighted = asc.filter((r) => Number.isFinite(m(r, "offpolicy/is_mean")));
  lineChart($("chart-is"), [["mean", "offpolicy/is_mean"], ["max", "offpolicy/is_max"]].map(([name, k], i) => ({
    name, cls: i ? "s2" : "s1", points: weighted.map((r) => ({
      x: r.step, y: m(r, k),
      label: `step ${r.step}: IS weight ${name} ${num(m(r, k))}; ${num(100 * m(r, "offpolicy/truncated_share"))}% ` +
        "of tokens truncated", attrs: { "data-step": r.step, "data-metric": name },
    })) })), { title: "importance weights", dots: true,
    empty: "No corrected step yet (trainwire train --off-policy tis or decoupled).", xLabel: (x) => String(x) });
}

// "0:12 1:8": trained sessions by staleness (versions behind the weights they trained), from staleness/sessions_<k>.
function staleness(mt) {
  const ages = Object.keys(mt || {}).filter((k) => k.startsWith("staleness/sessions_"))
    .map((k) => [Number(k.slice("staleness/sessions_".length)), mt[k]]).sort((a, b) => a[0] - b[0]);
  return ages.length ? ages.map(([age, n]) => `${age}:${num(n)}`).join(" ") : "—";
}

// --- tables -------------------------------------------------------------------------------------------------

function fill(tableId, rows, cols, empty) {
  const tbody = $(tableId).tBodies[0];
  if (!rows.length) {
    tbody.replaceChildren(h("tr", {}, h("td", { colspan: cols, class: "muted empty" }, empty)));
  } else {
    tbody.replaceChildren(...rows);
  }
}

function renderSteps(steps) {
  const td = (v) => h("td", { class: "num" }, num(v));
  fill("steps-table", steps.slice(0, 20).map((r) => {
    const mt = r.metrics || {};
    return h("tr", { "data-step": r.step }, td(r.step), td(r.policy_version), td(r.n_sessions), td(r.n_samples),
      td(mt.loss), td(mt.grad_norm), td(mt["reward/mean"]), td(mt["reward/std"]),
      td(mt["agreement/mean_abs_dlogp"]), td(mt["agreement/max_abs_dlogp"]),
      h("td", { class: "num" }, `${num(mt["batch/skipped_sampling"] || 0)} / ${num(mt["batch/skipped_untrainable"] || 0)}`),
      td(mt["time/train_s"]),
      h("td", { class: "num" }, Number.isFinite(mt["sessions/trained"])
        ? `${num(mt["sessions/trained"])} / ${num(mt["sessions/dropped_stale"])}` : "—"),
      h("td", { class: "num" }, staleness(mt)),
      h("td", { class: "num" }, Number.isFinite(mt["offpolicy/is_mean"])
        ? `${num(mt["offpolicy/is_mean"])} / ${num(mt["offpolicy/is_max"])} / ${num(100 * mt["offpolicy/truncated_share"])}%`
        : "—"),
      h("td", {}, when(r.created_at)));
  }), 16, "No train steps yet: start `trainwire train`.");
}

function renderVersions(versions) {
  fill("versions-table", versions.map((v) => h("tr", {},
    h("td", { class: "num" }, v.version), h("td", {}, v.kind), h("td", {}, v.served_model),
    h("td", { class: "num" }, num(v.train_step)), h("td", {}, h("span", { class: "pill " + v.status }, v.status)),
    h("td", {}, (v.serving_upstreams || []).join(", ") || "—"), h("td", {}, when(v.created_at)))),
  7, "No published versions yet: everything is served by the base model (v0).");
}

function renderSessions(page) {
  st.nextCursor = page.next_cursor;
  fill("sessions-table", page.data.map((x) => h("tr", { "data-session": x.id, class: x.id === st.detailId ? "sel" : null },
    h("td", {}, h("a", { href: sessionHref(x.id) }, x.id)),
    h("td", {}, h("span", { class: "pill " + x.status }, x.status),
      x.pruned_at ? [" ", h("span", { class: "pill pruned", title: "bodies dropped by trainwire prune " + when(x.pruned_at) }, "pruned")] : null),
    h("td", {}, x.task_id || "—"), h("td", {}, (x.agents || []).join(", ") || "—"),
    h("td", { class: "num" }, x.n_calls),
    h("td", { class: "num" + (x.n_failed ? " bad" : ""), "data-failed": x.n_failed }, x.n_failed || 0),
    h("td", { class: "num" + (x.n_untrainable ? " warn" : ""), "data-untrainable": x.n_untrainable },
      x.n_untrainable || 0),
    h("td", { class: "num" }, num(x.final_reward)),
    h("td", {}, when(x.first_call_at)), h("td", {}, when(x.last_call_at)))),
  10, "No sessions match.");
  const i = st.cursors.length;
  $("page-info").textContent = `page ${i} · ${page.data.length} session${page.data.length === 1 ? "" : "s"}`;
  $("page-newer").disabled = i <= 1;
  $("page-older").disabled = !page.has_more;
}

function sessionsQuery() {
  const size = parseInt(st.filters.size, 10);
  const q = new URLSearchParams({ limit: size >= 1 && size <= 1000 ? size : PAGE_SIZE });
  for (const k of ["status", "agent", "task", "has"]) if (st.filters[k]) q.set(k, st.filters[k]);
  const cur = st.cursors[st.cursors.length - 1];
  if (cur) q.set("cursor", cur);
  return "sessions?" + q;
}

// --- session detail -----------------------------------------------------------------------------------------

function rewardChips(rewards) {
  return rewards.map((r) => h("span", { class: "chip" + (r.final ? " final" : ""),
    title: `${r.source}${r.final ? ", final" : ""}, ${when(r.created_at)}` },
  `${r.final ? "final " : ""}${r.value === null ? "closed" : num(r.value)} · ${r.source}`));
}

function block(label, text, cls) {
  if (text === null || text === undefined || text === "") return null;
  return h("div", { class: "block " + (cls || "") }, h("div", { class: "label" }, label), h("pre", {}, text));
}

function tokenCount(c) {
  if (c.prompt_tokens === null && c.completion_tokens === null) return "no tokens";
  return `${num(c.prompt_tokens)} → ${num(c.completion_tokens)} tokens`;
}

// The call's whole input (system prompt first, every message, tool call and tool result), folded away.
function wholeInput(c) {
  const msgs = c.input_messages || [];
  if (!msgs.length) return null;
  const box = h("details", { class: "input-all", open: st.openInputs.has(c.id) || null,
    ontoggle: (ev) => { if (ev.target.open) st.openInputs.add(c.id); else st.openInputs.delete(c.id); } },
  h("summary", {}, `whole input · ${msgs.length} message${msgs.length === 1 ? "" : "s"}`),
  h("ol", { class: "messages" }, msgs.map((m) => h("li", { class: "msg role-" + String(m.role).replace(/[^a-z_-]/gi, "") },
    h("div", { class: "label" }, m.role + (m.tool_call_id ? ` (${m.tool_call_id})` : "")),
    m.content !== null && m.content !== undefined && m.content !== "" ? h("pre", {}, m.content) : null,
    (m.tool_calls || []).length ? h("ul", { class: "msg-tools" }, m.tool_calls.map((t) => h("li", { class: "tool-call" },
      h("code", {}, t.name || "?"), " ", h("code", { class: "args" }, typeof t.arguments === "string"
        ? t.arguments : JSON.stringify(t.arguments)), t.id ? h("span", { class: "muted" }, ` ${t.id}`) : null))) : null))));
  return box;
}

function callCard(c) {
  const inp = c.input || {}, out = c.output || {};
  const train = c.train || { trainable: c.trainable, reason: c.trainable ? null : "not trainable" };
  const raw = h("pre", { class: "raw", hidden: true });
  const toggle = h("button", { type: "button", class: "link", onclick: async () => {
    if (raw.hidden && !raw.textContent) {
      try { raw.textContent = JSON.stringify(await api("calls/" + encodeURIComponent(c.id)), null, 2); } catch (e) {
        raw.textContent = "could not load: " + e.message;
      }
    }
    raw.hidden = !raw.hidden;
  } }, "raw request/response");
  return h("li", { class: "call", "data-call": c.id },
    h("div", { class: "call-head" },
      h("b", {}, `#${c.seq}`), " ", h("span", { class: "agent" }, c.agent_name || "(no agent)"),
      h("span", { class: "meta" }, `v${c.policy_version === null ? "?" : c.policy_version}`),
      h("span", { class: "meta" }, "finish: " + (c.finish_reason || "—")),
      h("span", { class: "meta" + (c.status_code !== 200 ? " bad" : "") }, "HTTP " + c.status_code),
      h("span", { class: "meta" }, c.model_served || c.model_requested || ""),
      h("span", { class: "meta api" }, c.api || c.kind), c.stream ? h("span", { class: "meta" }, "stream") : null,
      h("span", { class: "meta tokens" }, tokenCount(c)),
      train.trainable ? null : h("span", { class: "meta untrained", title: "this call will not be trained on" },
        "not trained"),
      c.upstream_ms !== null ? h("span", { class: "meta" }, `${Math.round(c.upstream_ms)} ms`) : null,
      h("span", { class: "meta muted" }, when(c.started_at)), ...rewardChips(c.rewards || [])),
    train.trainable ? null : h("div", { class: "untrained-why" }, h("b", {}, "not trained: "), train.reason || "—"),
    (c.tools || []).length ? h("div", { class: "offered" }, h("span", { class: "label" }, "tools offered: "),
      c.tools.map((t, i) => [i ? ", " : "", h("code", {}, t)])) : null,
    block("input · " + (inp.role || "?") + (inp.tool_call_id ? ` (${inp.tool_call_id})` : ""), inp.content, "in"),
    wholeInput(c),
    block("reasoning", out.reasoning_content, "out"),
    block("output", out.content, "out"),
    (out.tool_calls || []).length ? h("div", { class: "block tools" }, h("div", { class: "label" }, "tool calls"),
      h("ul", {}, out.tool_calls.map((t) => h("li", { class: "tool-call" }, h("code", {}, t.name || "?"), " ",
        h("code", { class: "args" }, t.arguments || ""))))) : null,
    c.error ? block("error", c.error, "err") : null,
    toggle, raw);
}

function renderDetail(d) {
  const box = $("detail");
  box.hidden = false;
  box.replaceChildren(...[
    h("div", { class: "detail-head" }, h("h2", {}, "Session ", h("code", { id: "detail-id" }, d.id)),
      h("a", { href: hashWith({ session: null }), class: "close" }, "close ✕")),
    h("p", {}, h("span", { class: "pill " + d.status }, d.status), " ",
      d.pruned_at ? [h("span", { class: "pill pruned", title: "bodies dropped by trainwire prune" }, "pruned " + when(d.pruned_at)), " "] : null,
      `task ${d.task_id || "—"} · agents ${(d.agents || []).join(", ") || "—"} · ${d.n_calls} call${d.n_calls === 1 ? "" : "s"}` +
      (d.n_failed ? ` · ${d.n_failed} failed` : "") + (d.n_untrainable ? ` · ${d.n_untrainable} untrainable` : "") +
      ` · final reward ${num(d.final_reward)}` + (d.train_step !== null && d.train_step !== undefined ? ` · train step ${d.train_step}` : "") +
      (d.skip_reason ? ` · skipped: ${d.skip_reason}` : "")),
    (d.rewards || []).length ? h("p", {}, "rewards: ", rewardChips(d.rewards)) : null,
    d.calls.length ? h("ol", { class: "calls" }, d.calls.map(callCard)) : h("p", { class: "muted" },
      "No calls recorded for this session (its rewards are orphaned)."),
  ].filter((x) => x !== null));  // replaceChildren would show a null as the text "null"
}

async function loadDetail(force) {
  const id = hashParams().get("session");
  st.detailId = id;
  if (!id) { $("detail").hidden = true; st.detailJson = null; return; }
  try {
    const d = await api("sessions/" + idPath(id));
    const json = JSON.stringify(d);
    if (force || json !== st.detailJson) { st.detailJson = json; renderDetail(d); }
  } catch (e) {
    if (e instanceof AuthError) throw e;
    st.detailJson = null;
    $("detail").hidden = false;
    $("detail").replaceChildren(h("div", { class: "detail-head" }, h("h2", {}, "Session ", h("code", {}, id)),
      h("a", { href: hashWith({ session: null }), class: "close" }, "close ✕")), h("p", { class: "banner error" }, e.message));
  }
}

// --- refresh loop -------------------------------------------------------------------------------------------

async function refresh(opts) {
  if (st.needKey) return;
  if (st.busy) { st.again = { forceDetail: !!(opts && opts.forceDetail) || !!(st.again && st.again.forceDetail) }; return; }
  st.busy = true;
  try {
    const [stats, steps, versions, sessions] = await Promise.all([
      api("stats"), api("train/steps?limit=200"), api("policy/versions?limit=20"), api(sessionsQuery())]);
    await loadDetail(opts && opts.forceDetail);
    $("auth").hidden = true;
    $("main").hidden = false;
    $("error").hidden = true;
    $("forget-key").hidden = !getKey();
    renderCounts(stats);
    renderVersionChart(stats);
    renderStepCharts(steps.data);
    renderSteps(steps.data);
    renderVersions(versions.data);
    renderSessions(sessions);
    $("status").textContent = "updated " + when(new Date().toISOString());
  } catch (e) {
    if (e instanceof AuthError) showAuth(e.message);
    else { $("error").textContent = "Could not refresh: " + e.message; $("error").hidden = false; }
  } finally {
    st.busy = false;
  }
  if (st.again) { const again = st.again; st.again = null; await refresh(again); }
}

function takeKeyFromHash() {
  const p = hashParams();
  if (!p.has("key")) return;
  setKey(p.get("key"));
  p.delete("key");
  const rest = p.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
}

function init() {
  takeKeyFromHash();
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = $("auth-key").value.trim();
    if (!k) return;
    setKey(k);
    $("auth-key").value = "";
    st.needKey = false;
    refresh({ forceDetail: true });
  });
  $("forget-key").addEventListener("click", () => { setKey(null); location.reload(); });
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    location.hash = hashWith({ status: $("f-status").value, agent: $("f-agent").value.trim(),
      task: $("f-task").value.trim(), has: HAS.filter((k) => $("f-" + k).checked).join(",") });
    // -> hashchange -> readFilters + refresh
  });
  $("f-clear").addEventListener("click", () => {
    location.hash = hashWith({ status: "", agent: "", task: "", has: "" });
  });
  $("page-older").addEventListener("click", () => { if (st.nextCursor) { st.cursors.push(st.nextCursor); refresh(); } });
  $("page-newer").addEventListener("click", () => { if (st.cursors.length > 1) { st.cursors.pop(); refresh(); } });
  window.addEventListener("hashchange", () => {
    takeKeyFromHash();
    readFilters();
    if (st.needKey && getKey()) st.needKey = false;
    const opened = hashParams().get("session");
    const scroll = opened && opened !== st.detailId;
    refresh({ forceDetail: true }).then(() => { if (scroll && !$("detail").hidden) $("detail").scrollIntoView(); });
  });
  readFilters();
  setInterval(() => { if ($("autorefresh").checked && !document.hidden) refresh(); }, REFRESH_MS);
  refresh({ forceDetail: true });
}

init();
