"""`labelgen inspect --html`: the page, opened from file:// in a real headless
Chromium (Debian's chromium and chromium-driver, driven by selenium; nothing
is downloaded at test time). For one position of every record kind the
entries the page shows under the pointer equal the shard's decoded values;
text from a hostile label set stays text; a damaged set is refused; a page
for 1,000 windows of 4,096 tokens stays small and opens fast. Elsewhere the
browser tests skip, saying what to install.

    python tests/test_html.py LABELS OUT.png   # the README's screenshot: this module's code, any label set"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from labelgen.errors import FormatError, OptionError
from labelgen.generate import run
from labelgen.generate.config import GenerateConfig
from labelgen.shards import ShardReader
from labelgen.tools.html_report import build, write

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HOSTILE = ('</script><script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> </textarea> '
           '"quotes" \'too\' \x07bell')
HOSTILE_KEY = "<img src=x onerror='window.__pwned = 3'>"   # a field name: the config shows it


def browser():
    """A headless Chromium under selenium, or a skip naming what to install."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium: pip install -e '.[test]'")
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Chromium: apt-get install chromium chromium-driver (make system)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.fixture(scope="module")
def chrome():
    driver = browser()
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> float:
    """Load the page; seconds until its script has drawn it."""
    t0 = time.monotonic()
    driver.get(path.resolve().as_uri())
    while driver.execute_script("return document.body && document.body.dataset.ready") != "true":
        assert time.monotonic() - t0 < 120, driver.get_log("browser")
        time.sleep(0.05)
    return time.monotonic() - t0


def point_at(driver, example: int, token: int) -> list[tuple[int, str]]:
    """Select `example`, point at its token `token`: the (id, probability or draws) rows the page shows."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    Select(driver.find_element(By.ID, "example")).select_by_value(str(example))
    span = driver.find_element(By.CSS_SELECTOR, f"#tokens .tok[data-pos='{token}']")
    ActionChains(driver).move_to_element(span).perform()
    return [(int(r.find_element(By.CSS_SELECTOR, ".id").text), r.find_element(By.CSS_SELECTOR, ".prob").text)
            for r in driver.find_elements(By.CSS_SELECTOR, "#entries tr.entry")]


@pytest.fixture(scope="module")
def sets(tiny_teacher, corpus, tmp_path_factory):
    """A label set of every record kind from the tiny teacher."""
    d = tmp_path_factory.mktemp("kinds")
    common = dict(teacher=tiny_teacher, progress=False, device="cpu", max_seq_len=64, rows_per_shard=8)
    docs = (str(corpus / "docs.jsonl"),)
    kw = {"topk": dict(k=16), "minp": dict(k=16, min_prob=0.01), "tokens": dict(mode="tokens"),
          "sampled": dict(mode="sampled", draws=12, encoding={"sampled_coverage": True}),
          "sampled-nocov": dict(mode="sampled", draws=12)}
    for name, extra in kw.items():
        run(GenerateConfig(inputs=docs, out=str(d / name), **common, **extra))
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(corpus / "prompts.jsonl"),), out=str(d / "samples"),
                       mode="sample", prompt_field="prompt", n=2, max_new_tokens=8, progress=False, device="cpu"))
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(d / "samples"),), out=str(d / "scored"), mode="score", k=8,
                       progress=False, device="cpu"))
    return d


def rows_of(where, n: int) -> list[dict]:
    rows = []
    for row in ShardReader(where).rows():
        rows.append(row)
        if len(rows) == n:
            return rows
    return rows


@pytest.mark.parametrize("kind", ["topk", "minp", "sampled", "sampled-nocov", "scored"])
def test_the_entries_under_the_pointer_are_the_shards(chrome, sets, tmp_path, kind):
    page = tmp_path / f"{kind}.html"
    write(sets / kind, page, examples=3)
    open_page(chrome, page)
    row = rows_of(sets / kind, 2)[1]
    ids = row["input_ids"]
    first = len(ids) - (len(row["sampled_lengths"]) if "sampled_lengths" in row else len(row["target_rank"]))
    token = first + 7                                  # predicted by labelled position 7
    shown = point_at(chrome, 1, token)
    if "sampled_ids" in row:
        start = int(row["sampled_lengths"][:7].sum())
        stored = sorted(zip(row["sampled_ids"][start:start + row["sampled_lengths"][7]].tolist(),
                            row["sampled_counts"][start:start + row["sampled_lengths"][7]].tolist()), key=lambda e: -e[1])
        assert sorted((i, int(p.split()[0])) for i, p in shown) == sorted(stored)
        assert sum(c for _, c in stored) == 12
    else:
        n = int(row["topk_lengths"][7]) if "topk_lengths" in row else row["topk_ids"].shape[1]
        stored = {int(i): float(np.exp(lp)) for i, lp in zip(row["topk_ids"][7][:n], row["topk_logprobs"][7][:n])}
        assert sorted(i for i, _ in shown) == sorted(stored)   # every stored entry, ids decoded
        for i, p in shown:
            assert float(p) == pytest.approx(stored[i], abs=6e-4), i   # to 3 digits
    facts = chrome.find_element("id", "detail-head").text
    assert f"(id {int(ids[token])})" in facts
    chrome.save_screenshot(str(tmp_path / f"{kind}.png"))
    assert (tmp_path / f"{kind}.png").stat().st_size > 1000


def test_switching_the_measure_recolours_the_tokens(chrome, sets, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    write(sets / "topk", tmp_path / "p.html", examples=2)
    open_page(chrome, tmp_path / "p.html")

    def colours():
        return [s.value_of_css_property("background-color")
                for s in chrome.find_elements(By.CSS_SELECTOR, "#tokens .tok[data-pos]")[1:40]]
    measure = Select(chrome.find_element(By.ID, "measure"))
    assert [o.text for o in measure.options] == ["coverage", "teacher entropy (stored entries)",
                                                 "actual token's probability", "actual token's rank"]
    before = colours()
    measure.select_by_visible_text("actual token's rank")
    after = colours()
    assert before != after and len(set(after)) > 1


def test_a_samples_set_shows_prompt_and_completion_with_their_logprobs(chrome, sets, tmp_path):
    from selenium.webdriver.common.by import By
    write(sets / "samples", tmp_path / "s.html", examples=4)
    open_page(chrome, tmp_path / "s.html")
    point_at(chrome, 2, 3)
    row = rows_of(sets / "samples", 3)[2]
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#tokens .tok.prompt")) == len(row["prompt_ids"])
    text = chrome.find_element(By.ID, "detail").text
    assert f"(id {int(row['completion_ids'][3])})" in text
    assert f"its logprob when sampled: {row['completion_logprobs'][3]:.3f}" in text
    chrome.save_screenshot(str(tmp_path / "samples.png"))


def test_a_tokens_set_shows_its_tokens_unlabelled(chrome, sets, tmp_path):
    write(sets / "tokens", tmp_path / "t.html")
    open_page(chrome, tmp_path / "t.html")
    point_at(chrome, 0, 5)
    assert "no labels predict this token" in chrome.find_element("id", "detail").text


def test_text_from_the_label_set_is_never_markup(chrome, tiny_teacher, tmp_path):
    """Example ids, token strings and config values holding </script>, </textarea>, quotes and control
    characters: the page shows them as text, and no script of theirs runs."""
    from selenium.webdriver.common.by import By
    with open(tmp_path / "evil.jsonl", "w") as f:
        f.write(json.dumps({HOSTILE_KEY: HOSTILE, "text": "x = 1  # " + HOSTILE * 3}) + "\n")
    run(GenerateConfig(teacher=tiny_teacher, inputs=(str(tmp_path / "evil.jsonl"),), out=str(tmp_path / HOSTILE[:8]
                       .replace("/", "_")), id_field=HOSTILE_KEY, k=8, max_seq_len=64, progress=False, device="cpu"))
    where = next(p for p in tmp_path.iterdir() if p.is_dir() and (p / "manifest.json").exists())
    page = tmp_path / "evil.html"
    write(where, page)
    html = page.read_text()
    assert "</script><script>window.__pwned" not in html and "</textarea>" not in html
    open_page(chrome, page)
    assert chrome.execute_script("return window.__pwned") is None
    assert len(chrome.find_elements(By.TAG_NAME, "script")) == 2   # the page's own: its data and its code
    assert HOSTILE.split(" <")[0] in chrome.find_element(By.ID, "example-head").text   # the id, as text
    assert HOSTILE_KEY in chrome.find_element(By.ID, "identity").text                # the config, as text
    shown = chrome.find_element(By.ID, "tokens").text
    assert "<script>window.__pwned = 1</script>" in shown.replace("\n", "")


def test_a_damaged_set_is_refused_in_one_line_and_nothing_is_written(sets, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(sets / "topk", damaged)
    shard = sorted(damaged.glob("shard-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"shard-000000.parquet: .*the label set fails validation"):
        write(damaged, tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()
    with pytest.raises(OptionError, match="--examples: between 1 and 5,000, got 0"):
        build(sets / "topk", examples=0)
    with pytest.raises(OptionError, match="--examples: between 1 and 5,000, got 200,000"):
        build(sets / "topk", examples=200_000)


def test_where_the_page_cannot_go_is_said_before_the_set_is_read(sets, tmp_path, monkeypatch):
    """A directory, or a missing one, is one line naming --html, before validate and inspect read every shard."""
    import labelgen.tools.inspection as inspection
    read = []
    monkeypatch.setattr(inspection, "validate", lambda *a, **k: read.append(a) or {"ok": True})
    with pytest.raises(OptionError, match=r"--html: .* is a directory; name the page's file"):
        write(sets / "topk", tmp_path)
    with pytest.raises(OptionError, match=r"--html: .*nowhere is not a directory; create it first"):
        write(sets / "topk", tmp_path / "nowhere" / "x.html")
    assert not read


def test_the_cli_writes_the_page_from_a_bucket_too(s3, sets, tmp_path):
    from typer.testing import CliRunner
    from helpers import upload
    from labelgen.cli import app
    uri = upload(s3["client"], sets / "topk", "html/topk")
    r = CliRunner().invoke(app, ["inspect", uri, "--html", str(tmp_path / "b.html"), "--examples", "2"])
    assert r.exit_code == 0 and "wrote" in r.stdout, r.output
    local = build(sets / "topk", examples=2)
    assert (tmp_path / "b.html").read_text().count('"id":') == local.count('"id":')
    # and into a bucket: the page is an object there (it was written to a local path "s3:/...")
    r = CliRunner().invoke(app, ["inspect", str(sets / "topk"), "--html", f"{uri}-page/labels.html", "--examples", "2"])
    assert r.exit_code == 0, r.output
    from labelgen.store import storage
    assert storage.read_text(f"{uri}-page/labels.html").count('"id":') == local.count('"id":')


@pytest.mark.slow
def test_a_page_for_1000_windows_of_4096_tokens_is_small_and_opens_fast(chrome, tmp_path):
    """1,000 windows of 4,096 tokens of top-64 labels at Qwen's vocabulary (synthetic logits): the page carries
    the default 8 examples and the set's figures; under 20 MB, drawn in under 5 s."""
    from labelgen.format import Encoding
    from labelgen.shards import ShardWriter
    rng = np.random.default_rng(0)
    V, k, T = 151_936, 64, 4096

    def window(i):
        ids = (rng.integers(0, V, (T - 1, 1)) + np.arange(k)[None, :] * 2371) % V   # k distinct ids a position
        logits = np.sort(rng.standard_normal((T - 1, k + 1)) * 2, axis=1)[:, ::-1]
        lp = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))[:, :k].astype(np.float32)
        return {"example_id": f"window-{i}", "window_offset": 0, "input_ids": rng.integers(0, V, T), "topk_ids": ids,
                "topk_logprobs": lp, "coverage": np.exp(lp).sum(1).clip(0, 1), "target_logprob": lp[:, 0],
                "target_rank": np.zeros(T - 1, np.int64)}
    windows = [window(i) for i in range(8)]   # the 8 the page carries are all different; the rest repeat them
    with ShardWriter(tmp_path / "big", "topk", k, V, encoding=Encoding(row_group_rows=16), max_rows=250) as w:
        for i in range(1000):
            w.write({**windows[i % 8], "example_id": f"window-{i}"})
    size = write(tmp_path / "big", tmp_path / "big.html")
    seconds = open_page(chrome, tmp_path / "big.html")
    print(f"\npage for 1,000 windows of 4,096 tokens (top-64, V = 151,936): {size / 2**20:.1f} MiB, "
          f"drawn in {seconds:.2f} s")
    assert size < 20 * 2**20 and seconds < 5
    assert len(point_at(chrome, 7, 4000)) == 64


def screenshot(labels: str, png: str) -> None:
    """The page of `labels` pointed at a token of its first example, as docs show it."""
    import tempfile
    from selenium.webdriver.common.by import By
    driver = browser()
    try:
        page = Path(tempfile.mkdtemp()) / "page.html"
        write(labels, page, examples=4)
        open_page(driver, page)
        point_at(driver, 0, 40)
        driver.execute_script("document.getElementById('tokens').scrollIntoView()")
        driver.find_element(By.TAG_NAME, "body").screenshot(png)
    finally:
        driver.quit()


if __name__ == "__main__":
    screenshot(sys.argv[1], sys.argv[2])
