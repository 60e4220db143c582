"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright; nothing
downloads a browser): every page loads without a console error, the plots draw one point per scored
candidate, clicking a front point opens that candidate, a study named like a script (and a cluster event
that reads like one) shows as text, a new result shows within 2 s. A screenshot of each page goes to
``$EVOMERGE_SCREENSHOTS`` (default: a temporary folder, printed)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn
from dashboard_studies import run_search
from playwright.sync_api import sync_playwright

from evomerge.dashboard import create_app
from evomerge.dashboard.data import warm_up
from evomerge.store import Store

CHROMIUM = os.environ.get("EVOMERGE_CHROMIUM", "/usr/bin/chromium")
# WebGL in software, for plots of more than 3000 points; no sandbox: CI runs as root
ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{tmp / 'dash.db'}"
    run_search(tmp, url, "demo", "nsga2", budget=24)
    run_search(tmp, url, "m2n2-demo", "m2n2", budget=12)
    run_search(tmp, url, XSS, "random", budget=5)
    with Store(url) as st:  # what a run that lost a node stored, in a message that could be markup
        st.add_study_event(XSS, "node_lost", f"node 10.0.0.2:4000 (3cb8d965) lost; 1 node(s) left {XSS}")
    store = Store(url, read_only=True)
    warm_up()  # as `evomerge dashboard` does: the first candidate page needs the mergekit translation
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    shots = Path(os.environ.get("EVOMERGE_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"dashboard screenshots in {shots}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield {"base": f"http://127.0.0.1:{port}", "url": url, "browser": browser, "shots": shots, "store": store}
        browser.close()
    server.should_exit = True
    thread.join(10)
    store.close()


def _open(site, path: str, shot: str | None = None):
    """A page at ``path`` once its data is drawn, with the console errors it logged so far."""
    page = site["browser"].new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
    page.goto(site["base"] + path)
    page.wait_for_function("document.body.dataset.loaded !== undefined || !!document.querySelector('#studies, .card')")
    page.wait_for_timeout(300)  # plotly's last frame
    if shot:
        page.screenshot(path=str(site["shots"] / f"{shot}.png"), full_page=True)
    return page, errors


def test_every_page_loads_without_a_console_error(site) -> None:
    pages = {"studies": "/", "study": "/study?name=demo", "study-m2n2": "/study?name=m2n2-demo",
             "candidate": "/candidate?study=demo&n=3", "compare": "/compare?study=demo&study=m2n2-demo", "api": "/api"}
    for shot, path in pages.items():
        page, errors = _open(site, path, shot)
        if path.startswith(("/study", "/candidate", "/compare")):
            page.wait_for_function("document.body.dataset.loaded !== undefined")
        assert errors == [], (path, errors)
        assert page.locator(".error-text:has-text('Could not load')").count() == 0, path
        page.close()
        assert (site["shots"] / f"{shot}.png").stat().st_size > 10_000


def test_plots_draw_every_scored_candidate_and_a_click_opens_it(site) -> None:
    page, errors = _open(site, "/study?name=demo")
    page.wait_for_function("document.body.dataset.loaded !== undefined")
    assert not page.locator("#events-card").is_visible()  # its run lost no node
    pts = page.request.get(site["base"] + "/api/points?study=demo").json()
    scored = pts["scored"]
    assert scored == int(page.evaluate("document.body.dataset.loaded")) and scored > 10
    assert page.locator("#pareto .scatterlayer .point").count() == scored
    # parallel coordinates: one line of three points per scored candidate, the front's as a trace (with
    # hover), the dominated ones as one path (a shape): its M and L commands are their points
    drawn = page.evaluate("""() => { const d = document.getElementById('parcoords');
        return d.data.reduce((n, t) => n + t.x.filter((v) => v !== null).length, 0)
          + (d.layout.shapes || []).reduce((n, s) => n + (s.path.match(/[ML]/g) || []).length, 0); }""")
    front_n = sum(pts["front"])
    assert drawn == 3 * scored and page.locator("#parcoords .scatterlayer path.js-line").count() == front_n
    assert page.locator("#parcoords .shapelayer path").count() == (1 if scored > front_n else 0)
    assert page.locator("#parcoords .legend .traces").count() == (1 if scored > front_n else 0) + (front_n > 0)
    assert page.locator("#hv-evals .scatterlayer path.js-line").count() == 1
    assert page.locator("#timeline .barlayer path").count() == len([s for s in pts["start_s"] if s is not None])
    front = {n for n, f in zip(pts["number"], pts["front"], strict=True) if f}
    point = page.locator("#pareto .scatterlayer .trace").last.locator(".point").first
    box = point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_url("**/candidate?**")
    page.wait_for_function("document.body.dataset.loaded !== undefined")
    number = int(page.url.rsplit("n=", 1)[1])
    assert number in front
    assert page.locator("h1").inner_text().startswith(f"Candidate #{number}")
    assert page.locator("#genome .heatmaplayer, #genome .hm").count() > 0
    assert "evomerge export demo --candidate" in page.locator("#export-command").inner_text()
    assert errors == []
    page.close()


def test_a_study_named_like_a_script_is_text(site) -> None:
    page, errors = _open(site, "/", "studies-xss")
    page.wait_for_selector("#studies")
    assert page.locator("a.study-link", has_text=XSS).inner_text() == XSS
    assert page.evaluate("document.scripts.length") == 2  # common.js and the page's own
    page.goto(site["base"] + "/study?name=" + quote(XSS))
    page.wait_for_function("document.body.dataset.loaded !== undefined")
    assert page.locator("#study-name").inner_text() == XSS and page.title().startswith(XSS)
    assert page.locator("#events-card").is_visible()
    lost = f"node 10.0.0.2:4000 (3cb8d965) lost; 1 node(s) left {XSS}"
    assert page.locator("#events tbody td").nth(1).inner_text() == lost
    page.screenshot(path=str(site["shots"] / "study-xss.png"), full_page=True)
    assert errors == [] and page.evaluate("document.scripts.length") == 3  # and plotly
    page.close()


def test_a_new_result_shows_within_two_seconds(site) -> None:
    page, errors = _open(site, "/study?name=demo")
    page.wait_for_function("document.body.dataset.loaded !== undefined")
    before = int(page.evaluate("document.body.dataset.loaded"))
    writer = Store(site["url"])
    try:
        n = writer.add_candidate("demo", proposal_key="late", genome=[0.5], recipe_json={"late": 1},
                                 recipe_hash="late")
        writer.mark_running("demo", n, worker="late-worker")
        t0 = time.perf_counter()
        writer.complete_candidate("demo", n, {"a": 0.5, "b": 0.5, "c": 0.5}, None, {})
        page.wait_for_function(f"+document.body.dataset.loaded === {before + 1}", timeout=5000)
        latency = time.perf_counter() - t0
    finally:
        writer.close()
    print(f"update latency {latency:.2f} s")
    assert latency < 2.0
    assert page.locator("#pareto .scatterlayer .point").count() == before + 1
    assert errors == []
    page.close()
