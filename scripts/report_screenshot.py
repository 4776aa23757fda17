"""Screenshot an interactive report (`tokensieve report --format html`) in Debian's headless Chromium, as the
browser test drives it (selenium with the system chromedriver; nothing is downloaded).

Usage: .venv/bin/python scripts/report_screenshot.py REPORT.html OUT.png [--width 1500] [--height 1100]
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
    args = ap.parse_args()
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
        if args.scroll_to:
            found = driver.execute_script(
                "const t = arguments[0]; for (const h of document.querySelectorAll('h1,h2,h3,h4')) {"
                " if (h.textContent.includes(t)) { h.scrollIntoView(); return true; } } return false;",
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
