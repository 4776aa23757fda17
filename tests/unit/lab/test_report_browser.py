"""The interactive report in a real browser: Debian's headless Chromium, driven by Selenium through the system
chromedriver (nothing is downloaded), opens the page `tokensieve report --format html` wrote for a synthetic store of
6,600 rows (tests/unit/report_store.py: the screen's shape, benchmark, VLM and DAAM rows) and checks that every plot
renders without a console error and with the expected traces, that the method picker filters, that the paired view
computes the sign test of the two picked configurations, that a VLM point shows its kept patches, and saves a
screenshot (also to $TOKENSIEVE_REPORT_SCREENSHOT when set). Skipped, with the reason, without Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tokensieve.report import write_report
from tokensieve.results.sections import vlm_sign_tests
from tokensieve.results.stats import FULL, accuracy, group, paired, pareto_front
from tokensieve.results.store import ResultStore, is_visual

from ..report_store import build_store

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1500,1000")  # fmt: skip

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium: the browser test needs Debian's chromium and chromium-driver (`make setup` installs them as "
    "root; or set CHROMIUM and CHROMEDRIVER)",
)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    pytest.importorskip("plotly", reason="the interactive report needs the report extra (pip install plotly)")
    folder = tmp_path_factory.mktemp("browser")
    store = build_store(folder / "screen.sqlite")
    write_report(store, folder / "report", formats=["html"], title="tokensieve report (synthetic store)")
    with ResultStore(store, readonly=True) as s:
        rows = s.rows("eval")
    return folder / "report" / "report.html", rows


@pytest.fixture(scope="module")
def browser(page: tuple[Path, list[dict[str, Any]]]) -> Iterator[Any]:
    pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (requirements.txt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="tokensieve-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        driver.execute_cdp_cmd("Performance.enable", {})
        driver.get(page[0].resolve().as_uri())
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if driver.execute_script("return document.body && document.body.getAttribute('data-ready')"):
                break
            time.sleep(0.2)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def _traces(driver: Any, div: str) -> list[dict[str, Any]]:
    return _js(driver, f"return document.getElementById('{div}').data.map(t => ({{name: t.name, x: t.x, y: t.y}}))")


def _panels(driver: Any) -> dict[str, tuple[str, str]]:
    return _js(driver, "return Object.fromEntries([...document.querySelectorAll('[id^=acc-]')]"
                       ".map(d => [d.id, [d.dataset.task, d.dataset.mode]]))")  # fmt: skip


def _expected(rows: list[dict[str, Any]], task: str, mode: str, shown: Any = lambda m: True) -> dict[str, Any]:
    """What an accuracy panel should draw: one trace per method shown, the full cache, the Pareto front."""
    rs = [r for r in rows if r["task"] == task and r["mode"] == mode and not is_visual(r)]
    points, methods = [], set()
    for (label,), lrows in group(rs, lambda r: (r["label"],)).items():
        a = accuracy(lrows)
        if label == FULL or shown(lrows[0]["method"]):
            points.append((a.kept, a.score))
            if label != FULL:
                methods.add(lrows[0]["method"])
    front = pareto_front(points)
    return {"methods": methods, "count": len(methods) + 1 + (len(front) > 1), "front": front}


def _wait_ready(driver: Any) -> None:
    assert _js(driver, "return document.body.getAttribute('data-ready')") == "1", _js(driver, "return window.__errors")


def test_the_page_renders_every_plot_without_errors(browser: Any, page: Any, tmp_path: Path) -> None:
    _wait_ready(browser)
    path, rows = page
    assert _js(browser, "return window.__errors") == []
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    fetched = _js(browser, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert [u for u in fetched if not u.startswith("data:")] == []  # offline: the page fetches nothing
    panels = _panels(browser)
    assert sorted(panels.values()) == [[t, m] for t in ("niah_multikey", "niah_single") for m in ("agnostic", "aware")]
    for div, (task, mode) in panels.items():
        want = _expected(rows, task, mode)
        traces = _traces(browser, div)
        assert len(traces) == want["count"], (div, [t["name"] for t in traces])
        assert len(want["methods"]) == 27
        assert {t["name"] for t in traces} - {"Pareto front"} == want["methods"] | {"full cache"}
        if len(want["front"]) < 2:  # one point beats every other: no front to draw
            continue
        front = next(t for t in traces if t["name"] == "Pareto front")  # the browser's front is Python's
        assert front["x"] == pytest.approx([p[0] for p in want["front"]], rel=1e-3)
        assert front["y"] == pytest.approx([p[1] for p in want["front"]], rel=1e-3)
    counts = _js(browser, "return window.__report.traces")
    assert counts["speed-plot"] == 4 + 1 + 1  # 4 methods with accuracy and speed, the full cache, the ideal speed-ups
    assert [counts[f"vlm-0-{i}"] for i in range(6)] == [5] * 6  # 4 visual methods and the unpruned model, per type
    assert (counts["daam-a"], counts["daam-b"], counts["daam-map-0"], counts["pair-plot"]) == (1, 1, 1, 2)
    metrics = {m["name"]: m["value"] for m in browser.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}
    print(
        f"\nrendered in {_js(browser, 'return window.__report.renderMs'):.0f} ms wall, "
        f"{1000 * metrics.get('ThreadTime', math.nan):.0f} ms of the renderer's CPU; page {path.stat().st_size} B"
    )
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
    if os.environ.get("TOKENSIEVE_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["TOKENSIEVE_REPORT_SCREENSHOT"])


def test_the_method_picker_filters_every_plot(browser: Any, page: Any) -> None:
    _wait_ready(browser)
    from selenium.webdriver.common.by import By

    _, rows = page
    panels = _panels(browser)
    div, (task, mode) = sorted(panels.items())[0]
    search = browser.find_element(By.ID, "method-search")
    search.send_keys("snapkv")
    want = _expected(rows, task, mode, lambda m: "snapkv" in m)
    assert {t["name"] for t in _traces(browser, div)} == {"snapkv", "full cache"} | (
        {"Pareto front"} if want["count"] == 3 else set()
    )
    assert len(_traces(browser, div)) == want["count"]
    assert _js(browser, "return document.getElementById('methods-count').textContent").startswith("1 of ")
    search.clear()
    search.send_keys(" ")  # an input event: the search is empty again
    assert len(_traces(browser, div)) == 29
    decode = browser.find_element(By.CSS_SELECTOR, "input[data-family='decode']")
    decode.click()  # the decode-time family off
    names = {t["name"] for t in _traces(browser, div)}
    want = _expected(rows, task, mode, lambda m: not m.startswith("+"))
    assert not any(n.startswith("+") for n in names)
    assert len(names) == want["count"] == 22 + 2
    speed = {t["name"] for t in _traces(browser, "speed-plot")}
    assert "+quest" not in speed  # the speed view follows the picker too
    assert "snapkv" in speed
    decode.click()
    browser.find_element(By.ID, "methods-none").click()
    assert [t["name"] for t in _traces(browser, div)] == ["full cache"]
    assert [t["name"] for t in _traces(browser, "vlm-0-0")] == ["full model"]
    browser.find_element(By.ID, "methods-all").click()
    assert len(_traces(browser, div)) == 29
    assert _js(browser, "return window.__errors") == []


def _pick(browser: Any, a: str, b: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "pair-a")).select_by_visible_text(a)
    Select(browser.find_element(By.ID, "pair-b")).select_by_visible_text(b)
    out = browser.find_element(By.ID, "pair-summary")
    return {k: float(out.get_attribute(f"data-{k}")) for k in ("n", "only-a", "only-b", "p")} | {"text": out.text}


def test_the_paired_view_is_the_sign_test_on_shared_samples(browser: Any, page: Any) -> None:
    _wait_ready(browser)
    _, rows = page
    kv = [r for r in rows if not is_visual(r)]

    def item(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["model"], r["task"], r["mode"], r["task_options"], r["length"], r["depth"], r["seed"])

    got = _pick(browser, "snapkv:0.25", "full (reference)")
    want = paired([r for r in kv if r["label"] == "snapkv:0.25"], [r for r in kv if r["label"] == FULL], item)
    assert (got["n"], got["only-a"], got["only-b"]) == (want.n, want.only_a, want.only_b)
    assert want.n == 72  # 2 tasks × 2 modes × 18 samples
    assert got["p"] == pytest.approx(want.p, rel=1e-9)
    assert "72 shared samples" in got["text"]
    table = _js(browser, "return [...document.querySelectorAll('#pair-table tr')].map(r => r.cells[0].textContent)")
    assert table[1:] == ["niah_multikey · agnostic", "niah_multikey · aware", "niah_single · agnostic",
                         "niah_single · aware", "all"]  # fmt: skip
    # a VLM pair: the same numbers as the Markdown report's sign test against random
    vlm = [r for r in rows if is_visual(r)]
    tests = {(label, base): p for label, base, p in vlm_sign_tests(vlm)}
    got = _pick(browser, "todre:0.11", "vis:random:0.11")
    want = tests[("todre:0.11", "vis:random:0.11")]
    assert (got["n"], got["only-a"], got["only-b"]) == (want.n, want.only_a, want.only_b)
    assert want.n == 60  # 12 scenes × 5 questions
    assert got["p"] == pytest.approx(want.p, rel=1e-9)
    # configurations with nothing in common say so
    got = _pick(browser, "snapkv:0.25", "todre:0.11")
    assert got["n"] == 0
    assert "share no sample" in got["text"]
    assert json.loads(json.dumps(_js(browser, "return window.__errors"))) == []


def test_a_vlm_point_shows_the_patches_its_configuration_keeps(browser: Any) -> None:
    _wait_ready(browser)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    names = [t["name"] for t in _traces(browser, "vlm-0-0")]
    todre = names.index("todre")
    div = browser.find_element(By.ID, "vlm-0-0")
    _js(browser, "document.getElementById('vlm-0-0').scrollIntoView()")
    # where Plotly drew todre's first point (its lowest budget), from the centre of the plot
    dx, dy = _js(
        browser,
        f"""const gd = document.getElementById('vlm-0-0'), fl = gd._fullLayout, t = gd.data[{todre}];
        const r = gd.getBoundingClientRect();
        return [fl.xaxis.l2p(t.x[0]) + fl._size.l - r.width / 2, fl.yaxis.l2p(t.y[0]) + fl._size.t - r.height / 2]""",
    )
    ActionChains(browser).move_to_element_with_offset(div, round(dx), round(dy)).click().perform()
    img = _js(browser, "const i = document.getElementById('vlm-tile-img-0'); "
                       "return [i.dataset.label, i.src.slice(0, 22), i.naturalWidth]")  # fmt: skip
    assert img[:2] == ["todre:0.11", "data:image/png;base64,"]
    assert img[2] == 48  # the tile the store recorded, decoded by the browser
    caption = _js(browser, "return document.querySelector('#vlm-tile-0 figcaption').textContent")
    assert caption.startswith("todre:0.11: the patches it keeps")
