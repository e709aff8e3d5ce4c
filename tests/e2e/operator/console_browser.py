"""The console in a real browser (Debian's Chromium, driven by selenium),
run by tests/e2e/operator/browser.rs against a real mesh.

The Rust side starts the mesh and the console and owns the gRPC calls; this
script owns the browser. They talk over stdin/stdout: the script prints
`REGISTERED <tenant>` once the tenant's onboarding has finished on the page,
then waits for `SENT <n> <r>` (the Rust side made n requests as the tenant,
r more were refused by its limits, and waited for them all to be metered),
and prints `BROWSER-OK` at the end.
Screenshots of each page go to $SCREENSHOTS.
"""

import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

URL = os.environ["CONSOLE_URL"]
TENANT = os.environ["TENANT"]
SHOTS = os.environ["SCREENSHOTS"]


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400",
                 "--user-data-dir=" + os.environ["PROFILE"]):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shot(driver, name):
    driver.save_screenshot(os.path.join(SHOTS, name + ".png"))


def wait(driver, what, check, timeout=30):
    try:
        # A page being replaced (a form sent, a redirect) leaves stale elements: look again.
        ignored = (NoSuchElementException, StaleElementReferenceException)
        return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(lambda d: check(d))
    except Exception:
        shown = driver.find_element(By.TAG_NAME, "main").text[:2000] if driver.find_elements(By.TAG_NAME, "main") else ""
        raise AssertionError("timed out waiting for " + what + " on " + driver.current_url + "; the page shows:\n" + shown)


def follow_live(driver, what):
    """Follows the workflow page just opened to its end: its steps turn DONE
    without the page being reloaded. Whether it was seen RUNNING (a fast
    workflow may have ended before its page loaded)."""
    driver.execute_script("window.tmMarker = 42;")
    first = driver.find_element(By.ID, "wf-status").text
    wait(driver, what + " to succeed", lambda d: d.find_element(By.ID, "wf-status").text == "SUCCEEDED")
    states = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "table.steps td.state")]
    assert states and all(s == "DONE" for s in states), states
    assert driver.execute_script("return window.tmMarker") == 42, "the page was reloaded"
    return first == "RUNNING"


def sign_in(driver, tenant, email, password):
    driver.get(URL + "/login")
    driver.find_element(By.ID, "tenant").clear()
    driver.find_element(By.ID, "tenant").send_keys(tenant)
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()


def no_console_errors(driver, page):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, "errors in the browser's console on " + page + ": " + repr(errors)


def labelled(driver):
    """Every form control has a label."""
    for control in driver.find_elements(By.CSS_SELECTOR, "input:not([type=hidden]), select"):
        cid = control.get_attribute("id")
        wrapped = control.find_elements(By.XPATH, "ancestor::label")
        assert wrapped or (cid and driver.find_elements(By.CSS_SELECTOR, "label[for='" + cid + "']")), \
            "a control without a label: " + control.get_attribute("outerHTML")


def main():
    driver = browser()
    try:
        # The operator signs in and sees the fleet.
        sign_in(driver, "platform", os.environ["ADMIN_EMAIL"], os.environ["ADMIN_PASSWORD"])
        wait(driver, "the fleet", lambda d: d.find_element(By.TAG_NAME, "h1").text == "Fleet")
        assert "platform" in driver.find_element(By.ID, "fleet").text
        no_console_errors(driver, "the fleet")

        # Registers a tenant with the form, by keyboard as much as by mouse.
        driver.get(URL + "/tenants/new")
        labelled(driver)
        driver.find_element(By.ID, "tenant_id").send_keys(TENANT)
        driver.find_element(By.ID, "name").send_keys("Browser Co")
        driver.find_element(By.ID, "admin_email").send_keys("admin@browser.example")
        driver.find_element(By.ID, "admin_password").send_keys(os.environ["TENANT_PASSWORD"])
        driver.find_element(By.NAME, "confirm").click()
        shot(driver, "register")
        driver.find_element(By.CSS_SELECTOR, "form[action='/tenants'] button").click()

        # Its onboarding, live: the page is not reloaded while its steps
        # finish (the test slows one step: it fails three times first).
        wait(driver, "the workflow page", lambda d: "/workflows/" + TENANT + "/onboard" in d.current_url)
        seen_live = [follow_live(driver, "the onboarding")]
        shot(driver, "workflow")
        no_console_errors(driver, "the workflow")
        print("REGISTERED " + TENANT, flush=True)

        line = sys.stdin.readline().split()
        assert line and line[0] == "SENT", line
        sent, refused = int(line[1]), int(line[2])

        # The usage table and the plot show the n requests.
        driver.get(URL + "/tenants/" + TENANT + "?hours=1")
        table = driver.find_element(By.ID, "usage-requests")
        assert table.get_attribute("data-total") == str(sent), table.get_attribute("data-total")
        values = [int(c.get_attribute("data-v")) for c in driver.find_elements(By.CSS_SELECTOR, "#plot-requests circle")]
        assert sum(values) == sent and values, values
        cells = driver.find_elements(By.CSS_SELECTOR, "#usage-requests tbody td.num")
        assert sum(int(c.get_attribute("textContent")) for c in cells) == sent
        # The refusals: their plot, its numbers, and the table by limit.
        assert driver.find_element(By.ID, "usage-refused").get_attribute("data-total") == str(refused)
        values = [int(c.get_attribute("data-v")) for c in driver.find_elements(By.CSS_SELECTOR, "#plot-refused circle")]
        assert sum(values) == refused, values
        assert "requests_per_second " + str(refused) in driver.find_element(By.ID, "refusals").text
        assert driver.find_element(By.ID, "p99").text.startswith("<= "), driver.find_element(By.ID, "p99").text
        assert driver.find_element(By.ID, "cost-total").text
        labelled(driver)
        shot(driver, "tenant")
        no_console_errors(driver, "the tenant")

        # Changes its tier, and watches that workflow finish too.
        Select(driver.find_element(By.ID, "tier")).select_by_visible_text("premium")
        tier_form = driver.find_element(By.CSS_SELECTOR, "form[action$='/tier']")
        tier_form.find_element(By.NAME, "confirm").click()
        tier_form.find_element(By.TAG_NAME, "button").click()
        wait(driver, "the tier change page", lambda d: "/change-tier/" in d.current_url)
        seen_live.append(follow_live(driver, "the tier change"))
        assert any(seen_live), "both workflows had ended before their pages loaded: nothing was seen live"
        driver.get(URL + "/tenants/" + TENANT)
        assert "premium (bridge)" in driver.find_element(By.CSS_SELECTOR, "dl.facts").text

        # The fleet again, for the README's screenshot.
        driver.get(URL + "/?hours=1")
        assert TENANT in driver.find_element(By.ID, "fleet").text
        shot(driver, "fleet")
        no_console_errors(driver, "the fleet")

        # The tenant's admin: their tenant; another tenant's page is 404, not its data.
        driver.delete_all_cookies()
        sign_in(driver, TENANT, "admin@browser.example", os.environ["TENANT_PASSWORD"])
        wait(driver, "the tenant's own page", lambda d: d.current_url.endswith("/tenants/" + TENANT))
        assert not driver.find_elements(By.CSS_SELECTOR, "form[action$='/offboard']"), "operator's forms shown"
        other = os.environ["OTHER_TENANT"]
        driver.get(URL + "/tenants/" + other)
        assert driver.find_element(By.TAG_NAME, "h1").text == "Not found"
        assert os.environ["OTHER_EMAIL"] not in driver.page_source
        shot(driver, "tenant-admin-404")
        print("BROWSER-OK", flush=True)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
