// The snsbus monitor page: renders the snapshots the manager pushes over server-sent events.
// No framework, no build step, nothing fetched from elsewhere (manager/monitor.py serves this file).
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const query = token ? "?token=" + encodeURIComponent(token) : "";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let lastAt = 0;

  // -- small helpers ---------------------------------------------------------------------
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
    }
    for (const kid of kids) e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  const fmtNum = (x, d = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
  const fmtPct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(0) + "%");
  const fmtMs = (s) => (s === null || s === undefined ? "–" : (1000 * s).toFixed(s < 0.01 ? 2 : 0) + " ms");
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  }
  function fmtAgo(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return "now";
    if (s < 120) return s.toFixed(0) + " s ago";
    return (s / 60).toFixed(0) + " min ago";
  }
  const fmtClock = (t) => new Date(t * 1000).toLocaleTimeString();

  // -- the tree ------------------------------------------------------------------------------
  function renderTree(snap) {
    const svg = $("tree");
    const rootId = snap.root.id;
    const byId = new Map(snap.nodes.map((n) => [n.id, n]));
    const kids = new Map();
    const detached = new Set();
    for (const n of snap.nodes) {
      let p = n.parent;
      if (p !== rootId && !byId.has(p)) { p = rootId; detached.add(n.id); }
      if (!kids.has(p)) kids.set(p, []);
      kids.get(p).push(n);
    }
    for (const list of kids.values()) list.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    // Tidy layout: leaves take consecutive columns, a parent sits over the middle of its children.
    const pos = new Map();
    const seen = new Set([rootId]);
    let col = 0;
    function place(id, depth) {
      const children = (kids.get(id) || []).filter((c) => !seen.has(c.id));
      children.forEach((c) => seen.add(c.id));
      if (!children.length) { pos.set(id, [col++, depth]); return; }
      const xs = children.map((c) => { place(c.id, depth + 1); return pos.get(c.id)[0]; });
      pos.set(id, [(xs[0] + xs[xs.length - 1]) / 2, depth]);
    }
    place(rootId, 0);
    for (const n of snap.nodes) {  // stale parent pointers that form a cycle: hang them off the root
      if (!seen.has(n.id)) { seen.add(n.id); detached.add(n.id); place(n.id, 1); }
    }
    const showLabels = snap.nodes.length <= 60;
    const longest = Math.max(4, ...snap.nodes.map((n) => n.name.length));
    const dx = showLabels ? Math.max(24, 6 * longest + 10) : 14, dy = 56, pad = Math.max(24, dx / 2);
    const maxDepth = Math.max(0, ...[...pos.values()].map((p) => p[1]));
    const width = Math.max(col, 1) * dx + 2 * pad, height = maxDepth * dy + 2 * pad + 10;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const xy = (id) => { const p = pos.get(id); return [pad + p[0] * dx, pad + p[1] * dy]; };
    const edges = svgEl("g"), circles = svgEl("g"), labels = svgEl("g");
    for (const n of snap.nodes) {
      const parent = detached.has(n.id) ? rootId : n.parent;
      const [x1, y1] = xy(parent), [x2, y2] = xy(n.id);
      edges.append(svgEl("line", { x1, y1, x2, y2, class: detached.has(n.id) ? "detached" : "" }));
    }
    const [rx, ry] = xy(rootId);
    const rootC = svgEl("circle", { cx: rx, cy: ry, r: 8, class: "root", "data-name": snap.root.name });
    rootC.append(svgEl("title"));
    rootC.firstChild.textContent = `${snap.root.name} (root), ${snap.root.children} children`;
    circles.append(rootC);
    const rootLabel = svgEl("text", { x: rx, y: ry - 12, "text-anchor": "middle" });
    rootLabel.textContent = snap.root.name;
    labels.append(rootLabel);
    for (const n of snap.nodes) {
      const [cx, cy] = xy(n.id);
      const r = 4 + Math.min(9, 4 * Math.sqrt(Math.max(0, n.weight || 0)));
      const c = svgEl("circle", { cx, cy, r: r.toFixed(1), class: n.state, "data-name": n.name, "data-state": n.state });
      const title = svgEl("title");
      const load = n.load ? `, CPU ${fmtNum(n.load.cpu)}%, ${fmtBytes(n.load.rss)}` : "";
      title.textContent = `${n.name}: ${n.state}, depth ${n.depth}, ${n.children} children${load}, queued ${n.queued}`;
      c.append(title);
      circles.append(c);
      if (showLabels) {
        const t = svgEl("text", { x: cx, y: cy + r + 10, "text-anchor": "middle" });
        t.textContent = n.name;
        labels.append(t);
      }
    }
    svg.replaceChildren(edges, circles, labels);
    // Fit the panel's width, but never shrink below half size: a big tree scrolls sideways instead.
    const avail = svg.parentElement.clientWidth || width;
    const scale = Math.max(0.5, Math.min(1.5, avail / width));
    svg.style.width = (width * scale).toFixed(0) + "px";
    svg.style.height = (height * scale).toFixed(0) + "px";
  }

  // -- tables and feeds -------------------------------------------------------------------------
  function procsText(load) {
    if (!load) return "–";
    const parts = (load.procs || []).map((p) => `${p.app}/${p.name} ${p.state}${p.restarts ? " ×" + p.restarts : ""}`);
    for (const w of load.workers || []) parts.push(`${w.id} ${w.state}${w.crashes ? " crashes " + w.crashes : ""}`);
    return parts.length ? parts.join(", ") : "none";
  }

  const live = (n) => n.state === "alive" && n.load;

  function renderNodes(snap) {
    const rows = snap.nodes.map((n) => el("tr", { class: n.state, "data-node": n.name, "data-state": n.state },
      el("td", {}, n.name), el("td", { class: "state" }, n.state), el("td", {}, n.depth),
      el("td", {}, n.children), el("td", {}, n.subtree), el("td", {}, fmtAgo(n.last_heard)),
      // A node that is not alive shows no load: the last poll's figures would pass for current ones.
      el("td", {}, live(n) ? fmtNum(n.load.cpu) + "%" : "–"), el("td", {}, live(n) ? fmtBytes(n.load.rss) : "–"),
      el("td", {}, n.queued), el("td", { class: "procs" }, live(n) ? procsText(n.load) : "–")));
    $("nodes").tBodies[0].replaceChildren(...rows);
  }

  function feed(list, items, render) {
    const lis = items.slice().reverse().map(render);
    list.replaceChildren(...(lis.length ? lis : [el("li", { class: "muted" }, "nothing yet")]));
  }

  function renderApps(snap) {
    const box = $("apps");
    if (!snap.apps.length) { box.replaceChildren(el("p", { class: "muted" }, "no application deployed")); return; }
    box.replaceChildren(...snap.apps.map((a) => el("div", { "data-app": a.name },
      el("h3", {}, `${a.name} — ${a.phase}`, a.error ? el("span", { class: "muted" }, " " + a.error) : ""),
      el("div", {}, ...a.phases.map((p) => el("span", { class: "phase " + p.state, title: `${p.done} done, ${p.failed} failed` },
        `${p.key}: ${p.state}`))))));
  }

  function renderServices(snap) {
    const box = $("services");
    if (!snap.services.length) { box.replaceChildren(el("p", { class: "muted" }, "no TACC service running")); return; }
    box.replaceChildren(...snap.services.map((s) => {
      const r = s.rates || {};
      const classes = el("table", {}, el("thead", {}, el("tr", {}, ...["worker", "min", "max", "H", "pending",
        "decision", ""].map((h) => el("th", {}, h)))), el("tbody", {}, ...s.classes.map((c) => {
        const enabled = c.enabled !== false;
        const button = snap.actions ? el("button", { "data-svc": s.name, "data-worker": c.worker,
          "data-action": enabled ? "disable" : "enable" }, enabled ? "disable" : "enable") : "";
        return el("tr", { "data-class": `${s.name}/${c.worker}` }, el("td", {}, c.worker), el("td", {}, c.min),
          el("td", {}, c.max), el("td", {}, c.high_water), el("td", {}, c.pending.length),
          el("td", {}, enabled ? c.decision : "disabled"), el("td", {}, button));
      })));
      const maxQ = Math.max(1, ...s.instances.map((i) => (i.q || 0) + (i.busy || 0)));
      const inst = el("table", {}, el("thead", {}, el("tr", {}, ...["instance", "node", "queue", "smoothed",
        "cost", "done", "failed", "crashes", "cache"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...s.instances.map((i) => el("tr", { "data-instance": i.id },
        el("td", {}, i.id), el("td", {}, i.node),
        el("td", {}, i.cache ? "–" : el("span", {}, el("span", { class: "bar", title: `${i.q} queued, ${i.busy} running` }),
          `${i.q}+${i.busy}`)),
        el("td", {}, i.cache ? "–" : fmtNum(i.smoothed, 2)), el("td", {}, i.cache ? "–" : fmtMs(i.cost)),
        el("td", {}, i.done ?? "–"), el("td", {}, i.failed ?? "–"), el("td", {}, i.crashes ?? "–"),
        el("td", {}, i.cache ? `${fmtBytes(i.bytes)}, ${i.hits || 0} hits / ${i.misses || 0} misses` : "")))));
      // Queue bars: width by queue length, relative to the longest queue of the service.
      inst.querySelectorAll("tbody tr").forEach((tr, k) => {
        const i = s.instances[k], bar = tr.querySelector(".bar");
        if (bar) bar.style.width = (4 + 80 * (((i.q || 0) + (i.busy || 0)) / maxQ)).toFixed(0) + "px";
      });
      return el("div", { "data-service": s.name },
        el("h3", {}, `${s.name} (app ${s.app}) — ${fmtNum(r.tasks_per_s)} tasks/s, ${fmtNum(r.failed_per_s)} failed/s, ` +
          `cache hit rate ${fmtPct(r.cache_hit_rate)}`), classes, inst);
    }));
  }

  function renderFrontends(snap) {
    const rows = snap.frontends.map((f) => el("tr", { "data-frontend": f.url }, el("td", {}, f.url),
      el("td", {}, fmtNum(f.requests_per_s)), el("td", {}, fmtMs(f.latency && f.latency.p50)),
      el("td", {}, fmtMs(f.latency && f.latency.p90)), el("td", {}, fmtMs(f.latency && f.latency.p99)),
      el("td", {}, fmtPct(f.hit_rate)), el("td", {}, f.ok ? "reporting" : "silent: " + f.error)));
    $("frontends").tBodies[0].replaceChildren(...rows);
    const tasks = snap.services.map((s) => `${s.name}: ${fmtNum(s.rates && s.rates.tasks_per_s)} tasks/s`);
    $("rates-note").textContent = (snap.frontends.length ? "" :
      "No front end is polled (start the manager with --monitor-frontend URL to see HTTP rates and latency). ") +
      (tasks.length ? "Workers: " + tasks.join("; ") + "." : "");
  }

  function renderPlanes(snap) {
    const p = snap.planes, c = snap.counters;
    const rows = [
      ["control plane", `${p.control.messages} in, ${p.control.sent} out, ${Object.values(p.control.dropped).reduce((a, b) => a + b, 0)} dropped`],
      ["data plane", `${p.data.messages} in, ${p.data.sent} out, ${Object.values(p.data.dropped).reduce((a, b) => a + b, 0)} dropped`],
      ["children lost", c.children_lost], ["repairs (rejoined)", c.rejoined], ["joined", c.joined],
      ["package bytes served", fmtBytes((snap.transfer || {}).bytes_served || 0)],
      ["spawns / reaps", `${snap.service_counters.spawns || 0} / ${snap.service_counters.reaps || 0}`],
      ["front ends subscribed", snap.subscribers], ["uptime", fmtNum(snap.uptime, 0) + " s"],
    ];
    $("planes").tBodies[0].replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v ?? 0))));
  }

  function render(snap) {
    lastAt = Date.now();
    const c = snap.counts;
    $("summary").replaceChildren(el("b", {}, `${c.alive} alive`), `${c.dead} dead, ${c.unreachable} unreachable, ${c.left} left`);
    document.body.dataset.seq = snap.seq;
    renderTree(snap);
    renderNodes(snap);
    renderApps(snap);
    renderServices(snap);
    renderFrontends(snap);
    renderPlanes(snap);
    const alerts = snap.alerts || { active: [], feed: [] };
    feed($("alerts"), alerts.feed, (a) => el("li", { "data-key": a.key }, el("span", { class: "when" }, fmtClock(a.at)),
      el("span", { class: "kind " + a.status }, a.status), a.summary));
    feed($("events"), snap.events, (e) => el("li", {}, el("span", { class: "when" }, fmtClock(e.t)),
      el("span", { class: "kind " + e.kind }, e.kind), `${e.node}: ${e.detail}`));
    feed($("svc-events"), snap.service_events, (e) => el("li", {}, el("span", { class: "when" }, fmtClock(e.t)),
      el("span", { class: "kind " + e.kind }, e.kind), `${e.svc}: ${e.detail}`));
  }

  // -- live updates and actions --------------------------------------------------------------------
  function setLive(on) {
    const b = $("live");
    b.className = "badge " + (on ? "on" : "off");
    b.textContent = on ? "live" : "reconnecting";
  }

  function connect() {
    const es = new EventSource("api/events" + query);
    es.addEventListener("snapshot", (ev) => {
      setLive(true);
      try { render(JSON.parse(ev.data)); } catch (err) { $("updated").textContent = "render error: " + err; }
    });
    es.onerror = () => setLive(false);  // EventSource reconnects by itself
  }

  setInterval(() => {
    if (!lastAt) return;
    const age = (Date.now() - lastAt) / 1000;
    $("updated").textContent = "updated " + (age < 2 ? "just now" : age.toFixed(0) + " s ago");
    if (age > 5) setLive(false);
  }, 1000);

  $("services").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const headers = { "Content-Type": "application/json", "X-Snsbus-Monitor": "1" };
    if (token) headers.Authorization = "Bearer " + token;
    b.disabled = true;
    try {
      const resp = await fetch("api/" + b.dataset.action, { method: "POST", headers, credentials: "same-origin",
        body: JSON.stringify({ service: b.dataset.svc, worker: b.dataset.worker }) });
      const body = await resp.json();
      $("action-result").textContent = body.ok ? `${b.dataset.svc}/${b.dataset.worker}: ${b.dataset.action}d`
        : "refused: " + body.error;
    } catch (err) {
      $("action-result").textContent = "failed: " + err;
    } finally {
      b.disabled = false;
    }
  });

  connect();
})();
