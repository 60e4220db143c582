"use strict";
// The Compare page: the hypervolume curves of several studies on one plot, and their fronts overlaid
// on two objectives they share.
(async function () {
  EM.header("compare");
  const main = EM.clear(document.getElementById("main"));
  main.append(EM.el("h1", { text: "Compare studies" }), EM.el("div", { class: "sub", text:
    "Pick studies (e.g. several algorithms on the same space). Hypervolumes compare only between studies with the same reference point and objectives." }));
  let all;
  try { all = await EM.api("/api/studies"); } catch (e) { EM.showError(main, e); return; }
  const chosen = new Set(EM.params("study").filter((s) => all.some((r) => r.study === s)));
  if (!chosen.size) all.slice(0, 4).forEach((r) => chosen.add(r.study));
  const picker = EM.el("div", { class: "controls", id: "picker" });
  for (const r of all) {
    const box = EM.el("input", { type: "checkbox", value: r.study });
    box.checked = chosen.has(r.study);
    box.addEventListener("change", () => {
      if (box.checked) chosen.add(r.study); else chosen.delete(r.study);
      history.replaceState(null, "", "/compare?" + [...chosen].map((s) => "study=" + encodeURIComponent(s)).join("&"));
      draw();
    });
    picker.appendChild(EM.el("label", {}, box, " " + r.study + " (" + r.algorithm + ")"));
  }
  const xSel = EM.el("select", { id: "x-axis" }), ySel = EM.el("select", { id: "y-axis" });
  const hvDiv = EM.el("div", { class: "plot", id: "hv-compare" }), frDiv = EM.el("div", { class: "plot", id: "front-compare" });
  const xMode = EM.el("select", { id: "hv-x" }, EM.el("option", { value: "evaluations", text: "over evaluations" }),
    EM.el("option", { value: "seconds", text: "over wall time" }));
  main.append(EM.el("section", { class: "card" }, EM.el("h2", { text: "Studies" }), picker),
    EM.el("div", { class: "grid2" },
      EM.el("section", { class: "card" }, EM.el("h2", { text: "Hypervolume" }), EM.el("div", { class: "controls" }, xMode), hvDiv),
      EM.el("section", { class: "card" }, EM.el("h2", { text: "Pareto fronts on two objectives" }),
        EM.el("div", { class: "controls" }, EM.el("label", {}, "x ", xSel), EM.el("label", {}, "y ", ySel)), frDiv)));
  const cache = {};
  async function get(s) {
    if (!cache[s]) cache[s] = Promise.all([EM.api("/api/hypervolume", { study: s }), EM.api("/api/points", { study: s })]);
    return cache[s];
  }
  async function draw() {
    const names = [...chosen];
    const got = await Promise.all(names.map(get));
    const objs = [];
    for (const [, P] of got) for (const o of P.objectives) if (!objs.some((q) => q.name === o.name)) objs.push(o);
    if (xSel.options.length !== objs.length) {
      for (const sel of [xSel, ySel]) { EM.clear(sel); objs.forEach((o) => sel.appendChild(EM.el("option", { value: o.name, text: EM.objLabel(o) }))); }
      if (objs.length > 1) ySel.value = objs[1].name;
    }
    const byTime = xMode.value === "seconds";
    let maxS = 0;
    for (const [H] of got) for (const v of H.seconds) if (v > maxS) maxS = v;
    const unit = EM.timeUnit(maxS);
    Plotly.react(hvDiv, names.map((s, k) => ({ type: "scatter", mode: "lines", name: EM.esc(s), line: { shape: "hv", width: 2 },
      x: byTime ? got[k][0].seconds.map((v) => v / unit.div) : got[k][0].evaluations, y: got[k][0].value })),
    { margin: { l: 60, r: 10, t: 10, b: 45 }, legend: { orientation: "h", y: 1.12 },
      xaxis: { title: { text: byTime ? unit.name + " since each study started" : "evaluations finished" } }, yaxis: { title: { text: "hypervolume" } } }, EM.plotConfig);
    const ox = objs.find((o) => o.name === xSel.value), oy = objs.find((o) => o.name === ySel.value);
    const traces = [];
    names.forEach((s, k) => {
      const P = got[k][1];
      if (!ox || !oy || !P.scores[ox.name] || !P.scores[oy.name]) return;
      // each study's front on the two axes shown: best x first, each kept point better in y than all before
      const X = P.scores[ox.name], Y = P.scores[oy.name];
      const sx = ox.direction === "maximize" ? -1 : 1, sy = oy.direction === "maximize" ? -1 : 1;
      const all = P.number.map((_, i) => i).filter((i) => P.state[i] === "complete" && X[i] !== null && Y[i] !== null);
      all.sort((a, b) => sx * X[a] - sx * X[b] || sy * Y[a] - sy * Y[b]);
      const ids = [];
      let bestY = Infinity;
      for (const i of all) if (sy * Y[i] < bestY) { ids.push(i); bestY = sy * Y[i]; }
      traces.push({ type: "scatter", mode: "lines+markers", name: EM.esc(s), line: { shape: "hv" },
        x: ids.map((i) => P.scores[ox.name][i]), y: ids.map((i) => P.scores[oy.name][i]),
        customdata: ids.map((i) => [EM.esc(s), P.number[i], s]), hovertemplate: "%{customdata[0]} #%{customdata[1]}<extra></extra>" });
    });
    Plotly.react(frDiv, traces, { margin: { l: 60, r: 10, t: 10, b: 45 }, legend: { orientation: "h", y: 1.12 },
      xaxis: { title: { text: ox ? EM.esc(EM.objLabel(ox)) : "" } }, yaxis: { title: { text: oy ? EM.esc(EM.objLabel(oy)) : "" } } }, EM.plotConfig);
    if (!frDiv.dataset.bound) {
      frDiv.on("plotly_click", (ev) => { const d = ev.points[0].customdata; location.href = EM.candUrl(d[2], d[1]); });
      frDiv.dataset.bound = "1";
    }
    document.body.dataset.loaded = "1";
  }
  for (const s of [xSel, ySel, xMode]) s.addEventListener("change", draw);
  await draw();
})();
