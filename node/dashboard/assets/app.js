// gpumesh dashboard: polls /v1/dashboard every second and renders it.
"use strict";

const $ = (id) => document.getElementById(id);
let lastOK = 0;

// With --http-auth token the feed needs the cluster's token: open the page
// as http(s)://host:7949/#token=TOKEN (the fragment never leaves the browser).
function authHeaders() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  return token ? { Authorization: "Bearer " + token } : {};
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c == null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function badge(text, cls) { return el("span", { class: "badge " + cls }, text); }

function ago(iso) {
  const t = Date.parse(iso);
  if (!t || t < 0) return "-";
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.round(s / 60) + "m ago";
  return Math.round(s / 3600) + "h ago";
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

function bar(label, frac, text) {
  const pct = Math.max(0, Math.min(1, frac)) * 100;
  const cls = pct >= 95 ? "crit" : pct >= 80 ? "hot" : "";
  const i = el("i", { class: cls });
  i.style.width = pct.toFixed(1) + "%";
  return el("div", { class: "bar", title: label }, i, el("b", {}, label + " " + text));
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function card(k, v) { return el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v)); }

function render(d) {
  const leader = d.leader || "none";
  $("summary").replaceChildren(
    "this node ", el("b", {}, d.node), " (" + d.role + ") · leader ",
    el("b", { id: "leader", "data-leader": d.leader || "" }, leader), " · index " + d.index);
  document.title = "gpumesh · " + (d.leader ? "leader " + d.leader : "no leader");

  const alive = d.members.filter((m) => m.state === "alive").length;
  const running = d.jobs.filter((j) => j.status === "running").length;
  const pending = d.jobs.filter((j) => j.status === "pending").length;
  const gpus = d.gpus.reduce((n, g) => n + g.gpus.length, 0);
  $("cards").replaceChildren(card("members alive", alive + " / " + d.members.length),
    card("leader", leader), card("running jobs", running), card("pending jobs", pending), card("GPUs", gpus));

  replaceRows($("members").tBodies[0], d.members.map((m) =>
    el("tr", { "data-node": m.name, "data-role": m.role },
      el("td", {}, m.name),
      el("td", {}, badge(m.role, "role-" + m.role)),
      el("td", { class: "st-" + m.state }, m.state),
      el("td", { class: "st-" + (m.status || "") }, m.status || "-"),
      el("td", {}, m.az || "-"),
      el("td", {}, m.lifecycle || "-"),
      el("td", {}, m.instance_type || "-"),
      el("td", {}, m.gpus),
      el("td", { class: "mono" }, m.addr),
      el("td", { class: "mono" }, m.serve_addr || "-"))));

  $("nojobs").hidden = d.jobs.length > 0;
  replaceRows($("jobs").tBodies[0], d.jobs.map((j) => {
    const ranks = el("div", { class: "ranks" }, ...j.ranks.map((r) =>
      el("span", { class: "rank st-" + r.status, "data-rank": r.rank, "data-status": r.status,
        title: (r.message || r.status) + (r.gpus && r.gpus.length ? " · GPUs " + r.gpus.join(",") : "") },
        "r" + r.rank + " ", el("span", {}, r.node), " " + r.status)));
    const state = el("td", {}, badge(j.status, "st-" + j.status));
    if (j.reason) state.append(el("div", { class: "reason" }, j.reason));
    return el("tr", { "data-job": j.id, "data-status": j.status },
      el("td", { class: "mono" }, j.id, el("div", { class: "reason" }, j.name)),
      el("td", {}, j.type),
      state,
      el("td", {}, j.generation),
      el("td", {}, ranks),
      el("td", {}, j.restarts),
      el("td", {}, ago(j.submitted)));
  }));

  $("nogpus").hidden = gpus > 0;
  $("gpus").replaceChildren(...d.gpus.map((n) =>
    el("div", { class: "gnode", "data-gpu-node": n.node }, el("h3", {}, n.node),
      n.error ? el("div", { class: "reason" }, n.error) : null,
      ...n.gpus.map((g) => el("div", { class: "gpu" },
        el("div", { class: "t" }, "GPU " + g.index + " · " + (g.temperature >= 0 ? g.temperature.toFixed(0) + " °C" : "- °C") +
          " · " + (g.power >= 0 ? g.power.toFixed(0) + " W" : "- W") +
          (g.ecc_uncorrected ? " · ECC " + g.ecc_uncorrected + " uncorrected" : "")),
        bar("util", g.utilization / 100, g.utilization >= 0 ? g.utilization.toFixed(0) + "%" : "-"),
        bar("mem", g.mem_total ? g.mem_used / g.mem_total : 0, bytes(g.mem_used) + " / " + bytes(g.mem_total)))))));

  $("banner").hidden = !d.banner;
  $("banner").textContent = d.banner || "";

  const errs = d.errors || [];
  $("errors").hidden = errs.length === 0;
  $("errors").replaceChildren(...errs.map((e) => el("div", {}, e)));
  $("footer").textContent = "gpumesh " + d.version + " · served by " + d.node + " (" + d.node_id + ")";
}

async function poll() {
  try {
    const r = await fetch("/v1/dashboard", { cache: "no-store", headers: authHeaders() });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    lastOK = Date.now();
  } catch (e) {
    $("summary").textContent = "cannot reach the agent: " + e.message;
  }
  const stale = Date.now() - lastOK > 3000;
  $("live").classList.toggle("stale", stale);
  $("updated").textContent = lastOK ? (stale ? "stale · " : "live · ") + new Date(lastOK).toLocaleTimeString() : "-";
  setTimeout(poll, 1000);
}

poll();
