"use strict";
// The Study page: the cluster events of its run (a node lost), the Pareto front on any two objectives, parallel coordinates, the hypervolume series,
// held-out scores, the worker timeline, failures and the algorithm's own state. Redrawn when the study
// changes (the stamp is polled).
(async function () {
  EM.header("study");
  const study = EM.param("name");
  const main = EM.clear(document.getElementById("main"));
  if (!study) { EM.showError(main, new Error("no study named: open a study from the Studies page")); return; }
  document.title = study + " · evomerge";
  const dot = EM.el("span", { class: "live" });
  const title = EM.el("h1", {}, dot, EM.el("span", { id: "study-name", text: study }), " ", EM.el("span", { id: "state" }));
  const sub = EM.el("div", { class: "sub", id: "sub" });
  const stats = EM.el("div", { class: "stats", id: "stats" });
  const eventsBody = EM.el("div");
  const events = EM.el("section", { class: "card", id: "events-card", hidden: "" }, EM.el("h2", { text: "Cluster events" }),
    EM.el("p", { class: "help", text: "What the run reported about its Ray cluster: a node lost (its workers are replaced " +
      "where the cluster has room, the search goes on meanwhile), and when all workers ran again." }), eventsBody);
  main.append(title, sub, stats, events);

  const card = (id, heading, help, ...body) => {
    const c = EM.el("section", { class: "card", id }, EM.el("h2", { text: heading }),
      help ? EM.el("p", { class: "help", text: help }) : null, ...body);
    return c;
  };
  const xSel = EM.el("select", { id: "x-axis" });
  const ySel = EM.el("select", { id: "y-axis" });
  const paretoDiv = EM.el("div", { class: "plot", id: "pareto" });
  const pareto = card("pareto-card", "Pareto front",
    "Each dot is a scored candidate. Bold dots joined by the line are the best trade-offs on the two axes " +
    "(no other candidate is at least as good on both); faded dots are dominated. Hover for details, click a dot to open the candidate.",
    EM.el("div", { class: "controls" }, EM.el("label", {}, "x ", xSel), EM.el("label", {}, "y ", ySel),
      EM.el("span", { class: "legend-note", id: "pareto-count" })), paretoDiv);
  const parDiv = EM.el("div", { class: "plot", id: "parcoords" });
  const parcoords = card("parcoords-card", "All objectives (parallel coordinates)",
    "One line per scored candidate across every objective, each axis from its worst value (bottom) to its best (top): blue lines are on the Pareto front of all objectives, grey ones are dominated.",
    EM.el("div", { class: "legend-note", id: "parcoords-note" }), parDiv);
  const hvEval = EM.el("div", { class: "plot small", id: "hv-evals" });
  const hvTime = EM.el("div", { class: "plot small", id: "hv-time" });
  const hv = card("hv-card", "Hypervolume",
    "The volume of objective space the front dominates, measured from the study's fixed reference point: it only grows. " +
    "Flat stretches are evaluations that did not improve the front.", EM.el("div", { class: "grid2" }, hvEval, hvTime));
  const genBody = EM.el("div");
  const gen = card("heldout-card", "Held-out scores of the front (generalization)",
    "The report objectives score the final front on data the search never saw; a large drop from the search score means over-fitting.", genBody);
  const tlDiv = EM.el("div", { class: "plot", id: "timeline" });
  const timeline = card("timeline-card", "Worker timeline",
    "One row per worker, one bar per evaluation (green complete, red failed, orange running). Gaps are idle time; a row that stops early is a worker that died.",
    EM.el("div", { class: "legend-note", id: "timeline-note" }), tlDiv);
  const failBody = EM.el("div");
  const failures = card("failures-card", "Failures", null, failBody);
  const algoBody = EM.el("div");
  const algo = card("algorithm-card", "Algorithm", null, algoBody);
  main.append(pareto, parcoords, hv, gen, timeline, failures, algo);

  let S = null, P = null, H = null, A = null, E = null;

  function fillAxes() {
    const names = S.objectives.map((o) => o.name);
    if (xSel.options.length === names.length) return;
    for (const sel of [xSel, ySel]) {
      EM.clear(sel);
      S.objectives.forEach((o, i) => sel.appendChild(EM.el("option", { value: i, text: EM.objLabel(o) })));
    }
    xSel.value = "0"; ySel.value = names.length > 1 ? "1" : "0";
  }

  function header() {
    EM.clear(document.getElementById("state")).appendChild(EM.badge(S.state));
    document.getElementById("sub").textContent =
      S.algorithm + " on a " + S.genome + " genome · objectives: " + S.objectives.map(EM.objLabel).join(", ") +
      (S.report.length ? " · held-out report: " + S.report.join(", ") : "");
    const c = S.counts, done = c.complete + c.failed;
    const items = [["progress", done + " / " + (S.budget === null ? "?" : S.budget)], ["complete", c.complete],
      ["failed", c.failed], ["running", c.running], ["queued", c.queued], ["hypervolume", EM.fmt(S.hypervolume)],
      ["reference point", S.reference_point ? "(" + S.reference_point.map((v) => EM.fmt(v, 3)).join(", ") + ")" : "not fixed yet"]];
    const st = EM.clear(document.getElementById("stats"));
    for (const [k, v] of items) st.appendChild(EM.el("div", { class: "stat" }, EM.el("div", { class: "k", text: k }), EM.el("div", { class: "v", text: String(v) })));
    st.appendChild(EM.el("div", { class: "stat" }, EM.el("div", { class: "k", text: "compare" }),
      EM.el("a", { href: "/compare?" + new URLSearchParams({ study }), text: "with other studies →" })));
  }

  function scoredIdx() {
    const names = S.objectives.map((o) => o.name);
    const out = [];
    for (let i = 0; i < P.number.length; i++) {
      if (P.state[i] === "complete" && names.every((n) => P.scores[n] && P.scores[n][i] !== null)) out.push(i);
    }
    return out;
  }

  function drawPareto() {
    const ox = S.objectives[+xSel.value], oy = S.objectives[+ySel.value];
    const idx = scoredIdx();
    const X = P.scores[ox.name] || [], Y = P.scores[oy.name] || [];
    const sx = ox.direction === "maximize" ? -1 : 1, sy = oy.direction === "maximize" ? -1 : 1;
    // the 2-D front of the shown pair: sort by x (best first), keep each point better in y than all before
    const sorted = idx.slice().sort((a, b) => sx * X[a] - sx * X[b] || sy * Y[a] - sy * Y[b]);
    const front2 = new Set();
    let bestY = Infinity;
    for (const i of sorted) { if (sy * Y[i] < bestY) { front2.add(i); bestY = sy * Y[i]; } }
    const hover = (i) => [P.number[i], EM.esc(P.operator[i] || "?"), P.generation[i],
      S.objectives.map((o) => EM.esc(o.name) + " " + EM.fmt(P.scores[o.name][i])).join("<br>")];
    // past a few thousand points SVG redraws take seconds: WebGL then (the browser tests stay below)
    const kind = idx.length > 3000 ? "scattergl" : "scatter";
    const trace = (ids, name, marker, extra) => Object.assign({
      type: kind, mode: "markers", name, x: ids.map((i) => X[i]), y: ids.map((i) => Y[i]),
      customdata: ids.map(hover), marker,
      hovertemplate: "<b>#%{customdata[0]}</b> · %{customdata[1]} · generation %{customdata[2]}<br>%{customdata[3]}<extra></extra>",
    }, extra || {});
    const dominated = idx.filter((i) => !front2.has(i) && !P.front[i]);
    const fullFront = idx.filter((i) => !front2.has(i) && P.front[i]);
    const frontIds = sorted.filter((i) => front2.has(i));
    const traces = [trace(dominated, "dominated", { color: "#94a3b8", opacity: 0.55, size: 6 })];
    if (S.objectives.length > 2) traces.push(trace(fullFront, "front on other objectives", { color: "#60a5fa", opacity: 0.8, size: 7 }));
    // the 2-D front, a few dozen points, stays SVG (drawn above the WebGL points): its line would cost
    // WebGL a second shader program to compile
    traces.push(trace(frontIds, "front (these two axes)", { color: "#2563eb", size: 10, line: { color: "#1e3a8a", width: 1 } },
      { type: "scatter", mode: "lines+markers", line: { color: "#2563eb", width: 2, shape: "hv" } }));
    document.getElementById("pareto-count").textContent = idx.length + " scored candidates, " + frontIds.length + " on the front of these two axes";
    Plotly.react(paretoDiv, traces, {
      margin: { l: 60, r: 20, t: 10, b: 50 }, uirevision: xSel.value + "," + ySel.value,
      xaxis: { title: { text: EM.esc(EM.objLabel(ox)) }, zeroline: false },
      yaxis: { title: { text: EM.esc(EM.objLabel(oy)) }, zeroline: false },
      legend: { orientation: "h", y: 1.08 }, hovermode: "closest",
    }, EM.plotConfig);
  }

  // Parallel coordinates drawn as SVG lines: plotly's own parcoords needs WebGL and takes seconds in a
  // browser without a GPU. The dominated lines (no hover) are one path, a layout shape: as a trace each
  // line was a path element of its own, styled one by one. Each axis runs from its worst value (bottom)
  // to its best (top), so a line high everywhere is good everywhere.
  function drawParcoords() {
    if (S.objectives.length < 3) { parcoords.style.display = "none"; return; }
    parcoords.style.display = "";
    const MAX = 2000;
    let idx = scoredIdx();
    const note = document.getElementById("parcoords-note");
    if (idx.length > MAX) {  // every front member and an even sample of the others
      const rest = idx.filter((i) => !P.front[i]);
      const room = Math.max(0, MAX - (idx.length - rest.length)), step = rest.length / Math.max(1, room);
      const keep = new Set(idx.filter((i) => P.front[i]));
      for (let k = 0; k < room; k++) keep.add(rest[Math.floor(k * step)]);
      note.textContent = "showing all " + (idx.length - rest.length) + " front members and " + room + " of the " + rest.length + " others";
      idx = idx.filter((i) => keep.has(i));
    } else note.textContent = idx.length + " scored candidates";
    const objs = S.objectives;
    const lo = {}, hi = {};
    for (const o of objs) {
      const v = idx.map((i) => P.scores[o.name][i]);
      lo[o.name] = Math.min(...v); hi[o.name] = Math.max(...v);
    }
    const norm = (o, v) => {
      const span = hi[o.name] - lo[o.name] || 1;
      const t = (v - lo[o.name]) / span;
      return o.direction === "maximize" ? t : 1 - t;
    };
    const lines = (ids) => {
      const x = [], y = [], cd = [];
      for (const i of ids) {
        objs.forEach((o, j) => { x.push(j); y.push(norm(o, P.scores[o.name][i])); cd.push(P.number[i]); });
        x.push(null); y.push(null); cd.push(null);
      }
      return { x, y, customdata: cd };
    };
    const others = idx.filter((i) => !P.front[i]), front = idx.filter((i) => P.front[i]);
    const path = [];
    for (const i of others) path.push("M" + objs.map((o, j) => j + "," + norm(o, P.scores[o.name][i]).toFixed(4)).join("L"));
    const dominated = others.length ? [{ type: "path", path: path.join(""), xref: "x", yref: "y", layer: "below",
      line: { color: "rgba(148,163,184,0.35)", width: 1 }, name: "dominated", showlegend: true }] : [];
    const traces = [
      Object.assign({ type: "scatter", mode: "lines", name: "on the front", line: { color: "rgba(37,99,235,0.75)", width: 1.5 },
        hovertemplate: "#%{customdata}<extra></extra>" }, lines(front)),
    ];
    const ann = [];
    objs.forEach((o, j) => {
      const best = o.direction === "maximize" ? hi[o.name] : lo[o.name], worst = o.direction === "maximize" ? lo[o.name] : hi[o.name];
      ann.push({ x: j, y: 1.02, yanchor: "bottom", text: "<b>" + EM.esc(EM.objLabel(o)) + "</b><br>best " + EM.fmt(best), showarrow: false });
      ann.push({ x: j, y: -0.02, yanchor: "top", text: "worst " + EM.fmt(worst), showarrow: false });
    });
    Plotly.react(parDiv, traces, {
      margin: { l: 40, r: 40, t: 50, b: 40 }, showlegend: true, legend: { orientation: "h", y: -0.12 }, annotations: ann, shapes: dominated,
      xaxis: { range: [-0.15, objs.length - 0.85], showticklabels: false, zeroline: false, showgrid: true, gridcolor: "#64748b", tickvals: objs.map((_, j) => j), fixedrange: true },
      yaxis: { range: [-0.05, 1.05], showticklabels: false, zeroline: false, showgrid: false, fixedrange: true },
      hovermode: "closest",
    }, EM.plotConfig);
  }

  function drawHV() {
    if (!H.value.length) {
      for (const d of [hvEval, hvTime]) {
        Plotly.purge(d);
        EM.clear(d).appendChild(EM.el("div", { class: "empty", text: S.objectives.length < 2
          ? "A hypervolume needs two or more objectives." : "No hypervolume yet: it starts with the first results once the reference point is fixed." }));
      }
      return;
    }
    const line = { shape: "hv", color: "#2563eb", width: 2 };
    const lay = (xt) => ({ margin: { l: 60, r: 15, t: 30, b: 45 }, xaxis: { title: { text: xt } }, yaxis: { title: { text: "hypervolume" } } });
    Plotly.react(hvEval, [{ type: "scatter", mode: "lines", x: H.evaluations, y: H.value, line, name: "hypervolume",
      hovertemplate: "after %{x} evaluations: %{y:.4g}<extra></extra>" }],
    Object.assign(lay("evaluations finished"), { title: { text: "over evaluations", font: { size: 13 } } }), EM.plotConfig);
    const u = EM.timeUnit(Math.max(...H.seconds));
    Plotly.react(hvTime, [{ type: "scatter", mode: "lines", x: H.seconds.map((s) => s / u.div), y: H.value, line, name: "hypervolume",
      hovertemplate: "%{x:.1f} " + u.name + ": %{y:.4g}<extra></extra>" }],
    Object.assign(lay(u.name + " since the study started"), { title: { text: "over wall time", font: { size: 13 } } }), EM.plotConfig);
  }

  function drawHeldOut() {
    EM.clear(genBody);
    const report = P.report;
    const front = P.number.map((_, i) => i).filter((i) => P.front[i]);
    const SHOWN = 12;
    const allReport = front.filter((i) => report.some((r) => P.scores[r][i] !== null));
    const key = (i) => P.scores[report[0]][i] === null ? -Infinity : P.scores[report[0]][i];
    const withReport = allReport.slice().sort((x, y) => key(y) - key(x)).slice(0, SHOWN);
    if (!report.length || !withReport.length) {
      genBody.appendChild(EM.el("div", { class: "empty", text: !S.report.length
        ? "This study has no report objectives (add `report:` to the space to score the front on held-out data)."
        : "The front is scored on the report objectives when the search reaches its budget." }));
      return;
    }
    const cols = S.objectives.map((o) => o.name).concat(report);
    const head = EM.el("tr", {}, EM.el("th", { text: "candidate" }),
      ...S.objectives.map((o) => EM.el("th", { class: "num", text: o.name + " (search)" })),
      ...report.map((r) => EM.el("th", { class: "num", text: r + " (held out)" })));
    const body = EM.el("tbody");
    for (const i of withReport) {
      body.appendChild(EM.el("tr", {}, EM.el("td", {}, EM.el("a", { href: EM.candUrl(study, P.number[i]), text: "#" + P.number[i] })),
        ...cols.map((c) => EM.el("td", { class: "num", text: EM.fmt(P.scores[c][i]) }))));
    }
    const plot = EM.el("div", { class: "plot small", id: "heldout-plot" });
    genBody.append(EM.el("div", { class: "legend-note", text: allReport.length + " front members scored on held-out data" +
      (allReport.length > SHOWN ? "; the best " + SHOWN + " by " + report[0] + " shown" : "") }),
    plot, EM.el("table", { id: "heldout" }, EM.el("thead", {}, head), body));
    const labels = withReport.map((i) => "#" + P.number[i]);
    const traces = cols.map((c) => ({ type: "bar", name: EM.esc(c + (report.includes(c) ? " (held out)" : " (search)")),
      x: labels, y: withReport.map((i) => P.scores[c][i]) }));
    Plotly.react(plot, traces, { barmode: "group", margin: { l: 50, r: 10, t: 10, b: 40 }, legend: { orientation: "h", y: 1.12 },
      xaxis: { type: "category" }, yaxis: { title: { text: "score" } } }, EM.plotConfig);
  }

  function drawTimeline() {
    const MAX = 600;
    const all = P.number.map((_, i) => i).filter((i) => P.start_s[i] !== null && P.worker[i]);
    const ids = all.slice(-MAX);
    document.getElementById("timeline-note").textContent = all.length > MAX
      ? "showing the last " + MAX + " of " + all.length + " evaluations" : all.length + " evaluations";
    let now = 0;
    for (const v of P.end_s.concat(P.start_s)) if (v !== null && v > now) now = v;
    const u = EM.timeUnit(now);
    const color = { complete: "#16a34a", failed: "#dc2626", running: "#f59e0b", queued: "#9ca3af" };
    const byState = {};
    for (const i of ids) (byState[P.state[i]] = byState[P.state[i]] || []).push(i);
    const traces = Object.entries(byState).map(([state, list]) => ({
      type: "bar", orientation: "h", name: state, marker: { color: color[state] || "#64748b" },
      y: list.map((i) => EM.esc(P.worker[i])), base: list.map((i) => P.start_s[i] / u.div),
      x: list.map((i) => Math.max(((P.end_s[i] === null ? now : P.end_s[i]) - P.start_s[i]) / u.div, 1e-4)),
      customdata: list.map((i) => [P.number[i], ((P.end_s[i] === null ? now : P.end_s[i]) - P.start_s[i]).toFixed(1)]),
      hovertemplate: "#%{customdata[0]} · %{customdata[1]} s<extra>" + state + "</extra>",
    }));
    if (!traces.length) { Plotly.purge(tlDiv); EM.clear(tlDiv).appendChild(EM.el("div", { class: "empty", text: "No evaluation has started yet." })); return; }
    const workers = new Set(ids.map((i) => P.worker[i]));
    tlDiv.style.height = Math.max(200, 60 + 28 * workers.size) + "px";
    Plotly.react(tlDiv, traces, { barmode: "overlay", margin: { l: 110, r: 10, t: 10, b: 45 },
      xaxis: { title: { text: u.name + " since the study started" } }, yaxis: { type: "category", automargin: true },
      legend: { orientation: "h", y: 1.1 }, bargap: 0.3 }, EM.plotConfig);
  }

  function drawFailures() {
    EM.clear(failBody);
    const ids = P.number.map((_, i) => i).filter((i) => P.state[i] === "failed");
    if (!ids.length) { failBody.appendChild(EM.el("div", { class: "empty", text: "No candidate failed." })); return; }
    const body = EM.el("tbody");
    for (const i of ids.slice(-200).reverse()) {
      body.appendChild(EM.el("tr", {}, EM.el("td", {}, EM.el("a", { href: EM.candUrl(study, P.number[i]), text: "#" + P.number[i] })),
        EM.el("td", { text: P.worker[i] || "–" }), EM.el("td", { class: "num", text: String(P.attempts[i]) }),
        EM.el("td", {}, EM.el("div", { class: "error-text", text: P.error[i] || "" }))));
    }
    failBody.append(EM.el("div", { class: "legend-note", text: ids.length + " failed" + (ids.length > 200 ? " (newest 200 shown)" : "") }),
      EM.el("table", { id: "failures" }, EM.el("thead", {}, EM.el("tr", {}, ...["candidate", "worker", "attempts", "error"].map((h) => EM.el("th", { text: h, class: h === "attempts" ? "num" : null })))), body));
  }

  function drawAlgorithm() {
    EM.clear(algoBody);
    if (A.algorithm === "m2n2" && A.archive && A.archive.length) {
      algo.querySelector("h2").textContent = "M2N2 archive and niches";
      algoBody.appendChild(EM.el("p", { class: "help", text: "The archive M2N2 mates from. With per-example scores, each column is an example: " +
        "a member that alone solves examples others miss holds a niche, which is why M2N2 keeps it." }));
      const links = EM.el("div", { class: "lineage" }, "members: ");
      for (const m of A.archive) if (m.number !== null) links.appendChild(EM.el("a", { href: EM.candUrl(study, m.number), text: "#" + m.number }));
      algoBody.appendChild(links);
      const withS = A.archive.filter((m) => m.samples && m.samples.length && m.number !== null);
      if (withS.length) {
        const d = EM.el("div", { class: "plot small", id: "niches" });
        algoBody.appendChild(d);
        d.style.height = Math.max(220, 80 + 18 * withS.length) + "px";
        Plotly.react(d, [{ type: "heatmap", z: withS.map((m) => m.samples), y: withS.map((m) => "#" + m.number),
          colorscale: [[0, "#f1f5f9"], [1, "#1d4ed8"]], ygap: 1, colorbar: { title: { text: "score" } },
          hovertemplate: "%{y}, example %{x}: %{z}<extra></extra>" }],
        { margin: { l: 60, r: 10, t: 10, b: 40 }, yaxis: { type: "category", autorange: "reversed", title: { text: "archive member" } },
          xaxis: { title: { text: "example (every search objective's examples, in objective order)" } } }, EM.plotConfig);
      }
      return;
    }
    if ((A.algorithm === "map" || A.algorithm === "map_async") && A.pairs && A.pairs.length) {
      algo.querySelector("h2").textContent = "MAP surrogate: predicted against observed";
      algoBody.appendChild(EM.el("p", { class: "help", text: "Each point is a candidate MAP proposed from its quadratic surrogate: " +
        "where the surrogate predicted it (x) and what it scored (y). Points on the diagonal were predicted exactly." }));
      const grid = EM.el("div", { class: "grid2" });
      algoBody.appendChild(grid);
      A.objectives.forEach((name, j) => {
        const d = EM.el("div", { class: "plot small", id: "surrogate-" + j });
        grid.appendChild(d);
        const px = A.pairs.map((p) => p.predicted[j]), py = A.pairs.map((p) => p.observed[j]);
        const lo = Math.min(...px, ...py), hi = Math.max(...px, ...py);
        Plotly.react(d, [
          { type: "scatter", mode: "markers", x: px, y: py, customdata: A.pairs.map((p) => p.number),
            marker: A.fits > 1 ? { color: A.pairs.map((p) => p.fit), colorscale: "Viridis", cmin: 0, cmax: A.fits - 1, size: 8,
              colorbar: { title: { text: "surrogate fit" } } } : { color: "#2563eb", size: 8 },
            hovertemplate: "#%{customdata}: predicted %{x:.4g}, observed %{y:.4g}<extra></extra>", name: "candidates" },
          { type: "scatter", mode: "lines", x: [lo, hi], y: [lo, hi], line: { dash: "dot", color: "#64748b" }, hoverinfo: "skip", name: "exact" }],
        { title: { text: EM.esc(name), font: { size: 13 } }, margin: { l: 55, r: 10, t: 30, b: 45 }, showlegend: false,
          xaxis: { title: { text: "predicted" } }, yaxis: { title: { text: "observed" } } }, EM.plotConfig);
        d.on("plotly_click", (ev) => { location.href = EM.candUrl(study, ev.points[0].customdata); });
      });
      return;
    }
    algo.querySelector("h2").textContent = "Algorithm";
    algoBody.appendChild(EM.el("div", { class: "empty", text: (A.algorithm || S.algorithm) +
      ": nothing of its own to show (M2N2 shows its archive and niches, MAP its surrogate)." }));
  }

  function drawEvents() {
    EM.clear(eventsBody);
    events.hidden = !E.events.length;  // a study whose run lost no node shows nothing here
    const body = EM.el("tbody");
    for (const e of E.events.slice().reverse()) {
      body.appendChild(EM.el("tr", { class: "event-" + e.kind }, EM.el("td", { text: new Date(e.time).toLocaleString() }),
        EM.el("td", { text: e.message })));
    }
    eventsBody.appendChild(EM.el("table", { id: "events" }, EM.el("thead", {}, EM.el("tr", {},
      EM.el("th", { text: "time (newest first)" }), EM.el("th", { text: "event" }))), body));
  }

  // window.evomergeTimings: milliseconds each part took to draw, last time (the benchmark reads it)
  function drawAll() {
    const t = {};
    for (const f of [header, drawEvents, fillAxes, drawPareto, drawParcoords, drawHV, drawHeldOut, drawTimeline, drawFailures, drawAlgorithm]) {
      const t0 = performance.now(); f(); t[f.name] = Math.round(performance.now() - t0);
    }
    window.evomergeTimings = t;
  }

  async function refresh() {
    // the algorithm's own state is fetched for the algorithms that have one to show
    const own = !S || ["m2n2", "map", "map_async"].includes(S.algorithm);
    const t0 = performance.now();
    [S, P, H, A, E] = await Promise.all([EM.api("/api/study", { study }), EM.api("/api/points", { study }),
      EM.api("/api/hypervolume", { study }), own ? EM.api("/api/algorithm", { study }) : Promise.resolve({ algorithm: S.algorithm }),
      EM.api("/api/events", { study })]);
    const fetched = performance.now() - t0;
    await EM.plotlyReady();
    drawAll();
    window.evomergeTimings.fetch = Math.round(fetched);
    document.body.dataset.loaded = String(P.scored);
  }

  xSel.addEventListener("change", drawPareto);
  ySel.addEventListener("change", drawPareto);
  try {
    await EM.live(study, refresh, dot);
    paretoDiv.on("plotly_click", (ev) => { location.href = EM.candUrl(study, ev.points[0].customdata[0]); });
  } catch (e) { EM.showError(main, e); }
})();
