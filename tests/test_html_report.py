"""The HTML results page (issue 17 item 10): one self-contained file from a results folder and a lens.

The numbers are checked against references computed here from the episode files (pyarrow + scipy), the lens
browser's data against the lens itself, and the page in a real headless browser (Debian's chromium driven by
selenium through chromedriver): it loads with no console error and no request but data URIs, tables and images
render, a token search finds exactly the vectors whose top-k hold the token, the layer browser and the set
buttons show the lens's tokens. The browser test is skipped (with the reason) where chromium is absent.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

import nnsight_vla as nv
from nnsight_vla.errors import InputError, ResultsError
from nnsight_vla.lens import normalize_token
from nnsight_vla.neurons import NeuronSet
from nnsight_vla.reports.html import build_html_report, conditions_rows, write_html_report
from nnsight_vla.rollout import conditions as C
from nnsight_vla.rollout.records import EpisodeKey, EpisodeRecorder
from nnsight_vla.rollout.store import ResultsStore
from nnsight_vla.steering import Steering

K = 5
FAST = [(1, 3), (2, 5), (3, 7)]
TASKS, TRIALS, STEPS = (0, 1), 4, 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A results folder (baseline, a steered set, its random control, a prompt baseline; frames for trial 0) and
    the lens of the tiny model the sets belong to."""
    folder = tmp_path_factory.mktemp("report")
    vla = nv.tiny("openvla", seed=0)
    lens = nv.ValueVectorLens(vla, k=K, cache_dir=False, progress=False)
    lens_file = lens.save(folder / "lens.npz")
    fast = NeuronSet.for_model(vla, FAST, name="fast")
    steer = Steering(fast, 6.0)
    conds = [C.baseline(), C.steered("fast", steer, alpha=6.0, layers="all"),
             C.steered("fast", steer.random_control(0), alpha=6.0, layers="all", kind="control",
                       name="random[fast]@a6/all"),
             C.prompt_baseline("fast")]
    store = ResultsStore.create(folder / "results", {"simulator": "test"}, [c.to_dict() for c in conds], kind="test")
    rng = np.random.default_rng(0)
    gains = {"baseline": 1.0, "fast@a6/all": 1.5, "random[fast]@a6/all": 1.0, "prompt:fast": 1.05}
    for index, cond in enumerate(conds):
        for task in TASKS:
            for trial in range(TRIALS):
                speed = 0.01 * gains[cond.name] + rng.normal(0, 0.001)
                rec = EpisodeRecorder(EpisodeKey(cond.name, task, trial), (0.0, 0.0, 0.8))
                for t in range(STEPS):
                    rec.record((speed * (t + 1), 0.0, 0.8), [speed * 10, 0, 0.01 * index, 0, 0, 0, -1.0],
                               done=t == STEPS - 1)
                    if trial == 0:
                        frame = np.zeros((32, 32, 3), np.uint8)
                        frame[:, : 2 * (t + 1)] = (60 * index, 200, 20 * t)
                        rec.add_frame(frame)
                store.write_episode(rec.finish(success=trial % 2 == 0))
    return {"vla": vla, "lens": lens, "lens_file": lens_file, "store": store, "conds": conds, "fast": fast,
            "control": conds[2].steering.neurons, "folder": folder}


def episode_means(store, condition, column="action_disp"):
    """{(task, trial): mean of the step column} read straight from the Parquet files."""
    out = {}
    for path in sorted(store.episodes_dir.glob("*.json")):
        record = json.loads(path.read_text())
        if record["condition"] == condition:
            values = pq.read_table(store.episodes_dir / record["steps_file"], columns=[column]).column(0).to_numpy()
            out[(str(record["task"]), int(record["trial"]))] = float(np.mean(values))
    return out


def table_values(page: str) -> dict[str, dict[str, str]]:
    """{condition: {column key: data-value}} of the conditions table."""
    out = {}
    for name, row in re.findall(r'<tr(?: class="reference")? data-condition="([^"]+)">(.*?)</tr>', page):
        out[name] = dict(re.findall(r'<td data-key="([^"]+)" data-value="([^"]*)">', row))
    return out


def decode_lens(page: str) -> dict:
    data = json.loads(re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', page, re.S)[1])
    dtype = {"u16": "<u2", "u32": "<u4"}[data["dtype"]]
    ids = np.frombuffer(base64.b64decode(data["ids"]), dtype=dtype)
    data["grid"] = ids.reshape(data["num_layers"], data["d_mlp"], data["k"])
    return data


def test_the_page_is_self_contained_and_its_tests_are_right(world):
    store = world["store"]
    page = build_html_report(store, lens=world["lens_file"])
    # nothing is fetched: a CSP that allows data URIs only, and no address in any src / href
    assert "default-src 'none'; img-src data:; media-src data:" in page
    assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) is None
    assert not re.search(r"<(link|iframe|object|embed)\b", page)
    values = table_values(page)
    assert set(values) == {c.name for c in world["conds"]}
    reference = episode_means(store, "baseline")
    p_paired = {}
    for cond in world["conds"][1:]:
        treated = episode_means(store, cond.name)
        keys = sorted(reference)
        a, b = np.array([treated[k] for k in keys]), np.array([reference[k] for k in keys])
        row = values[cond.name]
        assert float(row["mean"]) == pytest.approx(a.mean(), rel=1e-9)
        assert float(row["p_welch"]) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-6)
        p_paired[cond.name] = stats.ttest_rel(a, b).pvalue
        assert float(row["p_paired"]) == pytest.approx(p_paired[cond.name], rel=1e-6)
        assert float(row["p_wilcoxon"]) == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-6)
        d = a - b
        assert float(row["cohen_dz"]) == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-9)
        assert float(row["pct_change"]) == pytest.approx(100 * (a.mean() - b.mean()) / b.mean(), rel=1e-9)
        assert row["pairs"] == str(len(keys)) and row["episodes"] == str(len(TASKS) * TRIALS)
        assert float(row["success_rate"]) == 0.5
    ranked = sorted(p_paired, key=p_paired.get)  # Holm, by hand
    running = 0.0
    for rank, name in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p_paired[name]))
        assert float(values[name]["p_holm"]) == pytest.approx(running, rel=1e-6)
    assert float(values["fast@a6/all"]["p_holm"]) < 1e-3 and values["baseline"]["p_paired"] == ""
    # the figures of plot_all and the lens's action share, as PNG data
    figures = re.findall(r'<figure><img alt="([^"]+)" src="data:image/png;base64,', page)
    assert figures[:3] == ["displacement_action", "displacement_eef", "height"] and figures[-1] == "action_share"
    # episode media: the first trial of each task and condition
    assert len(re.findall(r'<div class="episode" data-episode=', page)) == len(TASKS) * len(world["conds"])


def test_the_lens_data_is_the_lens(world, tmp_path):
    lens = world["lens"]
    page = build_html_report(world["store"], lens=world["lens_file"])
    data = decode_lens(page)
    assert (data["num_layers"], data["d_mlp"], data["k"]) == (lens.num_layers, lens.d_mlp, K)
    tokens = np.asarray(data["tokens"], dtype=object)
    for layer in range(lens.num_layers):
        for neuron in (0, 17, lens.d_mlp - 1):
            assert list(tokens[data["grid"][layer, neuron]]) == lens.vector_tokens(layer, neuron, K)
    share = lens.action_token_share()["share"].to_numpy()
    np.testing.assert_allclose(data["share"], share, rtol=1e-12)
    assert data["chance"] == pytest.approx(len(lens.action_ids) / lens.vocab_rows)
    assert [bool(a) for a in data["action"]] == [bool(lens.action_mask()[i]) for i in np.unique(lens.ids[..., :K])]
    sets = json.loads(re.search(r'id="sets-data">(.*?)</script>', page, re.S)[1])
    assert [(s["name"], s["kind"], [tuple(p) for p in s["pairs"]]) for s in sets] == [
        ("fast", "concept", FAST), ("random[fast]", "control", list(world["control"].pairs))]
    # the lens's exported tables give the same browser (tokens and action flags)
    for suffix in (".parquet", ".csv", ".json"):
        table = lens.export(tmp_path / f"top{suffix}")
        other = decode_lens(build_html_report(world["store"], lens=table, k=3))
        words = np.append(np.asarray(other["tokens"], dtype=object), "")
        assert other["k"] == 3 and other["grid"].shape == (lens.num_layers, lens.d_mlp, 3)
        for layer, neuron in ((0, 0), (3, 100)):
            assert list(words[other["grid"][layer, neuron]]) == lens.vector_tokens(layer, neuron, 3)
        np.testing.assert_allclose(other["share"], lens.action_token_share(3)["share"].to_numpy(), rtol=1e-12)


def test_refusals_and_the_command(world, tmp_path):
    from typer.testing import CliRunner

    from nnsight_vla.cli import app

    store = world["store"]
    with pytest.raises(InputError, match=r"\.html"):
        write_html_report(store, tmp_path / "report.pdf")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="not a top-token table"):
        build_html_report(store, lens=tmp_path / "bad.csv")
    with pytest.raises(ResultsError, match="not an nnsight-vla results folder"):
        build_html_report(tmp_path)
    rows, _, note = conditions_rows(store, "action_disp", reference="nowhere")
    assert note and "nowhere" in note and all(math.isnan(r["p_paired"]) for r in rows)
    out = tmp_path / "page.html"
    extra = NeuronSet.for_model(world["vla"], [(0, 1)], name="extra").save(tmp_path / "extra.json")
    result = CliRunner().invoke(app, ["report", str(store.root), "--html", "--lens", str(world["lens_file"]),
                                      "--out", str(out), "--neurons", str(extra), "--k", "4"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and decode_lens(out.read_text())["k"] == 4
    assert '"name": "extra", "kind": "extra"' in out.read_text()
    text = CliRunner().invoke(app, ["report", str(store.root)])
    assert text.exit_code == 0 and "fast@a6/all" in text.output and "p_paired" in text.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere"), "--html"])
    assert missing.exit_code != 0 and "not an nnsight-vla results folder" in missing.output


# -- the page in a real browser ------------------------------------------------------------------------------------


def browser(user_data: Path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install -y chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={user_data}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_page_in_headless_chromium(world, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    lens = world["lens"]
    page = write_html_report(world["store"], tmp_path / "report.html", lens=world["lens_file"])
    words = {}
    for layer in range(lens.num_layers):
        for neuron in range(lens.d_mlp):
            for token in lens.vector_tokens(layer, neuron, K):
                words.setdefault(normalize_token(token), set()).add((layer, neuron))
    query = next(w for w, hits in sorted(words.items()) if w.isalpha() and 2 <= len(hits) <= 40)
    driver = browser(tmp_path / "chromium-profile")
    try:
        driver.get(page.as_uri())
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#neurons-table tbody tr"))
        # tables render
        rows = driver.find_elements(By.CSS_SELECTOR, "#conditions-table tbody tr")
        assert [r.get_attribute("data-condition") for r in rows][0] == "baseline" and len(rows) == 4
        assert rows[0].find_element(By.CSS_SELECTOR, 'td[data-key="condition"]').text == "baseline"
        # images are decoded (figures, and each episode's frame, gif or video), nothing but data URIs requested
        sizes = driver.execute_script(
            "return Array.from(document.querySelectorAll('figure img')).map(i => [i.complete, i.naturalWidth])")
        assert len(sizes) == 4 and all(done and width > 0 for done, width in sizes), sizes
        media = driver.execute_script(
            "return Array.from(document.querySelectorAll('.episode .media')).map(m => {"
            "  const v = m.querySelector('video'); if (v) return v.src.startsWith('data:video/') ? 1 : 0;"
            "  const i = Array.from(m.querySelectorAll('img')).find(x => x.offsetParent !== null);"
            "  return i && i.complete && i.naturalWidth > 0 ? 1 : 0; })")
        assert media == [1] * (len(TASKS) * 4), media
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith("data:") for name in resources), resources
        # the token search finds exactly the vectors whose top-k holds the word
        box = driver.find_element(By.ID, "search")
        box.send_keys(query + Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "search-count").text.endswith("neurons"))
        found = {(int(r.get_attribute("data-layer")), int(r.get_attribute("data-neuron")))
                 for r in driver.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")}
        assert found == words[query], query
        assert driver.find_element(By.ID, "search-count").text == f"{len(found)} neurons"
        # the layer browser shows the lens's tokens; the set's neurons are highlighted
        Select(driver.find_element(By.ID, "layer")).select_by_value("2")
        first = driver.find_element(By.CSS_SELECTOR, '#neurons-table tbody tr[data-neuron="5"]')
        shown_tokens = [t.get_attribute("textContent") for t in first.find_elements(By.CSS_SELECTOR, "span.tok")]
        assert shown_tokens == lens.vector_tokens(2, 5, K)
        assert "in-set" in first.get_attribute("class") and "fast" in first.text
        driver.find_element(By.ID, "only-sets").click()
        shown = {int(r.get_attribute("data-neuron")) for r in
                 driver.find_elements(By.CSS_SELECTOR, "#neurons-table tbody tr")}
        assert shown == {n for l, n in FAST + list(world["control"].pairs) if l == 2}
        driver.find_element(By.CSS_SELECTOR, 'button.show-set[data-set="0"]').click()
        listed = [(int(r.get_attribute("data-layer")), int(r.get_attribute("data-neuron")))
                  for r in driver.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")]
        assert listed == FAST
        # a frame slider steps through an episode (frames are a PNG folder where imageio is not installed)
        for slider in driver.find_elements(By.CSS_SELECTOR, ".episode input.scrub")[:1]:
            driver.execute_script("arguments[0].value = 3; arguments[0].dispatchEvent(new Event('input'))", slider)
            frames = slider.find_element(By.XPATH, "..").find_elements(By.CSS_SELECTOR, "img.frame")
            assert [f.is_displayed() for f in frames] == [i == 3 for i in range(len(frames))]
        driver.save_screenshot(str(tmp_path / "report.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == [], errors
    finally:
        driver.quit()
