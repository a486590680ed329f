"""The page at / of ndb serve, in a real headless browser (Debian's chromium, driven by
selenium through the system's chromedriver, so nothing is downloaded): load it, add a fact,
see it listed, ask, see the edited answer beside the unedited one.

``NDB_SCREENSHOT=benchmarks/results/serve_page.png pytest -m real tests/test_serve_page.py``
saves the page as the real model shows it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from test_serve import make_db

from ndb import NeuralDB
from ndb.serve import Server, running

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = f"the browser test needs {CHROMIUM} and {CHROMEDRIVER} (make browser)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def use_page(driver, url: str, fact: dict, question: str, timeout: float) -> dict:
    """Add ``fact`` and ask ``question`` through the page; returns what it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(element_id: str) -> str:
        return driver.find_element(By.ID, element_id).text

    wait = WebDriverWait(driver, timeout)
    driver.get(url)
    wait.until(lambda _: text("status").startswith("model "))
    rows_before = len(driver.find_elements(By.CSS_SELECTOR, "#facts tr"))
    for field_id, name in (("subject", "subject"), ("relation", "prompt"),
                           ("target_new", "target_new")):
        driver.find_element(By.ID, field_id).send_keys(fact[name])
    driver.find_element(By.ID, "add_button").click()
    wait.until(lambda _: " done: " in text("job") or "failed" in text("job"))
    wait.until(lambda _: len(driver.find_elements(By.CSS_SELECTOR, "#facts tr")) > rows_before)
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()
    wait.until(lambda _: driver.find_element(By.ID, "ask").is_enabled()
               and text("edited") not in ("", "..."))
    return {"job": text("job"), "facts": text("facts"), "edited": text("edited"),
            "unedited": text("unedited"), "fired": text("fired"), "status": text("status")}


def test_page_adds_a_fact_and_asks_both_models(browser, tmp_path, llama):
    model, tokenizer = llama
    server = Server(make_db(tmp_path / "db", model, tokenizer), model, tokenizer)
    fact = {"subject": "Toyota", "prompt": "{} is headquartered in", "target_new": "Berlin"}
    with running(server) as url:
        shown = use_page(browser, url, fact, "Toyota is headquartered in", timeout=120)
        expected = httpx.post(f"{url}/v1/compare", timeout=60, json={
            "prompt": "Toyota is headquartered in", "max_tokens": 24, "temperature": 0}).json()
    assert "done: database version 2" in shown["job"]
    assert "Toyota is headquartered in → Berlin" in shown["facts"]
    assert shown["fired"] == "facts that fired: id 2"
    assert shown["edited"].strip() == expected["edited"]["text"].strip()
    assert shown["unedited"].strip() == expected["unedited"]["text"].strip()
    assert "3 facts" in shown["status"]
    assert [f.subject for f in NeuralDB(tmp_path / "db")][-1] == "Toyota"


@pytest.mark.real
def test_page_on_the_default_model(browser, tmp_path, real_model):
    model, tokenizer = real_model
    server = Server(NeuralDB.create(tmp_path / "db", model, tokenizer), model, tokenizer)
    fact = {"subject": "Eiffel Tower", "prompt": "The {} is located in the city of",
            "target_new": "Rome"}
    with running(server) as url:
        shown = use_page(browser, url, fact, "The Eiffel Tower is located in the city of",
                         timeout=300)
        browser.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("NDB_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["NDB_SCREENSHOT"])
    assert "Rome" in shown["edited"] and "Rome" not in shown["unedited"]
    assert shown["fired"] == "facts that fired: id 0"
