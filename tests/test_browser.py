"""End to end in headless Chromium (Debian's chromium + chromium-driver via
Selenium): upload a photo and see 10 results, "more like this", a staff member
starts an index build in the admin and watches the job's progress bar reach
done, a bad upload shows its error. Screenshots of failures go to
test-artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from search.ingest import import_folder
from search.models import Dataset, Image, Job
from tests.helpers import image_bytes, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(request):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / f"{request.node.name}.png"))
    driver.quit()


def indexed_colours(tmp_path, version) -> tuple[Dataset, Path]:
    """A dataset "colours" of 12 images (6 red, 6 blue, labelled by folder)
    indexed with `version`, and a reddish query file."""
    from search.indexing import build_index

    folder = tmp_path / "photos"
    for label in ("red", "blue"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            color = (240, 20, 20) if label == "red" else (20, 20, 240)
            (folder / label / f"{i}.png").write_bytes(image_bytes(color, size=(48, 48), pattern=100 * i + len(label)))
    dataset = Dataset.objects.create(name="colours")
    import_folder(folder, dataset, labels_from_folders=True)
    build_index(dataset, version)
    query = tmp_path / "query.png"
    query.write_bytes(image_bytes((230, 30, 30), size=(64, 64), pattern=7))
    return dataset, query


@pytest.fixture
def site(live_worker, live_server, tiny_version, tmp_path):
    """A live server over an indexed dataset of 12 images (the tiny network)."""
    dataset, query = indexed_colours(tmp_path, tiny_version)
    bad = tmp_path / "not-a-photo.jpg"
    bad.write_text("this is text, not a JPEG")
    return {"url": live_server.url, "query": query, "bad": bad, "dataset": dataset}


def _upload(browser, site, path):
    from selenium.webdriver.common.by import By

    browser.get(site["url"] + "/")
    browser.find_element(By.ID, "image").send_keys(str(path))
    _click_and_wait_for_next_page(browser, browser.find_element(By.ID, "submit"))


def _click_and_wait_for_next_page(browser, element):
    """Click and wait until the next page has replaced this one: a click that
    submits a form or follows a link may return before the new page loads, and
    reading the old page then found 0 hits on a loaded CPU (the failure
    screenshot showed the 10 hits once the page had arrived).

    The old page is marked with a window property rather than held as an element:
    chromedriver's staleness check on an element of a page being replaced failed
    in CI with "Node with given id does not belong to the document", a
    WebDriverException that is not StaleElementReferenceException. A script
    called while the page is swapped may raise too; the wait retries it."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("window.__cbirOldPage = true;")
    element.click()

    def next_page_loaded(b):
        return b.execute_script("return window.__cbirOldPage !== true && document.readyState === 'complete'")

    WebDriverWait(browser, 60, ignored_exceptions=(WebDriverException,)).until(next_page_loaded)


def test_upload_shows_ten_results_with_scores_and_more_like_this(browser, site):
    from selenium.webdriver.common.by import By

    _upload(browser, site, site["query"])
    hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    assert len(hits) == 10
    scores = [float(h.find_element(By.CLASS_NAME, "score").text) for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert all(h.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") != "0" for h in hits)
    first_id = hits[0].get_attribute("data-image-id")
    _click_and_wait_for_next_page(browser, hits[0].find_element(By.LINK_TEXT, "More like this →"))
    assert f"More like image #{first_id}" in browser.page_source
    again = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    assert len(again) == 10 and first_id not in [h.get_attribute("data-image-id") for h in again]


def test_a_bad_upload_shows_its_error(browser, site, settings):
    from selenium.webdriver.common.by import By

    before = Image.objects.count()
    _upload(browser, site, site["bad"])
    error = browser.find_element(By.ID, "error")
    assert "not a supported image" in error.text
    assert Image.objects.count() == before


def test_staff_starts_an_index_build_and_watches_the_progress_bar_reach_done(browser, site, admin_user, tiny_version):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    fresh = Dataset.objects.create(name="fresh")
    folder = site["query"].parent / "fresh"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.png").write_bytes(image_bytes(size=(40, 40), pattern=3000 + i))
    import_folder(folder, fresh)

    browser.get(site["url"] + "/admin/login/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys("password")
    _click_and_wait_for_next_page(browser, browser.find_element(By.CSS_SELECTOR, "input[type=submit]"))
    browser.get(site["url"] + "/admin/search/dataset/")
    browser.find_element(By.CSS_SELECTOR, f"input[name=_selected_action][value='{fresh.pk}']").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("build_index")
    _click_and_wait_for_next_page(browser, browser.find_element(By.NAME, "index"))
    Select(browser.find_element(By.NAME, "model")).select_by_value(f"version:{tiny_version.pk}")
    browser.find_element(By.NAME, "apply").click()
    # Redirected to the job page, whose bar fills without reloading.
    wait_for(lambda: "/jobs/" in browser.current_url, timeout=30, message="the redirect to the job page")
    job = Job.objects.get(dataset=fresh)
    assert browser.current_url.endswith(f"/jobs/{job.pk}/")
    wait_for(lambda: browser.find_element(By.ID, "status").text.lower() == "succeeded", timeout=90,
             message="the page to show the job succeeded")
    assert browser.find_element(By.ID, "bar").get_attribute("style").replace(" ", "") == "width:100%;"
    assert browser.find_element(By.ID, "counts").text == "8 / 8"
