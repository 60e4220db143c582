"use strict";
// The Candidate page: scores, per-example gains over its parents, the genome, the recipe and its
// mergekit form, lineage, and the command that exports it.
(async function () {
  EM.header("candidate");
  const study = EM.param("study"), n = EM.param("n");
  const main = EM.clear(document.getElementById("main"));
  if (!study || !n) { EM.showError(main, new Error("open a candidate from a study's page")); return; }
  let C;
  try { C = await EM.api("/api/candidate", { study, number: n }); } catch (e) { EM.showError(main, e); return; }
  document.title = "#" + C.number + " of " + study + " · evomerge";
  const card = (id, heading, help, ...body) => EM.el("section", { class: "card", id }, EM.el("h2", { text: heading }),
    help ? EM.el("p", { class: "help", text: help }) : null, ...body);

  main.append(EM.el("div", { class: "sub" }, EM.el("a", { href: EM.studyUrl(study), text: "← " + study })),
    EM.el("h1", {}, "Candidate #" + C.number + " ", EM.badge(C.state)),
    EM.el("div", { class: "sub", text: (C.operator || "?") + " · generation " + C.generation + " · worker " + (C.worker || "–") +
      " · " + C.attempts + " attempt(s) · recipe " + C.recipe_hash.slice(0, 16) }));

  // scores
  const stats = EM.el("div", { class: "stats" });
  for (const o of C.objectives) stats.appendChild(EM.el("div", { class: "stat" }, EM.el("div", { class: "k", text: EM.objLabel(o) }),
    EM.el("div", { class: "v", text: EM.fmt(C.scores[o.name]) })));
  for (const [k, v] of Object.entries(C.report_scores)) stats.appendChild(EM.el("div", { class: "stat" },
    EM.el("div", { class: "k", text: k + " (held out)" }), EM.el("div", { class: "v", text: EM.fmt(v) })));
  const scoreCard = card("scores", "Scores", "Search objectives steer the search; held-out report scores are measured on the final front only.", stats);
  if (C.error) scoreCard.appendChild(EM.el("div", { class: "error-text", text: C.error }));
  main.appendChild(scoreCard);

  // per-example summary against the parents
  const sBody = EM.el("div");
  if (!C.samples.length) sBody.appendChild(EM.el("div", { class: "empty", text: "No per-example scores stored for this candidate." }));
  else {
    const body = EM.el("tbody");
    for (const s of C.samples) {
      const rel = s.parents.length ? EM.el("div") : EM.el("span", { class: "legend-note", text: C.parents.length ? "parents scored other examples" : "no parents (an initial candidate)" });
      for (const p of s.parents) rel.appendChild(EM.el("div", {}, "parent ", EM.el("a", { href: EM.candUrl(study, p.parent), text: "#" + p.parent }),
        " (mean " + EM.fmt(p.mean) + "): " + p.gained + " right here that the parent got wrong, " + p.lost + " wrong here that the parent got right"));
      body.appendChild(EM.el("tr", {}, EM.el("td", { text: s.objective }), EM.el("td", { class: "num", text: String(s.examples) }),
        EM.el("td", { class: "num", text: EM.fmt(s.mean) }), EM.el("td", {}, rel)));
    }
    sBody.appendChild(EM.el("table", { id: "samples" }, EM.el("thead", {}, EM.el("tr", {},
      ...["objective", "examples", "mean", "against its parents (an example is right at score ≥ 0.5)"].map((h) => EM.el("th", { text: h })))), body));
  }
  main.appendChild(card("examples", "Per-example scores", null, sBody));

  // the genome
  const g = C.genome;
  const gDiv = EM.el("div", { class: "plot", id: "genome" });
  if (g.kind === "data_flow") {
    main.appendChild(card("genome-card", "Layer path", "The data-flow candidate runs these layers in order (x: step; y: layer of its source model; " +
      "colour: source model; label: the scale applied to the hidden state entering the step).", gDiv));
    const byModel = {};
    g.path.forEach(([m, l], i) => (byModel[m] = byModel[m] || []).push([i, l, g.scales[i]]));
    Plotly.newPlot(gDiv, Object.entries(byModel).map(([m, pts]) => ({
      type: "scatter", mode: "markers+text", name: EM.esc(g.models[+m] || "model " + m), x: pts.map((p) => p[0]), y: pts.map((p) => p[1]),
      text: pts.map((p) => "×" + EM.fmt(p[2], 2)), textposition: "top center", marker: { size: 11 },
      hovertemplate: "step %{x}: layer %{y}, scale %{text}<extra>%{fullData.name}</extra>" })).concat([{
      type: "scatter", mode: "lines", x: g.path.map((_, i) => i), y: g.path.map((p) => p[1]), line: { color: "#cbd5e1" }, hoverinfo: "skip", showlegend: false }]),
    { margin: { l: 50, r: 10, t: 10, b: 45 }, xaxis: { title: { text: "step" } }, yaxis: { title: { text: "layer" } }, legend: { orientation: "h", y: 1.1 } }, EM.plotConfig);
  } else {
    main.appendChild(card("genome-card", "Genome", "Merge method " + (g.method || "?") + ": the weight (and density) each source model gets in each layer group.", gDiv));
    const srcs = g.sources.map((s, i) => EM.esc(s.split("/").pop() || "source " + i));
    const traces = [{ type: "heatmap", z: g.weights, x: srcs, y: g.groups.map(EM.esc), colorscale: "RdBu", zmid: 0, xaxis: "x", yaxis: "y",
      colorbar: { title: { text: "weight" }, x: g.densities ? 0.45 : 1.0 }, texttemplate: "%{z:.2f}", hovertemplate: "%{y} · %{x}: weight %{z:.3f}<extra></extra>" }];
    const layout = { margin: { l: 90, r: 10, t: 30, b: 60 }, annotations: [] };
    if (g.densities) {
      traces.push({ type: "heatmap", z: g.densities, x: srcs, y: g.groups.map(EM.esc), colorscale: [[0, "#f0fdf4"], [1, "#166534"]], zmin: 0, zmax: 1, xaxis: "x2", yaxis: "y2",
        colorbar: { title: { text: "density" } }, texttemplate: "%{z:.2f}", hovertemplate: "%{y} · %{x}: density %{z:.3f}<extra></extra>" });
      Object.assign(layout, { grid: { rows: 1, columns: 2, pattern: "independent" } });
      layout.annotations = [{ text: "weight", x: 0.2, y: 1.12, xref: "paper", yref: "paper", showarrow: false },
        { text: "density", x: 0.8, y: 1.12, xref: "paper", yref: "paper", showarrow: false }];
    }
    gDiv.style.height = Math.max(260, 90 + 26 * g.groups.length) + "px";
    Plotly.newPlot(gDiv, traces, layout, EM.plotConfig);
  }

  // recipe and mergekit
  const recipeText = JSON.stringify(C.recipe, null, 2);
  const base = (study + "-" + C.number).replace(/[^A-Za-z0-9._-]+/g, "_");
  const rec = card("recipe", "Recipe", "The recipe with the source models rebuilds this candidate exactly.",
    EM.el("div", { class: "controls" }, EM.copyButton(() => recipeText, "Copy JSON"),
      EM.el("button", { text: "Download recipe.json", onclick: () => EM.download(base + ".recipe.json", recipeText, "application/json") })),
    EM.el("pre", { id: "recipe-json", text: recipeText }));
  const mk = card("mergekit", "mergekit config", null);
  if (C.mergekit_yaml) {
    mk.append(EM.el("div", { class: "controls" }, EM.copyButton(() => C.mergekit_yaml, "Copy YAML"),
      EM.el("button", { text: "Download mergekit_config.yml", onclick: () => EM.download(base + ".mergekit_config.yml", C.mergekit_yaml, "text/yaml") })),
    EM.el("pre", { id: "mergekit-yaml", text: C.mergekit_yaml }));
  } else mk.appendChild(EM.el("div", { class: "empty", text: C.mergekit_missing }));
  main.append(EM.el("div", { class: "grid2" }, rec, mk));

  // lineage and export
  const lin = EM.el("div", { class: "lineage" });
  lin.appendChild(EM.el("div", {}, EM.el("b", { text: "parents: " }), ...(C.parents.length
    ? C.parents.map((p) => EM.el("a", { href: EM.candUrl(study, p), text: "#" + p })) : [EM.el("span", { class: "legend-note", text: "none (an initial candidate)" })])));
  lin.appendChild(EM.el("div", {}, EM.el("b", { text: "children: " }), ...(C.children.length
    ? C.children.map((p) => EM.el("a", { href: EM.candUrl(study, p), text: "#" + p })) : [EM.el("span", { class: "legend-note", text: "none yet" })])));
  main.appendChild(card("lineage", "Lineage", "The candidates it was bred from and those bred from it.", lin));
  main.appendChild(card("export", "Export", "Writes the merged model as a Hugging Face folder with a model card naming this recipe.",
    EM.el("div", { class: "controls" }, EM.el("code", { id: "export-command", text: C.export_command }), EM.copyButton(() => C.export_command, "Copy"))));
  document.body.dataset.loaded = "1";
})();
