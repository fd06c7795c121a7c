"""`bitfit export-web`: the site's files and refusals (Python), and the site in a real headless Chromium: logits
equal to Python onnxruntime's, the same tokens, one InferenceSession for every task, damaged files refused on the
page, a screenshot of the demo page.

The browser tests need Node.js, web/node_modules (npm ci --prefix web) and Chromium (scripts/setup_web.sh
installs both). Where they are missing these tests skip with the reason; with BITFIT_REQUIRE_BROWSER=1 (CI) they
fail instead, so CI can never pass them silently.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bitfit.cli import main as cli
from bitfit.compiler.compile import compile as compile_model
from bitfit.exporters.browser import Browser, BrowserError, browser_problem
from bitfit.exporters.site_server import serve_site
from bitfit.exporters.web import SITE_FILE, export_web
from bitfit.runtime import TaskSession
from bitfit.runtime.errors import BitFitError, CompiledModelError
from bitfit.runtime.pack import load_pack

from conftest import QUIET

TOL = 1e-4  # the bound on page logits against Python onnxruntime's (measured: under 1e-6)
TEXTS = [
    "the movie was good, really good fun",
    "what an awful boring plot. i hate it!",
    "free cash prize: call now, text win to 80086",
    "Élan vital – naïve café’s résumé",  # accents and typographic quotes: the normalizer's work
    " ".join(["very"] * 90) + " good",  # longer than max_length: truncated the same way
]
PAIRS = ["who is the actor?", "the plot of the film", "call me now", "a city name", "was it good or bad"]


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packs(pack_all, pack_scores, pack_pairs) -> list[Path]:
    return [pack_all, pack_scores, pack_pairs]


@pytest.fixture(scope="module")
def site(bert_compiled, packs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web") / "site"
    export_web(bert_compiled, packs, out)
    return out


@pytest.fixture(scope="module")
def names(packs) -> list[str]:
    return [load_pack(p).name for p in packs]


@pytest.fixture(scope="module")
def python(bert_compiled, packs) -> TaskSession:
    session = TaskSession(bert_compiled)
    for p in packs:
        session.register(p)
    return session


@pytest.fixture(scope="module")
def browser():
    problem = browser_problem()
    if problem:
        if os.environ.get("BITFIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"BITFIT_REQUIRE_BROWSER=1 but the browser tests cannot run: {problem}")
        pytest.skip(f"no browser here: {problem}")
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def url(site):
    with serve_site(site) as address:
        yield address


def page_predict(browser: Browser, url: str, task: str, texts: list[str], pairs: list[str] | None = None) -> dict:
    """bitfit.js's predict on a fresh import of the site's module (the API, without the demo page)."""
    browser.call("goto", url=url + SITE_FILE)
    return browser.call("eval", js=f"""async () => {{
        const {{ loadSite }} = await import('/bitfit.js');
        const site = await loadSite('/');
        return await site.predict({json.dumps(task)}, {json.dumps(texts)}, {json.dumps(pairs)});
    }}""")


def flip_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


# -- the site's files (no browser) ----------------------------------------------------------------------------
def test_every_file_is_named_and_listed_by_its_digest(site, names):
    index = json.loads((site / SITE_FILE).read_text())
    assert index["format"] == "bitfit-web-site" and [t["name"] for t in index["tasks"]] == names
    listed = [index["graph"], index["tokenizer"], index["base_biases"]]
    for t in index["tasks"]:
        description = json.loads((site / t["description"]["file"]).read_text())
        listed += [t["description"], description["binary"]]
        assert description["digest"] == t["digest"] == load_pack_digest(site, t)
    for entry in listed:
        data = (site / entry["file"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        assert (sha, len(data)) == (entry["sha256"], entry["bytes"])
        assert sha[:16] in entry["file"]  # a cache never serves an old file under a new index
    for vendored in ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs", "tokenizers.min.mjs"):
        assert (site / "vendor" / vendored).stat().st_size > 1000  # served by the site itself, never a CDN
    assert index["runtime"] == {"onnxruntime-web": "1.31.1", "@huggingface/tokenizers": "0.2.0"}
    assert "MIT" in (site / "vendor" / "LICENSE.onnxruntime-web").read_text()
    assert "Apache" in (site / "vendor" / "LICENSE.huggingface-tokenizers").read_text()


def load_pack_digest(site: Path, task: dict) -> str:
    return json.loads((site / task["description"]["file"]).read_text())["digest"]


def python_reader(site: Path, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The site's format read by Python: its graph fed with a task's binary (and the base biases) gives logits."""
    index = json.loads((site / SITE_FILE).read_text())
    entry = next(t for t in index["tasks"] if t["name"] == task)
    description = json.loads((site / entry["description"]["file"]).read_text())

    def tensors(file: str, specs: list[dict]) -> dict[str, np.ndarray]:
        values = np.frombuffer((site / file).read_bytes(), "<f4")
        return {s["name"]: values[s["offset"] : s["offset"] + s["length"]].reshape(s["shape"]) for s in specs}

    feeds = tensors(index["base_biases"]["file"], index["base_biases"]["tensors"])
    feeds.update(tensors(description["binary"]["file"], description["tensors"]))
    for spec in index["graph"]["head_inputs"]:
        feeds.setdefault(spec["name"], np.zeros([1 if d == -1 else d for d in spec["shape"]], np.float32))
    feeds["head.pooling"] = np.eye(3, dtype=np.float32)[["mean", "cls", "pooler"].index(description["pooling"])]
    session = ort.InferenceSession(str(site / index["graph"]["file"]), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {**feeds, **inputs})[0]


def test_the_format_gives_the_sessions_logits(site, python, names):
    """Independent of the browser: the files, read as docs/web.md describes them, are the packs exactly."""
    for task in names[:2]:
        inputs = python.encoder(TEXTS, max_length=python.pack(task).manifest.max_length)
        assert np.abs(python_reader(site, task, inputs) - python.run(task, TEXTS).logits).max() < 1e-5


def test_the_site_graph_requires_every_bias_and_head_input(site):
    """onnxruntime-web refuses feeds of inputs that have defaults, so the site's graph has none."""
    import onnx

    index = json.loads((site / SITE_FILE).read_text())
    graph = onnx.load(str(site / index["graph"]["file"]))
    initializers = {t.name for t in graph.graph.initializer}
    overridable = [s["name"] for s in index["graph"]["bias_inputs"] + index["graph"]["head_inputs"]]
    assert overridable and not initializers & set(overridable)
    assert set(overridable) <= {i.name for i in graph.graph.input}


def test_refusals(bert_model, bert_compiled, pack_all, pack_other_base, trained_pack, tmp_path, monkeypatch):
    mixed = compile_model(bert_model, tmp_path / "mixed", mixed=True, log=QUIET["log"])
    with pytest.raises(CompiledModelError, match="mixed graph"):
        export_web(mixed, [pack_all], tmp_path / "s1")
    headless = compile_model(bert_model, tmp_path / "headless", head=False, log=QUIET["log"])
    with pytest.raises(CompiledModelError, match="no task head"):
        export_web(headless, [pack_all], tmp_path / "s2")
    with pytest.raises(BitFitError, match="trained on|fingerprint|another base"):
        export_web(bert_compiled, [pack_other_base], tmp_path / "s3")
    with pytest.raises(BitFitError, match="both named"):
        export_web(bert_compiled, [pack_all, pack_all], tmp_path / "s4")
    with pytest.raises(BitFitError, match="at least one"):
        export_web(bert_compiled, [], tmp_path / "s5")
    # a directory that is not a site is never replaced, with or without overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(BitFitError, match="not a web site"):
            export_web(bert_compiled, [pack_all], tmp_path / "mine", overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # a site is replaced only with overwrite
    export_web(bert_compiled, [pack_all], tmp_path / "site")
    with pytest.raises(BitFitError, match="already exists"):
        export_web(bert_compiled, [pack_all], tmp_path / "site")
    export_web(bert_compiled, [pack_all], tmp_path / "site", overwrite=True)


def test_token_kinds_are_refused(bert_compiled, pack_all, tmp_path):
    pack = load_pack(pack_all)
    pack.manifest.task_kind = "token-classification"
    with pytest.raises(BitFitError, match="sequence tasks"):
        export_web(bert_compiled, [pack], tmp_path / "s")


def test_a_missing_or_unpinned_runtime_is_refused(bert_compiled, pack_all, tmp_path, monkeypatch):
    web = tmp_path / "web"
    web.mkdir()
    monkeypatch.setenv("BITFIT_WEB", str(web))
    with pytest.raises(BitFitError, match="no bitfit.js"):
        export_web(bert_compiled, [pack_all], tmp_path / "s")
    real = Path(__file__).resolve().parents[1] / "web"
    if not (real / "node_modules").is_dir():
        pytest.skip("web/node_modules is not installed: scripts/setup_web.sh")
    for name in ("bitfit.js", "package.json"):
        shutil.copy(real / name, web / name)
    with pytest.raises(BitFitError, match="npm package onnxruntime-web is not installed"):
        export_web(bert_compiled, [pack_all], tmp_path / "s")
    shutil.copytree(real / "node_modules", web / "node_modules", symlinks=True)
    pinned = json.loads((web / "package.json").read_text())
    pinned["dependencies"]["onnxruntime-web"] = "1.0.0"
    (web / "package.json").write_text(json.dumps(pinned))
    with pytest.raises(BitFitError, match="pins 1.0.0"):
        export_web(bert_compiled, [pack_all], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_the_cli(bert_compiled, pack_all, tmp_path, capsys):
    assert cli(["export-web", "--compiled", str(bert_compiled), str(pack_all), "--out", str(tmp_path / "s")]) == 0
    assert "downloaded once" in capsys.readouterr().out
    assert cli(["export-web", "--compiled", str(bert_compiled), str(pack_all), "--out", str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_preview_server(site, tmp_path):
    with serve_site(site, isolated=True) as address:
        for path, kind in (("bitfit.js", "text/javascript"), ("vendor/ort-wasm-simd-threaded.wasm", "application/wasm"),
                           ("vendor/ort.wasm.min.mjs", "text/javascript"), (SITE_FILE, "application/json")):
            with urllib.request.urlopen(address + path) as r:
                assert r.headers["Content-Type"].startswith(kind), path
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                assert ("immutable" in r.headers["Cache-Control"]) == path.startswith(("model/", "tasks/"))
    with pytest.raises(BitFitError, match="no site.json"):
        with serve_site(tmp_path):
            pass


# -- in Chromium ----------------------------------------------------------------------------------------------
def test_page_logits_equal_python_onnxruntime(browser, url, python, names):
    """Three tasks (classification, regression, sentence pairs): labels equal, logits and scores within TOL."""
    for task in names:
        pairs = PAIRS if python.pack(task).manifest.text_pair else None
        page = page_predict(browser, url, task, TEXTS, pairs)
        want = python.run(task, TEXTS, pairs)
        assert page["task"] == task and page["digest"] == want.digest
        assert page["labels"] == want.labels if isinstance(want.labels[0], str) else \
            np.allclose(page["labels"], want.labels, atol=TOL)
        for got, ref in zip(page["records"], want.records()):
            assert np.abs(np.array(got["logits"]) - ref["logits"]).max() < TOL
            assert got["scores"].keys() == ref["scores"].keys()
            assert max(abs(got["scores"][k] - ref["scores"][k]) for k in ref["scores"]) < TOL


def test_page_tokens_equal_the_python_tokenizers(browser, url, python):
    """tokenizers.js plus our truncation give Hugging Face tokenizers' ids, single texts and pairs, at lengths that
    cut one text, the other or both (longest_first)."""
    texts = TEXTS + ["a", "hello world 123", "Tab\there, new\nline", "ÜBER straße"]
    pairs = (PAIRS * 2)[: len(texts)]
    pairs[1] = " ".join(["plot"] * 40)
    browser.call("goto", url=url + SITE_FILE)
    for max_length in (8, 13, 24, 64):
        got = browser.call("eval", js=f"""async () => {{
            const {{ loadSite }} = await import('/bitfit.js');
            const site = await loadSite('/');
            return [site.tokenize({json.dumps(texts)}, null, {max_length}),
                    site.tokenize({json.dumps(texts)}, {json.dumps(pairs)}, {max_length})];
        }}""")
        single = python.encoder(texts, max_length=max_length)
        paired = python.encoder(texts, pairs, max_length=max_length)
        for page_rows, inputs in zip(got, (single, paired)):
            want = [row[mask.astype(bool)].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
            assert page_rows == want, max_length


def test_switching_tasks_keeps_one_session(browser, url, names):
    """A -> B -> A creates one InferenceSession and fetches the graph once; each task is fetched once."""
    browser.call("goto", url=url + SITE_FILE)
    out = browser.call("eval", js=f"""async () => {{
        const ort = await import('/vendor/ort.wasm.min.mjs');
        const create = ort.InferenceSession.create;
        let sessions = 0;
        ort.InferenceSession.create = (...args) => {{ sessions += 1; return create.apply(ort.InferenceSession, args); }};
        const {{ loadSite }} = await import('/bitfit.js');
        const site = await loadSite('/');
        const texts = ['the movie was good'];
        const a1 = await site.predict({json.dumps(names[0])}, texts);
        const b = await site.predict({json.dumps(names[1])}, texts);
        const a2 = await site.predict({json.dumps(names[0])}, texts);
        // calls at once (a person clicking twice): queued on the one session, each with its own task's arrays
        const both = await Promise.all([site.predict({json.dumps(names[1])}, texts), site.predict({json.dumps(names[0])}, texts)]);
        ort.InferenceSession.create = create;
        const fetched = performance.getEntriesByType('resource').map((e) => new URL(e.name).pathname);
        return {{ sessions, fetched, same: JSON.stringify(a1.records) === JSON.stringify(a2.records),
                  concurrent: JSON.stringify(both[0].records) === JSON.stringify(b.records) &&
                              JSON.stringify(both[1].records) === JSON.stringify(a1.records),
                  differs: JSON.stringify(a1.records) !== JSON.stringify(b.records) }};
    }}""")
    assert out["sessions"] == 1
    assert out["same"] and out["differs"] and out["concurrent"]
    graphs = [p for p in out["fetched"] if p.startswith("/model/model.")]
    tasks = [p for p in out["fetched"] if p.startswith("/tasks/")]
    assert len(graphs) == 1
    assert len(tasks) == len(set(tasks)) == 4  # two tasks, a description and a binary each: fetched once


def test_the_demo_page_answers_and_is_pictured(browser, url, names, python, tmp_path):
    browser.call("goto", url=url)
    browser.call("eval", js="async () => { await window.bitfitReady; return null; }")
    browser.call("select", selector="#task", value=names[0])
    browser.call("fill", selector="#texts", value="\n".join(TEXTS[:3]))
    browser.call("click", selector="#run")
    browser.call("wait", selector="#answer")
    labels = browser.call("eval", js="async () => [...document.querySelectorAll('#results td.label')].map(td => td.textContent)")
    assert labels == python.run(names[0], TEXTS[:3]).labels
    assert "3 texts in" in browser.call("text", selector="#timing")
    shot = browser.call("screenshot", path=str(tmp_path / "demo.png"))
    assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(shot).stat().st_size > 10_000
    # switching tasks in the picker fetched no second graph, and nothing came from anywhere but the site
    requests = browser.call("requests")
    assert len([r for r in requests if "/model/model." in r["url"]]) == 1
    assert requests and all(r["url"].startswith(url) for r in requests), [r["url"] for r in requests]
    assert any(r["url"].endswith("/vendor/ort-wasm-simd-threaded.wasm") for r in requests)


def test_a_damaged_task_file_is_refused_on_the_page(browser, site, names, tmp_path):
    """A flipped byte in one task's binary: that task shows the digest error and no answer; the others still work."""
    damaged = tmp_path / "site"
    shutil.copytree(site, damaged)
    index = json.loads((damaged / SITE_FILE).read_text())
    entry = next(t for t in index["tasks"] if t["name"] == names[1])
    binary = json.loads((damaged / entry["description"]["file"]).read_text())["binary"]["file"]
    flip_byte(damaged / binary)
    with serve_site(damaged) as address:
        browser.call("goto", url=address)
        browser.call("eval", js="async () => { await window.bitfitReady; return null; }")
        browser.call("select", selector="#task", value=names[1])
        browser.call("click", selector="#run")
        browser.call("wait", selector="#error", text="does not match its digest")
        assert browser.call("eval", js="async () => document.getElementById('answer').hidden") is True
        assert names[1] in browser.call("text", selector="#error")
        browser.call("select", selector="#task", value=names[0])  # the healthy task still answers
        browser.call("click", selector="#run")
        browser.call("wait", selector="#answer")
        with pytest.raises(BrowserError, match="does not match its digest"):
            page_predict(browser, address, names[1], ["the movie was good"])


@pytest.mark.parametrize("damage, message", [
    ("graph", "the graph .* does not match its digest"),
    ("tokenizer", "the tokenizer .* does not match its digest"),
    ("site", "is not valid JSON"),
    ("format", "declares format"),
    ("description", "description .* does not match its digest"),
    ("huge", "the graph .* is listed as 3221225472 bytes, more than such a file can be"),
])
def test_damaged_site_files_are_refused(browser, site, names, tmp_path, damage, message):
    damaged = tmp_path / "site"
    shutil.copytree(site, damaged)
    index = json.loads((damaged / SITE_FILE).read_text())
    if damage in ("graph", "tokenizer"):
        flip_byte(damaged / index[damage]["file"], at=5000)
    elif damage == "site":
        (damaged / SITE_FILE).write_text((damaged / SITE_FILE).read_text()[:500])
    elif damage == "format":
        (damaged / SITE_FILE).write_text(json.dumps({**index, "format": "something-else"}))
    elif damage == "huge":  # refused from the index, before 3 GiB are fetched
        (damaged / SITE_FILE).write_text(json.dumps({**index, "graph": {**index["graph"], "bytes": 3 << 30}}))
    else:
        flip_byte(damaged / index["tasks"][0]["description"]["file"], at=40)
    with serve_site(damaged) as address:
        with pytest.raises(BrowserError, match=message):
            page_predict(browser, address, names[0], ["the movie was good"])
        if damage != "description":  # the page says so where a person sees it
            browser.call("goto", url=address)
            browser.call("wait", selector="#error")
            assert "re-export the site" in browser.call("text", selector="#error")


def test_the_page_refuses_what_python_refuses(browser, url, python, names):
    for texts, message in (([""], "is empty"), (["\u200b\u200b"], "gives no token"), (["日本語"], "only the unknown token"),
                           (["ok"] * 257, "more than 256")):
        with pytest.raises(BrowserError, match=message):
            page_predict(browser, url, names[0], texts)
        if len(texts) < 257:
            with pytest.raises(BitFitError, match=message):
                python.run(names[0], texts)
    with pytest.raises(BrowserError, match="pairs of texts"):
        page_predict(browser, url, names[2], ["the movie"])
    with pytest.raises(BrowserError, match="unknown task"):
        page_predict(browser, url, "nope", ["the movie"])


@pytest.mark.parametrize("variant", [{"quantize": "int8"}, {"fuse": True}, {"fp16": True}])
def test_every_compiled_variant_runs_in_the_page(browser, bert_model, pack_all, tmp_path, variant):
    """int8 weights (onnxruntime's int8 kernels), fused kernels and fp16 weights: onnxruntime-web's wasm build runs
    each, equal to Python onnxruntime on the same compiled directory."""
    compiled = compile_model(bert_model, tmp_path / "compiled", log=QUIET["log"], **variant)
    python = TaskSession(compiled)
    task = python.register(pack_all)
    site = export_web(compiled, [pack_all], tmp_path / "site")
    assert site["graph"]["precision"] == json.loads((compiled / "manifest.json").read_text())["precision"]
    with serve_site(tmp_path / "site") as address:
        page = page_predict(browser, address, task, TEXTS)
    want = python.run(task, TEXTS)
    assert page["labels"] == want.labels
    assert np.abs(np.array([r["logits"] for r in page["records"]]) - want.logits).max() < TOL


def _blocked(blocked: tuple[str, ...], argv: list[str]):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        sys.meta_path.insert(0, Blocker())
        from bitfit.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_export_web_needs_no_torch(bert_compiled, pack_all, tmp_path):
    """A web export is a build step beside compile, but without torch: onnx and onnx-ir only ([web])."""
    argv = ["export-web", "--compiled", str(bert_compiled), str(pack_all), "--out", str(tmp_path / "s")]
    proc = _blocked(("torch", "transformers", "onnxscript"), argv)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s" / SITE_FILE).read_text())["tasks"][0]["name"] == load_pack(pack_all).name
    proc = _blocked(("torch", "onnx_ir"), argv[:-1] + [str(tmp_path / "t")])
    assert proc.returncode == 2 and "pip install 'bitfit-deploy[web]'" in proc.stderr, proc.stderr


def test_a_task_costs_the_same_at_any_count(bert_compiled, pack_all, tmp_path, monkeypatch):
    """At 2 or 40 tasks: the graph is written once, the compiled directory opened once, and each task adds the
    same bytes to the site and to site.json (nothing per task grows with the count: 10,000 tasks stay linear)."""
    import bitfit.exporters.web as web

    opened = []
    real_open = web.CompiledModel.open
    monkeypatch.setattr(web.CompiledModel, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    base = load_pack(pack_all)

    def packs(n: int) -> list:
        out = []
        for i in range(n):
            p = load_pack(pack_all)
            p.manifest.task = f"task{i:04d}"
            p.tensors = {k: v + np.float32(i * 1e-3) if k == "head.bias" else v for k, v in base.tensors.items()}
            out.append(p)
        return out

    sizes = {}
    for n in (2, 40):
        site = tmp_path / f"s{n}"
        export_web(bert_compiled, packs(n), site)
        assert len(list((site / "model").glob("model.*.onnx"))) == 1
        task_bytes = [f.stat().st_size for f in (site / "tasks").iterdir()]
        assert len(task_bytes) == 2 * n
        sizes[n] = ((site / SITE_FILE).stat().st_size, sum(task_bytes))
    assert opened == [1, 1]
    per_index = (sizes[40][0] - sizes[2][0]) / 38
    assert per_index < 400  # bytes of site.json per task
    assert abs(sizes[40][1] / 40 - sizes[2][1] / 2) < 64  # bytes of a task's two files


def test_an_insecure_page_refuses_to_load(browser, site):
    """Served over plain http from an address that is not loopback, browsers offer no crypto.subtle: the page
    must refuse to load (it cannot check a digest), saying how to serve it, rather than skip its checks."""
    import subprocess

    addresses = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
                 if "." in a and not a.startswith("127.")]
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to serve an insecure page from")
    with serve_site(site, host=addresses[0]) as address:
        browser.call("goto", url=address)
        browser.call("wait", selector="#error", text="not in a secure context")
        assert browser.call("eval", js="async () => window.isSecureContext") is False


@pytest.mark.parametrize("kwargs, message", [
    ({"packs": "packs/x"}, "packs must be"),
    ({"title": 5}, "title must be"),
    ({"overwrite": "yes"}, "overwrite must be"),
    ({"out": None}, "out must be"),
])
def test_bad_arguments_are_refused_at_the_door(bert_compiled, pack_all, tmp_path, kwargs, message):
    call = {"compiled_dir": bert_compiled, "packs": [pack_all], "out": tmp_path / "s", **kwargs}
    with pytest.raises(BitFitError, match=message):
        export_web(**call)
    assert not (tmp_path / "s").exists()
    with pytest.raises(BitFitError, match="port must be"):
        with serve_site(tmp_path, port=70000):
            pass
