"""`darp serve` end to end on Ray Serve, driven by a real headless Chromium.

A tiny phase-1 network and DARP run are trained on part of Chair-V2 (from ../shared/data); the page
is served by Ray Serve on a free port; Chromium (Debian's chromium + chromium-driver, driven by
selenium with the system chromedriver, nothing downloaded) draws a held-out (val) Chair-V2 sketch
stroke by stroke with real mouse events, and the target rank the page shows after every stroke must
be the one the serving code computes for the same strokes, whose episode at `darp evaluate`'s
completion levels gives exactly `darp evaluate`'s ranks for that sketch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from sketch_env.data import load_dataset, save_dataset, select_split
from sketch_env.render import N_LEVELS, level_cut_points
from tests.rl_fixtures import free_port, make_serve_runs
from policies.running.trained import live_retrieval
from policies.running.live_app import strokes_to_points
from policies.running.live_service import ServeConfig, start, stop_ray

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chairv2"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
N_PHOTOS = 40  # Chair-V2 photos kept (with all their sketches): a few seconds of training
SIDE = 512  # the page's canvas, in pixels


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, data dir, DARP run dir) of a Ray Serve deployment over a Chair-V2 subset."""
    if not (SHARED / "ChairV2_Coordinate_train").is_file():
        pytest.skip(f"Chair-V2 is not at {SHARED}")
    import ray

    from tune_runs.cli import main

    root = tmp_path_factory.mktemp("browser")
    assert main(["data", "import-qmul", "--coords", str(SHARED / "ChairV2_Coordinate_train"),
                 "--photos", str(SHARED / "photo"), "--out", str(root / "chairv2")]) == 0
    full = load_dataset(root / "chairv2")
    keep = set(sorted(full.photos.photo_id)[:N_PHOTOS])
    data = save_dataset(
        root / "chair",
        full.sketches.subset(np.array([p in keep for p in full.sketches.photo_id])),
        full.photos.subset(np.array([p in keep for p in full.photos.photo_id])),
        name="chairv2-subset", source="test_browser",
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        darp = make_serve_runs(root, data)
        url = start(ServeConfig(data=data, run=darp, port=free_port()))
        yield url, data, darp
    finally:
        stop_ray()


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_http_refuses_bad_requests_and_keeps_serving(served):
    url, _, _ = served
    with urllib.request.urlopen(url, timeout=60) as page:
        assert b'<canvas id="canvas"' in page.read()
    with urllib.request.urlopen(url + "api/gallery", timeout=60) as response:
        photo = json.loads(response.read())["photo_ids"][0]
    status, answer = post(url + "api/query", b'{"strokes": [[[1, NaN]]], "canvas": [512, 512]}')
    assert status == 400 and "NaN" in answer["error"]
    status, answer = post(url + "api/query", json.dumps({"strokes": [[[1, 1]]] * 5000, "canvas": [512, 512]}).encode())
    assert status == 413 and "strokes" in answer["error"]
    status, answer = post(url + "api/query", b"x" * ((1 << 20) + 1))
    assert status == 413
    good = {"strokes": [[[100, 100], [300, 320]], [[300, 100], [120, 330]]], "canvas": [512, 512], "target": photo}
    status, answer = post(url + "api/query", json.dumps(good).encode())
    assert status == 200 and answer["n_strokes"] == 2 and 1 <= answer["target_rank"] <= answer["gallery_size"]


@pytest.fixture(scope="module")
def val_split(served):
    _, data, _ = served
    return select_split(load_dataset(data), "val")


@pytest.fixture(scope="module")
def retriever(served, val_split):
    _, _, darp = served
    return live_retrieval(darp, val_split)


def sketch_with_strokes(split, low: int, high: int) -> int:
    """Index of the first sketch of `split` with low..high strokes."""
    n_strokes = np.add.reduceat(split.sketches.points[:, 2], split.sketches.offsets[:-1])
    return int(np.flatnonzero((n_strokes >= low) & (n_strokes <= high))[0])


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1360,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def mouse(driver, kind: str, x: float, y: float) -> None:
    """One real mouse event at viewport point (x, y), through the DevTools protocol."""
    pressed = {"button": "left", "buttons": 1, "clickCount": 1} if kind != "mouseMoved" else {"button": "left", "buttons": 1}
    driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, **pressed})


def test_drawing_a_chair_v2_sketch_shows_the_served_ranks(served, val_split, retriever, browser, tmp_path):
    url, data, darp = served
    split = val_split
    i = sketch_with_strokes(split, 5, 12)
    points, photo = split.sketches.sketch(i), split.sketches.photo_id[i]

    browser.get(url)
    wait_for(browser, "return document.body.dataset.ready === '1'")
    browser.find_element("css selector", f'#gallery img[alt="{photo}"]').click()
    wait_for(browser, f"return window.darpLive.target === {json.dumps(photo)}")
    left, top = browser.execute_script("const r = document.getElementById('canvas').getBoundingClientRect(); return [r.left, r.top];")

    shown, sure = [], []
    ends = np.flatnonzero(points[:, 2] == 1) + 1
    for k, stroke in enumerate(np.split(points, ends[:-1]), start=1):
        xy = stroke[:, :2].astype(np.float64) * SIDE + [left, top]
        mouse(browser, "mousePressed", *xy[0])
        for x, y in xy[1:]:
            mouse(browser, "mouseMoved", x, y)
        mouse(browser, "mouseReleased", *xy[-1])
        wait_for(browser, f"return document.getElementById('stroke-count').textContent === '{k}' "
                          "&& document.body.dataset.pending === '0'")
        shown.append(int(browser.find_element("id", "target-rank").text))
        box = browser.find_element("id", "confidence")
        sure.append((float(box.get_attribute("data-top1")), box.text, box.get_attribute("data-state")))

    # the page drew exactly the data-set sketch (repeated points give no pointer events)
    sent = browser.execute_script("return window.darpLive.strokes")
    assert len(sent) == len(ends)
    for page_stroke, stroke in zip(sent, np.split(points, ends[:-1])):
        xy = stroke[:, :2].astype(np.float64) * SIDE
        keep = np.append(True, np.any(np.diff(xy, axis=0) != 0, axis=1))
        np.testing.assert_allclose(page_stroke, xy[keep], atol=1e-3)

    # the ranks shown after each stroke are the serving code's for the strokes the page sent
    served_answer = retriever.query(strokes_to_points(sent, [SIDE, SIDE], 1000, 100_000), photo)
    expected = served_answer["target_ranks"]
    assert shown == expected
    plotted = browser.execute_script("return [...document.querySelectorAll('#plot circle')].map(c => +c.dataset.rank)")
    assert plotted == expected

    # so is the calibrated confidence after each stroke, said in words, and the stroke where it said "stop"
    np.testing.assert_allclose([p for p, _, _ in sure], served_answer["confidences"], atol=1e-4)
    for p, text, state in sure:
        percent = math.floor(100 * p + 0.5)  # as the page's Math.round
        assert text.startswith(f"{percent}% sure")
        assert (state == "stop") == (p >= retriever.stop_at) == text.startswith(f"{percent}% sure: you can stop")
        assert state in ("stop", "pick", "draw")
    plotted_confidence = browser.execute_script("return document.querySelector('#plot polyline.confidence').dataset.confidences")
    np.testing.assert_allclose([float(v) for v in plotted_confidence.split(",")], served_answer["confidences"], atol=1e-4)
    stop = browser.execute_script("const l = document.querySelector('#plot line.stop'); return l ? +l.dataset.stroke : null")
    assert stop == served_answer["stop_stroke"]
    assert browser.find_element("id", "level").text == f"{min(len(ends), N_LEVELS)}/17"
    assert browser.execute_script(
        "const imgs = [...document.querySelectorAll('#top10 img')];"
        "return imgs.length === Math.min(10, darpLive.photoIds.length) && imgs.every(i => i.complete && i.naturalWidth > 0)"
    )

    # the top-10 row fits the 1360 px wide window: no photo cut off, no horizontal scrollbar, even
    # with Chair-V2's longest sketch ids in the replay list (e.g. /train/CHAKUB005PNK-UK_v1_CandyPink...)
    browser.execute_script(
        "const o = document.createElement('option'); o.value = 'long';"
        "o.textContent = '/train/CHAKUB005PNK-UK_v1_CandyPinkWithRainbowButtons_3 (31 strokes)';"
        "document.getElementById('sketch-select').append(o);"
    )
    overflow = browser.execute_script(
        "const width = document.documentElement.clientWidth;"
        "return {width, scroll: document.documentElement.scrollWidth,"
        " right: Math.max(...[...document.querySelectorAll('#top10 img')].map(i => i.getBoundingClientRect().right))};"
    )
    assert browser.execute_script("return window.innerWidth") == 1360
    assert overflow["scroll"] <= overflow["width"] and overflow["right"] <= overflow["width"], overflow
    # the page shows the latency it measured end to end, next to the server's own figure
    assert re.fullmatch(r"\d+ ms end to end \(\d+(\.\d)? ms in the server\)", browser.find_element("id", "latency").text)

    # and the same code path, cut at darp evaluate's completion levels, gives darp evaluate's ranks
    from policies.running.trained import evaluate_policy_run

    evaluated = evaluate_policy_run(darp, data, "val")
    levels = retriever.policy.episode(points, level_cut_points(len(points)))
    target = retriever.gallery.index_of([photo]).expand(N_LEVELS)
    live = retriever.gallery.rank(torch.stack([lv.query for lv in levels]), target).numpy()
    np.testing.assert_array_equal(live, evaluated["ranks"][i])

    screenshot = tmp_path / "serve_screenshot.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DARP_SERVE_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["DARP_SERVE_SCREENSHOT"])


def test_replay_plays_a_data_set_sketch_stroke_by_stroke(served, val_split, retriever, browser):
    from selenium.webdriver.support.ui import Select

    url, _, _ = served
    i = sketch_with_strokes(val_split, 3, 6)
    points, photo = val_split.sketches.sketch(i), val_split.sketches.photo_id[i]
    n_strokes = int(points[:, 2].sum())
    browser.get(url)
    wait_for(browser, "return document.body.dataset.ready === '1'")
    Select(browser.find_element("id", "sketch-select")).select_by_value(val_split.sketches.sketch_id[i])
    browser.find_element("id", "replay").click()
    wait_for(browser, f"return document.getElementById('stroke-count').textContent === '{n_strokes}' "
                      "&& document.body.dataset.pending === '0' && window.darpLive.replayTimer === null")
    assert browser.execute_script("return window.darpLive.target") == photo
    plotted = browser.execute_script("return [...document.querySelectorAll('#plot circle')].map(c => +c.dataset.rank)")
    assert plotted == retriever.query(points, photo)["target_ranks"]

    browser.find_element("id", "clear").click()
    assert browser.find_element("id", "stroke-count").text == "0"
    assert browser.execute_script("return window.darpLive.strokes.length + document.querySelectorAll('#plot circle').length") == 0
    browser.find_element("id", "find").click()
    assert browser.execute_script("return window.darpLive.photoIds.includes(window.darpLive.target)")
    assert browser.find_element("id", "target-caption").text == browser.execute_script("return window.darpLive.target")


def test_the_page_says_when_to_stop_in_plain_words_and_marks_the_stroke(served, browser):
    url, _, _ = served
    browser.get(url)
    wait_for(browser, "return document.body.dataset.ready === '1'")
    shown = browser.execute_script("""
        const answer = (confidences, top5, stop) => ({
          n_strokes: confidences.length, level: confidences.length - 1, target_rank: null, target_ranks: null,
          gallery_size: 40, end_to_end_ms: 5, latency_ms: 1, top10: [], glimpses: [], glimpse_sides: [],
          confidence: {top1: confidences[confidences.length - 1], top5}, confidences, stop_stroke: stop, stop_at: 0.9});
        const read = () => {
          const box = document.getElementById('confidence'), stop = document.querySelector('#plot line.stop');
          return [box.textContent, box.dataset.state, stop ? +stop.dataset.stroke : null,
                  [...document.querySelectorAll('#plot text.stop-label')].map(t => t.textContent)];
        };
        const out = [];
        for (const [c, top5, stop] of [[[0.2, 0.5, 0.934], 0.99, 3], [[0.2, 0.41], 0.75, null],
                                        [[0.3, 0.95, 0.62], 0.75, 2], [[0.2, 0.41], 0.93, null]]) {
          window.darpLive.last = answer(c, top5, stop);
          showAnswer(window.darpLive.last);
          out.push(read());
        }
        return out;""")
    assert shown[0] == ["93% sure: you can stop", "stop", 3, ["stop"]]
    assert shown[1] == ["41% sure of the first photo (75% that it is in the top 5): keep drawing", "draw", None, []]
    assert shown[2][0].endswith("keep drawing \u00b7 could stop at stroke 2") and shown[2][1:] == ["draw", 2, ["stop"]]
    assert shown[3] == ["41% sure of the first photo, 93% that it is in the top 5: you could stop and pick it there",
                        "pick", None, []]
    browser.find_element("id", "clear").click()
    assert browser.find_element("id", "confidence").get_attribute("data-state") == "none"
