"""Drives Realm's dashboard in headless Chromium (Selenium + Debian's
chromium-driver): sign in with an admin key, create a tenant and a key in
the UI, use the key with the official `openai` client, see the usage in the
tenant's chart, revoke the key in the UI, and the client's next request is
refused with 401; a viewer's dashboard offers no changes.

Environment: ADMIN_URL (the dashboard), ADMIN_KEY, VIEWER_KEY, API_URL (the
public /v1), CHROMEDRIVER, and SCREENSHOTS (a folder, or empty for none).
Prints one JSON line summarising what it saw.
"""

import json
import os
import sys
import tempfile
import time

import openai
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

ADMIN_URL = os.environ["ADMIN_URL"]
API_URL = os.environ["API_URL"]
SHOTS = os.environ.get("SCREENSHOTS", "")


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tempfile.mkdtemp(prefix='realm-chromium-')}",
    ):
        options.add_argument(arg)
    # No Selenium Manager downloads: the driver is Debian's.
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(service=Service(os.environ["CHROMEDRIVER"]), options=options)
    driver.set_page_load_timeout(60)
    return driver


def wait(driver, condition, timeout=30):
    # Pages re-render as data arrives: an element may go stale under us.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, ignored_exceptions=ignored).until(condition)


def page_ready(driver, name):
    wait(driver, lambda d: d.find_element(By.ID, "page").get_attribute("data-ready") == name)


def shot(driver, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        driver.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def sign_in(driver, key):
    driver.get(ADMIN_URL)
    wait(driver, ec.visibility_of_element_located((By.ID, "key-input")))
    shot(driver, "sign-in") if key == os.environ["ADMIN_KEY"] else None
    driver.find_element(By.ID, "key-input").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    page_ready(driver, "overview")


def check(condition, message):
    if not condition:
        print(message, file=sys.stderr)
        sys.exit(1)


def main():
    summary = {}
    driver = browser()
    try:
        sign_in(driver, os.environ["ADMIN_KEY"])
        # Nothing is loaded from elsewhere: every script and sheet is ours.
        for tag, attr in (("script", "src"), ("link", "href")):
            for node in driver.find_elements(By.TAG_NAME, tag):
                src = node.get_attribute(attr) or ""
                check(src.startswith(ADMIN_URL.split("/admin/")[0]), f"foreign {tag}: {src}")
        cookies = {c["name"]: c for c in driver.get_cookies()}
        session = cookies.get("realm_admin")
        check(session and session["httpOnly"] and session["sameSite"] == "Strict", f"cookie: {session}")

        # A tenant, made in the UI.
        driver.get(ADMIN_URL + "#/tenants")
        page_ready(driver, "tenants")
        driver.find_element(By.ID, "new-tenant-id").send_keys("webshop")
        driver.find_element(By.ID, "new-tenant-models").send_keys("small")
        driver.find_element(By.ID, "new-tenant-quota").send_keys("100000")
        driver.find_element(By.ID, "create-tenant").click()
        page_ready(driver, "tenant")
        # A key, made in the UI and read from the page (shown once).
        driver.find_element(By.ID, "new-key-name").send_keys("shop backend")
        driver.find_element(By.ID, "create-key").click()
        key = wait(driver, ec.visibility_of_element_located((By.ID, "new-key-value"))).text.strip()
        check(key.startswith("rk_webshop_"), f"key: {key!r}")

        # The official client, with that key.
        client = openai.OpenAI(base_url=API_URL, api_key=key, max_retries=0)
        served = 0
        for _ in range(3):
            reply = client.chat.completions.create(
                model="small", messages=[{"role": "user", "content": "hello"}], max_tokens=16
            )
            served += reply.usage.total_tokens
        summary["tokens_served"] = served

        # The usage appears in the tenant's chart (the ledger plus what is
        # not yet written).
        deadline = time.time() + 30
        total = 0
        while time.time() < deadline:
            driver.get(ADMIN_URL + "#/tenant/webshop")
            driver.refresh()
            page_ready(driver, "tenant")
            total = int(float(driver.find_element(By.ID, "usage-chart").get_attribute("data-total")))
            if total >= served:
                break
            time.sleep(0.5)
        check(total == served, f"chart shows {total}, served {served}")
        summary["tokens_in_chart"] = total
        shot(driver, "tenant")

        # Revoke in the UI; the client's next request is refused.
        button = driver.find_element(By.CSS_SELECTOR, "button[data-revoke]")
        button.click()
        wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "td.key-state").text == "revoked")
        try:
            client.chat.completions.create(
                model="small", messages=[{"role": "user", "content": "again"}], max_tokens=4
            )
            summary["after_revoke"] = 200
        except openai.AuthenticationError as e:
            summary["after_revoke"] = e.status_code

        # The other pages, for the operations guide's screenshots.
        for name in ("overview", "tenants", "models", "audit"):
            driver.get(ADMIN_URL + f"#/{name}")
            page_ready(driver, name)
            time.sleep(0.3 if name != "overview" else 2.5)
            shot(driver, name)
        audit = driver.find_element(By.ID, "audit").text
        check("key.revoke" in audit and "tenant.create" in audit, "audit page")

        # A viewer sees the same pages but no way to change anything.
        driver.find_element(By.ID, "sign-out").click()
        wait(driver, ec.visibility_of_element_located((By.ID, "key-input")))
        sign_in(driver, os.environ["VIEWER_KEY"])
        driver.get(ADMIN_URL + "#/tenant/webshop")
        page_ready(driver, "tenant")
        check(not driver.find_elements(By.ID, "create-key"), "a viewer is offered key creation")
        check(not driver.find_elements(By.ID, "save-tenant"), "a viewer is offered edits")
        driver.get(ADMIN_URL + "#/tenants")
        page_ready(driver, "tenants")
        check(not driver.find_elements(By.ID, "create-tenant"), "a viewer is offered tenant creation")
        summary["viewer_read_only"] = True
    finally:
        driver.quit()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
