"""Relevance feedback in headless Chromium: mark results right and wrong on the
results page (stored through fetch(), no reload), then Refine, and the
results change as the marks say."""

from __future__ import annotations

import pytest

from search.models import Feedback
from tests import test_browser
from tests.test_browser import _click_and_wait_for_next_page

browser = test_browser.browser  # the headless Chromium fixture

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture
def colours(live_server, transactional_db, tiny_version, tmp_path):
    _, query = test_browser.indexed_colours(tmp_path, tiny_version)
    tiny_version.activate()
    return {"url": live_server.url, "query": query}


def _hits(browser) -> list[tuple[str, str]]:
    from selenium.webdriver.common.by import By

    return [(hit.get_attribute("data-image-id"), hit.find_element(By.CSS_SELECTOR, ".meta div:nth-child(3)").text)
            for hit in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]


def _mark(browser, image_id: str, verdict: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    hit = browser.find_element(By.CSS_SELECTOR, f'#results .hit[data-image-id="{image_id}"]')
    hit.find_element(By.CSS_SELECTOR, f"button.mark.{verdict}").click()
    status = hit.find_element(By.CSS_SELECTOR, ".mark-status")
    WebDriverWait(browser, 30).until(lambda b: status.text not in ("", "saving…"))
    assert status.text == "saved"
    assert "on" in hit.find_element(By.CSS_SELECTOR, f"button.mark.{verdict}").get_attribute("class")


def test_marks_are_saved_without_a_reload_and_refine_changes_the_results(browser, colours):
    from selenium.webdriver.common.by import By

    browser.get(colours["url"] + "/")
    browser.find_element(By.ID, "image").send_keys(str(colours["query"]))
    _click_and_wait_for_next_page(browser, browser.find_element(By.ID, "submit"))
    before = _hits(browser)
    assert len(before) == 10
    assert browser.find_element(By.ID, "refine").get_attribute("disabled") is not None
    browser.execute_script("window.__samePage = true;")
    reds = [pk for pk, label in before if label.startswith("red")]
    blues = [pk for pk, label in before if label.startswith("blue")]
    assert reds and blues
    _mark(browser, reds[0], "wrong")
    _mark(browser, blues[-1], "right")
    assert browser.execute_script("return window.__samePage === true")  # no reload
    marks = set(Feedback.objects.values_list("result_id", "verdict", "query_sha256"))
    assert {(m[0], m[1]) for m in marks} == {(int(reds[0]), "wrong"), (int(blues[-1]), "right")}
    assert all(len(m[2]) == 64 for m in marks)

    _click_and_wait_for_next_page(browser, browser.find_element(By.ID, "refine"))
    assert "/search/refine?" in browser.current_url
    assert f"negative={reds[0]}" in browser.current_url and f"positive={blues[-1]}" in browser.current_url
    after = _hits(browser)
    assert len(after) == 10 and after != before
    assert reds[0] not in [pk for pk, _ in after]  # the wrong one is left out
    assert "refined with 1 right and 1 wrong" in browser.find_element(By.ID, "refined").text
    # The right mark is still shown (and kept for the next Refine).
    right = browser.find_elements(By.CSS_SELECTOR, f'#results .hit[data-image-id="{blues[-1]}"] button.mark.right')
    assert right and "on" in right[0].get_attribute("class")
