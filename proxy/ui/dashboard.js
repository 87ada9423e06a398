// The sstate-proxy dashboard: fetches api/summary and draws it (inline SVG, no library).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 10000;
const LABELS = { hit: "hit", equivalent: "equivalent", upstream: "upstream", miss: "miss" };

function $(id) { return document.getElementById(id); }

function el(name, attrs, text) {
  const node = name.startsWith("svg:") ? document.createElementNS(SVG, name.slice(4)) : document.createElement(name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toString() : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function count(n) { return n.toLocaleString("en-US"); }

function clock(t) {
  const d = new Date(t * 1000);
  return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
}

function color(source) {
  return getComputedStyle(document.documentElement).getPropertyValue("--" + source).trim();
}

// Stacked bars: one column per time bucket, one rect per source (bottom to top in `sources`).
function barChart(container, points, sources, opts) {
  const width = opts.width, height = opts.height, left = 44, bottom = 18, top = 6;
  const plotH = height - bottom - top, plotW = width - left - 4;
  const max = Math.max(1, ...points.map(p => sources.reduce((s, k) => s + p[k], 0)));
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.label,
                              "data-max": max });
  for (const frac of (max % 2 === 0 ? [0, 0.5, 1] : [0, 1])) {  // whole numbers only
    const y = top + plotH - frac * plotH;
    svg.append(el("svg:line", { x1: left, x2: width - 4, y1: y, y2: y, stroke: "#d9dee3" }));
    svg.append(el("svg:text", { x: left - 6, y: y + 4, "text-anchor": "end" }, count(max * frac)));
  }
  const step = plotW / Math.max(1, points.length);
  const barW = Math.max(1, step * 0.8);
  points.forEach((p, i) => {
    const g = el("svg:g", { "data-t": p.t });
    let y = top + plotH;
    for (const source of sources) {
      const n = p[source];
      if (!n) continue;
      const h = n / max * plotH;
      y -= h;
      const rect = el("svg:rect", { x: left + i * step + (step - barW) / 2, y: y, width: barW, height: h,
                                    fill: color(opts.colors ? source : "equivalent"),
                                    "data-source": source, "data-count": n });
      rect.append(el("svg:title", {}, `${clock(p.t)} ${source}: ${count(n)}`));
      g.append(rect);
    }
    svg.append(g);
  });
  const ticks = Math.min(points.length, 6);
  for (let j = 0; j < ticks; j++) {
    const i = Math.round(j * (points.length - 1) / Math.max(1, ticks - 1));
    const anchor = j === 0 ? "start" : (j === ticks - 1 ? "end" : "middle");
    const x = j === 0 ? left + i * step : (j === ticks - 1 ? left + (i + 1) * step : left + i * step + step / 2);
    svg.append(el("svg:text", { x: x, y: height - 4, "text-anchor": anchor }, clock(points[i].t)));
  }
  container.replaceChildren(svg);
}

function render(data) {
  const t = data.totals;
  $("tile-requests").textContent = count(t.requests);
  $("tile-ratio").textContent = data.served_ratio === null ? "-" : (data.served_ratio * 100).toFixed(1) + " %";
  $("tile-bytes").textContent = bytes(t.bytes);
  $("tile-reports").textContent = count(data.reports_24h);
  $("tile-dedup").textContent = bytes(data.dedup.bytes_saved);

  const legend = $("legend");
  legend.replaceChildren(...data.sources.map(source => {
    const li = el("li", { "data-source": source, "data-count": t[source], "data-bytes": data.bytes_by_source[source] });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = color(source);
    li.append(swatch, LABELS[source] + " ", el("span", { class: "count" }, count(t[source])),
              el("span", { class: "muted" }, " (" + bytes(data.bytes_by_source[source]) + ")"));
    return li;
  }));
  barChart($("chart"), data.series, data.sources,
           { width: 1200, height: 260, colors: true, label: "object requests per minute by source" });

  const hours = data.reports_per_hour.map(r => ({ t: r.t, reports: r.reports }));
  barChart($("reports"), hours, ["reports"], { width: 400, height: 160, label: "reports per hour" });

  const s = data.storage;
  const storage = $("storage");
  const used = el("div", { id: "storage-used", "data-bytes": s.bytes, "data-objects": s.objects },
                  `${bytes(s.bytes)} in ${count(s.objects)} objects`);
  if (s.max_size) {
    const frac = s.bytes / s.max_size;
    const bar = el("div", { class: "bar" + (frac > 1 ? " over" : ""), "data-max-size": s.max_size });
    const fill = el("div");
    fill.style.width = Math.min(100, frac * 100).toFixed(1) + "%";
    bar.append(fill);
    storage.replaceChildren(used, bar, el("div", { class: "muted" },
      `${(frac * 100).toFixed(1)} % of the retention budget (${bytes(s.max_size)})`));
  } else {
    storage.replaceChildren(used, el("div", { class: "muted", id: "no-budget" },
      "no retention budget set ([retention] max_size)"));
  }

  const body = $("misses").tBodies[0];
  if (data.top_missed_recipes === null) {
    body.replaceChildren(el("tr", {}, ""));
    const note = el("td", { colspan: 2, class: "muted", id: "recipes-hidden" },
      "recipe names are task data, shown to users with @task-data: ");
    note.append(el("a", { href: "login" }, "sign in"));
    body.rows[0].append(note);
  } else if (data.top_missed_recipes.length === 0) {
    body.replaceChildren(el("tr", {}, ""));
    body.rows[0].append(el("td", { colspan: 2, class: "muted" }, "no misses"));
  } else {
    body.replaceChildren(...data.top_missed_recipes.map(r => {
      const tr = el("tr", { "data-recipe": r.recipe, "data-misses": r.misses });
      tr.append(el("td", {}, r.recipe), el("td", { class: "num" }, count(r.misses)));
      return tr;
    }));
  }
  $("status").textContent = "updated " + new Date(data.generated * 1000).toLocaleTimeString("en-GB") +
    " (all workers and replicas)";
  document.body.dataset.generated = data.generated;
}

let timer = null;

async function load() {
  clearTimeout(timer);
  try {
    // Built on the origin: a page opened as http://user:token@host/ui/ would otherwise resolve
    // the relative URL with those credentials in it, which fetch() refuses; the browser sends
    // the page's credentials itself (same origin, same realm).
    const url = new URL("api/summary?minutes=" + $("minutes").value, location.origin + location.pathname);
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(response.status + " " + (await response.text()).trim());
    render(await response.json());
  } catch (e) {
    $("status").textContent = "cannot load: " + e.message;
  }
  timer = setTimeout(load, REFRESH_MS);
}

$("minutes").addEventListener("change", load);
load();
