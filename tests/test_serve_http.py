"""The Ray Serve app over real HTTP on 127.0.0.1: metrics and JSON logs, generation, batching, fuzzed bad requests,
the web page. One app for the module (a Ray start costs ~10 s)."""

import base64
import io
import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving import serve_on_loopback

pytestmark = pytest.mark.slow
FIELDS = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "seed",
          "num_images", "language"}
LIMITS = {"max_width": 128, "max_height": 128, "max_steps": 8, "max_images": 2, "max_prompt_chars": 120,
          "max_guidance_scale": 20.0}


@pytest.fixture(scope="module")
def served(tiny_serving, tmp_path_factory):
    from serve.app import build_app

    pipe, tr = tiny_serving
    args = {"pipeline": str(pipe), "translators": {"de": str(tr), "multi": str(tr)}, "device": "cpu",
            "dtype": "float32", "limits": LIMITS,
            "defaults": {"num_inference_steps": 2, "guidance_scale": 5.0, "width": 32, "height": 32},
            # a long wait so that 8 concurrent requests surely meet in batches of up to 4
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 2.0}}
    with serve_on_loopback(build_app(args), logs_dir=tmp_path_factory.mktemp("serve-logs")) as served:
        yield served


@pytest.fixture(scope="module")
def url(served):
    return served.url


def png(b64: str):
    from PIL import Image

    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


# ------------------------------------------------------------------------------------------- watching

def scrape(metrics_url: str) -> dict[str, dict[tuple, float]]:
    """The ray_mtn_* samples of a Prometheus endpoint: name -> {(route, language, status): value summed over the
    other labels (replicas)}; labels a metric lacks are None."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = {}
    text = requests.get(metrics_url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_mtn_"):
                key = tuple(sample.labels.get(k) for k in ("route", "language", "status"))
                series = out.setdefault(sample.name, {})
                series[key] = series.get(key, 0.0) + sample.value
    return out


def changed(before: dict, after: dict) -> dict[tuple, float]:
    """(name, *labels) -> after - before, for the series that changed."""
    return {(name, *key): v - before.get(name, {}).get(key, 0.0) for name, series in after.items()
            for key, v in series.items() if v != before.get(name, {}).get(key, 0.0)}


def test_metrics_endpoint_counts_the_requests(served):
    """Ray's metrics export port (8080 under KubeRay, what the chart's PodMonitor scrapes) shows these requests:
    exactly 3 answered on route de and 1 refused before routing, and the Generator's batch and time histograms."""
    before = scrape(served.metrics_url)
    with ThreadPoolExecutor(3) as pool:  # concurrent: one batch (the module's 2 s batch wait)
        codes = list(pool.map(lambda i: requests.post(f"{served.url}/v1/generate", timeout=120, json={
            "prompt": "ein roter Hund läuft am Strand", "seed": i}).status_code, range(3)))
    refused = requests.post(f"{served.url}/v1/generate", json={"prompt": "ein Hund", "num_images": 9}, timeout=30)
    assert codes == [200] * 3 and refused.status_code == 422
    expected = {("ray_mtn_requests_total", "de", "de", "200"): 3, ("ray_mtn_requests_total", "none", "none", "422"): 1,
                ("ray_mtn_queue_wait_seconds_count", "de", None, None): 3,
                ("ray_mtn_generate_seconds_count", "de", None, None): 3,
                ("ray_mtn_batch_requests_sum", None, None, None): 3, ("ray_mtn_batch_images_sum", None, None, None): 3}
    deadline = time.monotonic() + 90  # Ray exports every metrics_report_interval_ms (tests/serving.py: 1 s)
    seen = {}
    while time.monotonic() < deadline:
        seen = {k: v for k, v in changed(before, scrape(served.metrics_url)).items() if k in expected}
        if all(seen.get(k, 0) >= v for k, v in expected.items()):
            break
        time.sleep(0.5)
    assert seen == expected
    batches = changed(before, scrape(served.metrics_url))[("ray_mtn_batch_requests_count", None, None, None)]
    assert 1 <= batches <= 3


def json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a line still being written
        return None


def test_json_logs_carry_the_request_id(served):
    r = requests.post(f"{served.url}/v1/generate", json={"prompt": "ein roter Hund läuft am Strand"}, timeout=120)
    assert r.status_code == 200
    rid = r.headers["X-Request-ID"]
    records: list[dict] = []
    deadline = time.monotonic() + 30
    while not {rec.get("deployment") for rec in records} >= {"mtn_Ingress", "mtn_Generator"} and time.monotonic() < deadline:
        lines = [line for f in served.logs_dir.rglob("*.log") for line in f.read_text().splitlines() if rid in line]
        records = [rec for rec in map(json_or_none, lines) if rec and rec.get("request_id") == rid]
        time.sleep(0.2)
    # the service's own line (serve/api.py) under the id, and the Generator's lines for the same request
    ours = [rec for rec in records if rec["message"].startswith(f"request {rid}: route de")]
    assert len(ours) == 1 and ours[0]["deployment"] == "mtn_Ingress" and ours[0]["levelname"] == "INFO", records
    assert any(rec.get("deployment") == "mtn_Generator" for rec in records), records


def test_generate_returns_png_and_route(url, tiny_serving):
    r = requests.post(f"{url}/v1/generate", json={"prompt": "ein roter Hund läuft am Strand", "seed": 1,
                                                  "num_images": 2}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [png(b).size for b in body["images"]] == [(32, 32), (32, 32)]
    assert body["route"]["route"] == "de" and body["route"]["language"] == "de" and body["seed"] == 1
    assert {"route_ms", "encode_ms", "generate_ms", "total_ms"} <= set(body["timings"])
    en = requests.post(f"{url}/v1/generate", json={"prompt": "A photo of an astronaut riding a horse"}, timeout=120)
    assert en.json()["route"]["route"] == "native" and str(tiny_serving[1]) not in r.text + en.text


def test_languages_health_openapi_and_page(url):
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    langs = requests.get(f"{url}/v1/languages", timeout=10).json()
    assert langs["routes"] == {"de": "de", "en": "native"} and langs["hybrid_route"] == "multi"
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert "/v1/generate" in spec["paths"] and "GenerateRequest" in spec["components"]["schemas"]
    page = requests.get(f"{url}/", timeout=10)
    assert page.headers["content-type"].startswith("text/html") and 'id="generate"' in page.text


def test_concurrent_requests_are_batched_and_match_sequential(url):
    bodies = [{"prompt": p, "seed": i} for i, p in enumerate(["ein Hund am Strand", "un chien sur la plage"] * 4)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: requests.post(f"{url}/v1/generate", json=b, timeout=300).json(), bodies))
    assert max(t["batch"]["requests"] for t in together) > 1  # @serve.batch merged requests
    alone = requests.post(f"{url}/v1/generate", json=bodies[5], timeout=120).json()
    # same seed and prompt -> the same image, whatever shared its batch
    a, b = png(together[5]["images"][0]), png(alone["images"][0])
    assert max(abs(x - y) for p, q in zip(a.getdata(), b.getdata(), strict=True) for x, y in zip(p, q, strict=True)) <= 1


# ------------------------------------------------------------------------------------------- fuzzing

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=6)
NOT_INT = JSON.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, int)))
NOT_NUMBER = JSON.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))))
NOT_STR = JSON.filter(lambda v: not isinstance(v, str))
WRONG_TYPE = st.one_of(
    st.tuples(st.sampled_from(["prompt", "negative_prompt"]), NOT_STR),
    st.tuples(st.sampled_from(["num_inference_steps", "width", "height", "seed", "num_images"]), NOT_INT),
    st.tuples(st.just("guidance_scale"), NOT_NUMBER),
    st.tuples(st.just("language"), JSON.filter(lambda v: v is not None and not (isinstance(v, str) and v == "auto"))),
)
OUT_OF_RANGE = st.one_of(
    st.tuples(st.sampled_from(["width", "height"]),
              st.integers().filter(lambda v: v < 8 or v % 8 or v > 128)),
    st.tuples(st.just("num_inference_steps"), st.integers().filter(lambda v: v < 1 or v > 8)),
    st.tuples(st.just("num_images"), st.integers().filter(lambda v: v < 1 or v > 2)),
    st.tuples(st.just("seed"), st.integers().filter(lambda v: v < 0 or v > 2**63 - 1)),
    st.tuples(st.just("guidance_scale"), st.floats().filter(lambda v: not 0 <= v <= 20)),
    st.tuples(st.just("prompt"), st.text(" \t\n", max_size=5) | st.text(min_size=121, max_size=300)),
    st.tuples(st.just("language"), st.text(max_size=6).filter(lambda v: v != "auto" and not (
        len(v) == 2 and v.isascii() and v.isalpha() and v.islower()))),
)
UNKNOWN_FIELD = st.tuples(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS), JSON)
BODIES = st.one_of(
    st.tuples(st.just("field"), st.one_of(WRONG_TYPE, OUT_OF_RANGE, UNKNOWN_FIELD)).map(
        lambda t: json.dumps({"prompt": "ein Hund", "num_inference_steps": 1, t[1][0]: t[1][1]}).encode()),
    st.tuples(st.just("missing"), st.dictionaries(st.sampled_from(sorted(FIELDS - {"prompt"})), JSON, max_size=3)).map(
        lambda t: json.dumps(t[1]).encode()),
    JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64).filter(lambda b: not b.strip().startswith(b"{")),
)


def test_fuzzed_bad_requests_get_4xx_json_and_the_service_stays_up(url):
    n = int(os.environ.get("MTN_FUZZ_EXAMPLES", "1000"))
    seen: Counter = Counter()
    session = requests.Session()

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(BODIES)
    def check(raw):
        r = session.post(f"{url}/v1/generate", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
        seen[r.status_code] += 1
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text[:300])
        body = r.json()
        assert "error" in body or "detail" in body

    check()
    print(f"\nfuzzed bad requests: {sum(seen.values())}, status codes: {dict(seen)}")
    assert sum(seen.values()) >= n and not any(code >= 500 for code in seen)
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert requests.post(f"{url}/v1/generate", json={"prompt": "ein Hund"}, timeout=120).status_code == 200


# ------------------------------------------------------------------------------------------- browser

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def test_web_page_generates_in_headless_chromium(url):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium + chromium-driver are missing: .ci/run installs them with apt")
        pytest.skip("Debian chromium / chromium-driver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    try:
        driver.get(f"{url}/")
        driver.find_element(By.ID, "prompt").send_keys("ein roter Hund läuft am Strand")
        driver.find_element(By.ID, "generate").click()
        img = WebDriverWait(driver, 120).until(ec.presence_of_element_located((By.CSS_SELECTOR, "img.result")))
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", img) > 0)
        assert driver.execute_script("return arguments[0].naturalWidth", img) == 32
        assert "route: de" in driver.find_element(By.ID, "route").text
        # a bad request shows the service's message instead of an image
        driver.find_element(By.ID, "num_images").clear()
        driver.find_element(By.ID, "num_images").send_keys("9")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 30).until(lambda d: "num_images 9 is above 2" in d.find_element(By.ID, "error").text)
    finally:
        driver.quit()
