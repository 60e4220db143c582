"use strict";
// The Studies page: every study in the database, refreshed every poll interval.
(async function () {
  EM.header("studies");
  document.title = "Studies · evomerge";
  const main = EM.clear(document.getElementById("main"));
  const dot = EM.el("span", { class: "live" });
  main.appendChild(EM.el("h1", {}, dot, "Studies"));
  main.appendChild(EM.el("div", { class: "sub", text:
    "Every search in this database. Running studies update live; click a name to open its Pareto front." }));
  const card = EM.el("div", { class: "card" });
  main.appendChild(card);

  function render(rows) {
    EM.clear(card);
    if (!rows.length) {
      card.appendChild(EM.el("div", { class: "empty", text: "No studies yet: start one with `evomerge search --space SPACE.yaml`." }));
      return;
    }
    const head = EM.el("tr", {}, ...["study", "state", "algorithm", "genome", "progress", "best per objective",
      "hypervolume", "failed", "last activity"].map((h) => EM.el("th", { text: h })));
    const tbody = EM.el("tbody");
    for (const r of rows) {
      const pct = r.budget ? Math.min(100, (100 * r.done) / r.budget) : 0;
      const best = EM.el("div");
      for (const o of r.objectives) {
        best.appendChild(EM.el("div", {}, EM.el("span", { class: "legend-note", text: EM.objLabel(o) + " " }),
          EM.fmt(r.best[o.name])));
      }
      tbody.appendChild(EM.el("tr", { "data-study": r.study },
        EM.el("td", {}, EM.el("a", { href: EM.studyUrl(r.study), class: "study-link", text: r.study })),
        EM.el("td", {}, EM.badge(r.state)),
        EM.el("td", { text: r.algorithm }),
        EM.el("td", { text: r.genome }),
        EM.el("td", {}, EM.el("div", { text: r.done + " / " + (r.budget === null ? "?" : r.budget) +
          (r.running ? " (" + r.running + " running)" : "") }),
          EM.el("div", { class: "bar" }, EM.el("span", { style: "width:" + pct.toFixed(1) + "%" }))),
        EM.el("td", {}, best),
        EM.el("td", { class: "num", text: EM.fmt(r.hypervolume) }),
        EM.el("td", { class: "num", text: String(r.failed) }),
        EM.el("td", { text: EM.ago(r.last_activity) })));
    }
    card.appendChild(EM.el("table", { id: "studies" }, EM.el("thead", {}, head), tbody));
  }

  const cfg = await EM.api("/api/config");
  const tick = async () => {
    try { render(await EM.api("/api/studies")); dot.className = "live"; }
    catch (e) { dot.className = "live off"; }
    setTimeout(tick, cfg.poll_ms);
  };
  await tick();
})();
