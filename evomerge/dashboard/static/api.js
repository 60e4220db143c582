"use strict";
// The API page: the OpenAPI schema of the JSON API, drawn here (the usual viewers load from a CDN).
(async function () {
  EM.header("api");
  const main = EM.clear(document.getElementById("main"));
  const spec = await EM.api("/api/openapi.json");
  main.append(EM.el("h1", { text: spec.info.title + " API" }), EM.el("div", { class: "sub", text: spec.info.description }),
    EM.el("p", {}, "Machine-readable schema: ", EM.el("a", { href: "/api/openapi.json", text: "/api/openapi.json" }),
      ". Example: ", EM.el("code", { text: "curl -s 'http://127.0.0.1:8000/api/points?study=NAME'" })));
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const params = (op.parameters || []).map((p) => EM.el("li", {}, EM.el("code", { text: p.name }),
        (p.required ? " (required) " : " ") + (p.description || "")));
      main.appendChild(EM.el("section", { class: "card" }, EM.el("h2", {}, EM.el("code", { text: method.toUpperCase() + " " + path })),
        EM.el("p", { text: op.summary || "" }), params.length ? EM.el("ul", {}, ...params) : null));
    }
  }
})();
