"""Screenshot an interactive report (`tokensieve report --format html`) in Debian's headless Chromium, as the
browser test drives it (selenium with the system chromedriver; nothing is downloaded).

Usage: .venv/bin/python scripts/report_screenshot.py REPORT.html OUT.png [--width 1500] [--height 1100]
       [--methods A,B,...]  (show only these methods: "none" in the picker, then each one's box)
       [--pair SPEC_A,SPEC_B]  (pick two configurations in the paired comparison)
       [--scroll-to TEXT]   (scroll to the first heading containing TEXT first)"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page")
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=1100)
    ap.add_argument("--scroll-to", default=None)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--pair", default=None)
    args = ap.parse_args()
    pair = args.pair.split(",") if args.pair else []
    if args.pair and len(pair) != 2:
        raise SystemExit("--pair takes two configurations, e.g. --pair snapkv:0.25,full")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        raise SystemExit("needs Debian's chromium and chromium-driver (make setup installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="tokensieve-chromium-")
    size = f"--window-size={args.width},{args.height}"
    flags = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
    )
    for flag in (*flags, size, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        driver.get(Path(args.page).resolve().as_uri())
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if driver.execute_script("return document.body && document.body.getAttribute('data-ready')"):
                break
            time.sleep(0.2)
        else:
            raise SystemExit("the page did not finish rendering in 180 s")
        if args.methods:
            from selenium.webdriver.common.by import By

            driver.find_element(By.ID, "methods-none").click()
            for name in args.methods.split(","):
                ok = driver.execute_script(
                    "for (const l of document.querySelectorAll('#method-list label.method')) {"
                    " if (l.title.startsWith(arguments[0] + ' (')) { l.querySelector('input').click(); return true; } }"
                    " return false;",
                    name,
                )
                if not ok:
                    raise SystemExit(f"no method {name!r} in the page's picker")
            time.sleep(1.0)
        if pair:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select

            for sel_id, spec in zip(("pair-a", "pair-b"), pair):
                select = Select(driver.find_element(By.ID, sel_id))
                options = [o.text for o in select.options]
                if spec not in options:
                    raise SystemExit(f"{spec!r} is not in the paired view's choices ({', '.join(options[:8])}, …)")
                select.select_by_visible_text(spec)
            time.sleep(0.5)
        if args.scroll_to:
            found = driver.execute_script(
                "const t = arguments[0]; for (const h of document.querySelectorAll('h1,h2,h3,h4')) {"
                " if (h.textContent.includes(t)) { h.scrollIntoView(); window.scrollBy(0, -80); return true; } }"
                " return false;",
                args.scroll_to,
            )
            if not found:
                raise SystemExit(f"no heading contains {args.scroll_to!r}")
            time.sleep(0.5)
        driver.save_screenshot(args.out)
        print(args.out)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
