"""The demo in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's chromedriver.

It loads the page, runs a comparison, checks that the images and their labels appear, shows that steps 0, a
negative scale and an unknown model path each put a message in the page while the server keeps serving, and runs
the testbed tab. Screenshots go to ``$GUIDEKIT_TEST_ARTIFACTS`` (default ``test-artifacts/``).

Without Chromium the test is skipped, unless ``GUIDEKIT_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs
it) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("GUIDEKIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
# The flags of a closed network: without the background-networking ones Chromium keeps trying Google's hosts.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,2000")
TIMEOUT = 120


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("GUIDEKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="guidekit-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: object, condition: object, timeout: float = TIMEOUT) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _set(driver: object, elem_id: str, value: str) -> None:
    """Type ``value`` into the input of the component ``elem_id``, as a user would, and leave the field."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(value, Keys.TAB)


def _captions(driver: object) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "compare-gallery").text


def _toast_with(driver: object, text: str) -> bool:
    from selenium.webdriver.common.by import By

    toasts = driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body'], .toast-body")
    return any(text in t.text for t in toasts)


def test_page_compares_methods_and_shows_errors_while_serving(demo_url: str, browser: object) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(demo_url)
    _wait(driver, lambda d: d.find_elements(By.ID, "compare-button"), 60)
    assert "guidekit" in driver.title
    driver.find_element(By.ID, "compare-button").click()
    _wait(driver, lambda d: _captions(d).count("model calls") == 3)
    images = driver.find_elements(By.CSS_SELECTOR, "#compare-gallery img")
    _wait(driver, lambda d: all(d.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images))
    assert len(images) == 3
    text = _captions(driver)
    for method in ("cfg(scale=3)", "apg(scale=3, eta=0)", "pcg(gamma=5)"):
        assert method in text
    assert "20 model calls" in text and "39 model calls" in text and "saturation" in text
    table = driver.find_element(By.ID, "compare-table").text
    assert "PCGScheduler" in table and "DDIMScheduler" in table and "pcg(gamma=5.0, corrector_steps=1" in table
    driver.save_screenshot(str(ARTIFACTS / "demo_compare.png"))

    for elem_id, bad, good, message in [
        ("steps", "0", "20", "steps=0 is not accepted"),
        ("method-1", "cfg(scale=-1)", "cfg(scale=3)", "scale=-1"),
        ("model", "/no/such/model", "default", "model='/no/such/model' could not be loaded"),
    ]:
        _set(driver, elem_id, bad)
        driver.find_element(By.ID, "compare-button").click()
        _wait(driver, lambda d, m=message: _toast_with(d, m), 60)
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(ARTIFACTS / f"demo_error_{elem_id}.png"))
        _set(driver, elem_id, good)

    _set(driver, "steps", "3")  # the server still serves: a new comparison replaces the old one
    driver.find_element(By.ID, "compare-button").click()
    _wait(driver, lambda d: "3 model calls" in _captions(d) and "5 model calls" in _captions(d))


def test_testbed_tab_draws_its_plot(demo_url: str, browser: object) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(demo_url)
    _wait(driver, lambda d: d.find_elements(By.XPATH, "//button[@role='tab' and contains(., 'Gaussian testbed')]"), 60)
    driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Gaussian testbed')]").click()
    _set(driver, "testbed-samples", "5000")
    driver.find_element(By.ID, "testbed-button").click()
    _wait(driver, lambda d: d.execute_script(
        "const i = document.querySelector('#testbed-plot img'); return i && i.naturalWidth > 0;"))
    table = driver.find_element(By.ID, "testbed-table").text
    assert "PCG" in table and "DDIM" in table and "DDPM" in table and "Autoguidance" in table
    assert "exact autoguidance ODE" in table
    driver.save_screenshot(str(ARTIFACTS / "demo_testbed.png"))
