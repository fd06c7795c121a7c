"""The HTTP server (bitfit.serve) and its dynamic batcher (bitfit.serve.batcher), on tiny BERT packs.

Every endpoint, every kind of bad request, predictions equal to `bitfit predict --json`, concurrent
requests of several tasks batched together, and hot reloads of the packs directory (including under
traffic and with a corrupt pack).
"""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from bitfit.runtime import TaskSession, load_pack, read_pack_manifest, save_pack
from bitfit.runtime.errors import BitFitError
from bitfit.runtime.pack import TENSORS_FILE
from starlette.testclient import TestClient

from bitfit.cli import main
from bitfit.serve import ServeConfig, create_app
from bitfit.serve.batcher import Batcher

ATOL = 1e-4  # batching changes padding, which moves logits by ~1e-6
WORDS = "good bad great awful movie film plot actor love hate fun boring what who the city money".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def packs(trained_pack) -> dict[str, Path]:
    """Three tasks (single sentences, sentence pairs, regression) and a fourth pack for hot swaps."""
    return {
        "single": trained_pack("bert", "all"),
        "pairs": trained_pack("bert", "all", data="pairs"),
        "scores": trained_pack("bert", "all", data="scores"),
        "other": trained_pack("bert", "all", seed=1, epochs=1),
    }


@pytest.fixture(scope="module")
def names(packs) -> dict[str, str]:
    return {k: read_pack_manifest(p).task for k, p in packs.items()}


@pytest.fixture(scope="module")
def graphs(bert_compiled, bert_model, tmp_path_factory) -> dict[str, Path]:
    """The plain graph (one pass per task in a batch) and a mixed one (all tasks of a batch in one pass)."""
    from bitfit.compiler.compile import compile as compile_model

    mixed = tmp_path_factory.mktemp("serve-mixed") / "graph"
    compile_model(bert_model, mixed, mixed=True, log=lambda s: None)
    return {"plain": bert_compiled, "mixed": mixed}


@pytest.fixture(scope="module")
def reference(bert_compiled, packs) -> TaskSession:
    """Expected results: each pack registered under its key, run one request at a time."""
    session = TaskSession(bert_compiled, threads=1)
    for key, path in packs.items():
        session.register(path, name=key)
    return session


def expect(reference: TaskSession, key: str, texts, pairs=None) -> list[dict]:
    return reference.run(key, texts, pairs).records()


def same(got: list[dict], want: list[dict], atol: float = ATOL) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if set(g) != {"label", "scores", "logits"} or g["label"] != pytest.approx(w["label"], abs=atol):
            return False
        if not np.allclose(g["logits"], w["logits"], atol=atol, rtol=0):
            return False
        if g["scores"].keys() != w["scores"].keys():
            return False
    return True


@pytest.fixture
def packs_dir(tmp_path, packs) -> Path:
    root = tmp_path / "packs"
    root.mkdir()
    for key in ("single", "pairs", "scores"):
        shutil.copytree(packs[key], root / key)
    return root


def make_app(compiled: Path, packs_dir: Path | None, **limits):
    session = TaskSession(compiled, threads=1)
    return create_app(session, packs_dir, ServeConfig(**limits))


@pytest.fixture
def client(bert_compiled, packs_dir):
    with TestClient(make_app(bert_compiled, packs_dir)) as c:
        yield c


def renamed(path: Path, task: str) -> object:
    """The pack at `path`, declared as task `task` (what retraining a task gives: same name, new numbers)."""
    pack = load_pack(path)
    pack.manifest.task = task
    return pack


# -- endpoints ----------------------------------------------------------------------------------------
def test_tasks_health_and_initial_load(client, names):
    tasks = client.get("/v1/tasks").json()["tasks"]
    by_name = {t["name"]: t for t in tasks}
    assert set(by_name) == {names["single"], names["pairs"], names["scores"]}
    assert all(set(t) == {"name", "task_kind", "labels", "text_pair", "max_length", "digest"} for t in tasks)
    single, pairs, scores = by_name[names["single"]], by_name[names["pairs"]], by_name[names["scores"]]
    assert single["digest"] == client.app.state.session.pack(names["single"]).digest()
    assert single["task_kind"] == "classification" and sorted(single["labels"]) == ["negative", "positive"]
    assert pairs["text_pair"] is True and single["text_pair"] is False
    assert scores["task_kind"] == "regression" and isinstance(single["max_length"], int)
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "tasks": 3}
    initial = client.app.state.initial_load.to_json()
    assert sorted(initial["added"]) == sorted(by_name) and not initial["refused"]


def test_predict_equals_bitfit_predict_json(client, bert_compiled, packs, names, capsys):
    cases = [
        ("single", ["a good fun movie", "awful boring plot", "who is the actor"], None),
        ("pairs", ["the movie was good", "where is the city"], ["the movie was good", "not a prize"]),
        ("scores", ["love love great", "hate"], None),
    ]
    for key, texts, pairs in cases:
        argv = ["predict", "--compiled", str(bert_compiled), "--pack", str(packs[key]), "--json"]
        for i, t in enumerate(texts):
            argv += ["--text", t] + (["--text-pair", pairs[i]] if pairs else [])
        assert main(argv) == 0
        cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        body = {"task": names[key], "texts": texts} | ({"text_pairs": pairs} if pairs else {})
        r = client.post("/v1/predict", json=body)
        assert r.status_code == 200, r.text
        assert r.json() == {"predictions": cli}  # the same numbers, bit for bit


def test_metrics(client, names):
    client.post("/v1/predict", json={"task": names["single"], "texts": ["good", "bad"]})
    client.post("/v1/predict", json={"task": "nope", "texts": ["good"]})
    client.get("/healthz")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'bitfit_requests_total{endpoint="/v1/predict",status="200"} 1.0' in text
    assert 'bitfit_requests_total{endpoint="/v1/predict",status="404"} 1.0' in text
    assert 'bitfit_requests_total{endpoint="/healthz",status="200"} 1.0' in text
    assert "bitfit_batch_rows_bucket" in text and "bitfit_batch_rows_sum 2.0" in text
    assert 'bitfit_request_seconds_count{endpoint="/v1/predict"} 2.0' in text
    assert "bitfit_batch_seconds_count 1.0" in text and "bitfit_tasks 3.0" in text


def test_unknown_route_and_method_answer_json(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


# -- bad requests -------------------------------------------------------------------------------------
BAD = [
    # (name, body: raw bytes or a JSON value with TASK/PAIRS placeholders, status, message part)
    ("not json", b"{task:", 400, "invalid JSON"),
    ("empty body", b"", 400, "invalid JSON"),
    ("not utf-8", b"\xff\xfe{", 400, "invalid JSON"),
    ("a list", [], 422, "must be a JSON object"),
    ("no texts", {"task": "SINGLE"}, 422, "missing field 'texts'"),
    ("no task", {"texts": ["good"]}, 422, "missing field 'task'"),
    ("task not a string", {"task": 3, "texts": ["good"]}, 422, "task must be a non-empty string"),
    ("texts a string", {"task": "SINGLE", "texts": "good"}, 422, "texts must be a list of strings"),
    ("a text not a string", {"task": "SINGLE", "texts": ["good", 5]}, 422, "texts[1] must be a string"),
    ("unknown field", {"task": "SINGLE", "text": ["good"]}, 422, "unknown fields ['text']"),
    ("unknown task", {"task": "nope", "texts": ["good"]}, 404, "unknown task 'nope': registered tasks are "),
    ("empty texts", {"task": "SINGLE", "texts": []}, 422, "texts is empty"),
    ("empty string", {"task": "SINGLE", "texts": ["good", ""]}, 422, "texts[1] is empty"),
    ("blank string", {"task": "SINGLE", "texts": ["   "]}, 422, "texts[0] is empty"),
    ("too many texts", {"task": "SINGLE", "texts": ["good"] * 5}, 413, "over the limit of 4 per request"),
    ("text too long", {"task": "SINGLE", "texts": ["good " * 10]}, 413, "texts[0] has 50 characters, over the"),
    ("pair too long", {"task": "PAIRS", "texts": ["a"], "text_pairs": ["b" * 41]}, 413, "text_pairs[0] has 41"),
    ("pairs not a list", {"task": "PAIRS", "texts": ["good"], "text_pairs": "bad"}, 422,
     "text_pairs must be a list"),
    ("pairs too few", {"task": "PAIRS", "texts": ["good", "bad"], "text_pairs": ["x"]}, 422,
     "text_pairs has 1 items but texts has 2"),
    ("pairs for single", {"task": "SINGLE", "texts": ["good"], "text_pairs": ["bad"]}, 422,
     "takes single sentences: do not give text_pairs"),
    ("no pairs for pairs", {"task": "PAIRS", "texts": ["good"]}, 422, "takes sentence pairs: give text_pairs"),
]


@pytest.fixture
def strict_client(bert_compiled, packs_dir):
    with TestClient(make_app(bert_compiled, packs_dir, max_texts=4, max_text_chars=40)) as c:
        yield c


@pytest.mark.parametrize("body,status,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests(strict_client, names, body, status, message):
    if isinstance(body, bytes):
        r = strict_client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    else:
        raw = json.dumps(body).replace('"SINGLE"', json.dumps(names["single"])).replace('"PAIRS"',
                                                                                         json.dumps(names["pairs"]))
        r = strict_client.post("/v1/predict", content=raw.encode())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error
    if status == 404:
        assert names["single"] in error and names["pairs"] in error  # the known tasks are listed
    assert strict_client.get("/healthz").status_code == 200  # still serving


def test_body_too_large_and_bad_limits(bert_compiled, packs_dir, names):
    with TestClient(make_app(bert_compiled, packs_dir, max_body_bytes=1000)) as c:
        r = c.post("/v1/predict", json={"task": names["single"], "texts": ["good " * 300]})
        assert r.status_code == 413 and "over the limit of 1000 bytes" in r.json()["error"]
    with pytest.raises(BitFitError, match="max_texts must be a positive integer"):
        ServeConfig(max_texts=0)
    with pytest.raises(BitFitError, match="unknown server limits"):
        ServeConfig.from_limits(max_txts=3)


# -- batching -----------------------------------------------------------------------------------------
def workload(names: dict[str, str], n: int, seed: int = 0) -> list[tuple[str, list[str], list[str] | None]]:
    """n requests of 1-4 texts over the three tasks, as (key, texts, pairs)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = ("single", "pairs", "scores")[i % 3]
        texts = sentences(rng.randint(1, 4), seed * 1000 + i)
        out.append((key, texts, sentences(len(texts), seed * 1000 + i + 500) if key == "pairs" else None))
    return out


async def post_all(app, names, requests) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        async def one(key, texts, pairs):
            body = {"task": names[key], "texts": texts} | ({"text_pairs": pairs} if pairs else {})
            return await c.post("/v1/predict", json=body)

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(*r) for r in requests)), 60)
        finally:
            await app.state.batcher.stop()


@pytest.mark.parametrize("graph", ["plain", "mixed"])
def test_concurrent_requests_are_batched_across_tasks(graphs, graph, packs_dir, names, reference):
    app = make_app(graphs[graph], packs_dir, max_batch_rows=16, max_wait_ms=20)
    assert app.state.session.mixed == (graph == "mixed")
    requests = workload(names, 50)
    requests.append(("single", sentences(40, 99), None))  # larger than max_batch_rows: served alone
    responses = asyncio.run(post_all(app, names, requests))
    for (key, texts, pairs), r in zip(requests, responses):
        assert r.status_code == 200, r.text
        assert same(r.json()["predictions"], expect(reference, key, texts, pairs)), (key, texts)
    stats = app.state.batcher.stats
    assert stats.requests == 51 and stats.rows == sum(len(t) for _, t, _ in requests)
    assert stats.mixed_batches >= 1 and stats.max_tasks >= 2
    assert stats.batches < 51  # requests really were merged
    assert all(b.rows <= 16 or b.requests == 1 for b in stats.recent)
    assert stats.max_rows == 40


def test_batching_off_runs_each_request_alone(bert_compiled, packs_dir, names, reference):
    app = make_app(bert_compiled, packs_dir, batching=False)
    requests = workload(names, 12, seed=1)
    responses = asyncio.run(post_all(app, names, requests))
    for (key, texts, pairs), r in zip(requests, responses):
        assert r.status_code == 200 and same(r.json()["predictions"], expect(reference, key, texts, pairs))
    stats = app.state.batcher.stats
    assert stats.batches == 12 and stats.mixed_batches == 0 and all(b.requests == 1 for b in stats.recent)


def test_a_failing_request_does_not_fail_its_batch(bert_compiled, packs, reference):
    session = TaskSession(bert_compiled, threads=1)
    session.register(packs["single"], name="single")
    real = session.run_mixed

    def run_mixed(rows):
        if any(row[1] == "poison" for row in rows):
            raise RuntimeError("poisoned row")
        return real(rows)

    session.run_mixed = run_mixed
    batcher = Batcher(session, max_batch_rows=64, max_wait_ms=50)

    async def go():
        try:
            return await asyncio.gather(
                batcher.submit("single", ["good movie"]),
                batcher.submit("single", ["poison"]),
                batcher.submit("single", ["bad plot", "fun"]),
                batcher.submit("single", ["x"], ["y"]),  # pairs for a single-sentence task: refused alone
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    good, poisoned, more, paired = asyncio.run(go())
    batcher.close()
    assert all(r.pop("task") == "single" for r in good + more)  # run_mixed's records, task included
    assert all(r.pop("digest") == session.digest("single") for r in good + more)  # and the pack that answered
    assert same(good, expect(reference, "single", ["good movie"]))
    assert same(more, expect(reference, "single", ["bad plot", "fun"]))
    # each request gets the error it raised, unchanged: the server maps types to statuses in one place
    assert type(poisoned) is RuntimeError and "poisoned row" in str(poisoned)
    assert isinstance(paired, BitFitError) and "single sentences" in str(paired)
    assert batcher.stats.failed_batches == 1


def test_shutdown_joins_the_inference_thread_and_later_requests_get_503(bert_compiled, packs_dir, names):
    app = make_app(bert_compiled, packs_dir)
    body = {"task": names["single"], "texts": ["good fun"]}
    with TestClient(app) as c:
        assert c.post("/v1/predict", json=body).status_code == 200
        workers = list(app.state.batcher._executor._threads)  # this app's inference thread
        assert workers and all(t.is_alive() for t in workers)
    assert not any(t.is_alive() for t in workers)  # the lifespan's end joined the inference thread

    async def after_shutdown():  # no lifespan here: the app as the server left it
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/predict", json=body), await client.post(
                "/v1/tokens", json={"task": names["single"], "texts": ["x"]})

    predict, tokens = asyncio.run(after_shutdown())
    assert predict.status_code == tokens.status_code == 503
    assert "shutting down" in predict.json()["error"]
    with TestClient(app) as c:  # served again: a new inference thread
        assert c.post("/v1/predict", json=body).status_code == 200


# -- reloads ------------------------------------------------------------------------------------------
def test_reload_swaps_a_pack_and_refuses_bad_ones(client, packs_dir, packs, names, reference):
    task, texts = names["single"], ["a good fun movie", "awful boring plot"]
    old, new = expect(reference, "single", texts), expect(reference, "other", texts)
    assert not same(old, new, atol=1e-3)

    def predict():
        r = client.post("/v1/predict", json={"task": task, "texts": texts})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    assert same(predict(), old)
    r = client.post("/v1/admin/reload", json={}).json()
    assert r == {"added": [], "replaced": [], "unchanged": sorted(names[k] for k in ("single", "pairs", "scores")),
                 "refused": {}, "missing": [], "clashes": {}}

    # a new pack appears; the served pack's files are replaced by another pack of the same task
    save_pack(renamed(packs["other"], "extra"), packs_dir / "extra")
    save_pack(renamed(packs["other"], task), packs_dir / "single", overwrite=True)
    r = client.post("/v1/admin/reload", json={}).json()
    assert r["added"] == ["extra"] and r["replaced"] == [task] and not r["refused"]
    assert same(predict(), new)

    # corrupt the served pack, add a pack of another base model and a directory that is no pack
    tensors = packs_dir / "single" / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-100])
    alien = renamed(packs["single"], "alien")
    alien.manifest.base_fingerprint = "0" * 64
    save_pack(alien, packs_dir / "alien")
    (packs_dir / "junk").mkdir()
    (packs_dir / "junk" / "manifest.json").write_text("{not json")
    (packs_dir / "notes").mkdir()  # no manifest: not a pack, ignored
    r = client.post("/v1/admin/reload", json={})
    assert r.status_code == 200
    refused = r.json()["refused"]
    assert set(refused) == {task, "alien", "junk"}
    assert "does not match the checksum" in refused[task]
    assert "trained on base model" in refused["alien"] and "not valid JSON" in refused["junk"]
    assert same(predict(), new)  # the version that was served keeps serving
    assert client.get("/healthz").json() == {"status": "ok", "tasks": 4}
    assert "alien" not in {t["name"] for t in client.get("/v1/tasks").json()["tasks"]}

    # two packs declaring one task: the one served stays, the other is refused; a removed pack keeps serving
    shutil.rmtree(packs_dir / "single")
    shutil.copytree(packs_dir / "extra", packs_dir / "extra-copy")
    r = client.post("/v1/admin/reload", json={}).json()
    assert "declared by several packs" in r["refused"]["extra-copy"] and r["missing"] == [task]
    assert r["clashes"] == {"extra": {"serving": "extra", "ignored": ["extra-copy"]}}
    assert same(predict(), new)
    metrics = client.get("/metrics").text
    assert 'bitfit_reloads_total{outcome="replaced"} 1.0' in metrics
    assert 'bitfit_reloads_total{outcome="refused"}' in metrics


def test_reload_without_packs_dir(bert_compiled, packs):
    session = TaskSession(bert_compiled, threads=1)
    session.register(packs["single"])
    with TestClient(create_app(session, None, ServeConfig())) as c:
        assert c.post("/v1/admin/reload", json={}).status_code == 409
        assert c.get("/healthz").json()["tasks"] == 1


@pytest.mark.parametrize("graph", ["plain", "mixed"])
def test_requests_during_a_reload_get_the_old_or_the_new_pack(graphs, graph, packs_dir, packs, names, reference):
    app = make_app(graphs[graph], packs_dir, max_batch_rows=8, max_wait_ms=2)
    task = names["single"]
    pool = [sentences(2, 7000 + i) for i in range(8)]
    old = [expect(reference, "single", t) for t in pool]
    new = [expect(reference, "other", t) for t in pool]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            async def one(i):
                r = await c.post("/v1/predict", json={"task": task, "texts": pool[i % 8]})
                return i, r

            async def swap(pending):
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)  # some answered: old pack
                save_pack(renamed(packs["other"], task), packs_dir / "single", overwrite=True)
                r = await c.post("/v1/admin/reload", json={})
                return r.json()

            try:
                before = [asyncio.ensure_future(one(i)) for i in range(60)]
                result = await swap(before)
                after = [asyncio.ensure_future(one(i)) for i in range(16)]
                return result, await asyncio.gather(*before), await asyncio.gather(*after)
            finally:
                await app.state.batcher.stop()

    result, before, after = asyncio.run(asyncio.wait_for(go(), 60))
    assert result["replaced"] == [task]
    kinds = []
    for i, r in before:
        got = r.json()["predictions"]
        is_old, is_new = same(got, old[i % 8]), same(got, new[i % 8])
        assert is_old or is_new, f"request {i}: neither the old nor the new pack's result"
        kinds.append("old" if is_old else "new")
    assert "old" in kinds
    for i, r in after:
        assert same(r.json()["predictions"], new[i % 8]), f"request {i} after the reload"


# -- the command ---------------------------------------------------------------------------------------
def test_serve_command_refuses_to_start(bert_compiled, packs_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", "--compiled", str(bert_compiled), "--packs", str(empty)]) == 2
    assert "no valid task pack in" in capsys.readouterr().err
    assert main(["serve", "--compiled", str(bert_compiled), "--packs", str(tmp_path / "absent")]) == 2
    assert "no packs directory at" in capsys.readouterr().err
    assert main(["serve", "--compiled", str(tmp_path), "--packs", str(packs_dir)]) == 2
    assert "is not a complete compiled model" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(packs_dir / "single", bad / "single")
    (bad / "single" / TENSORS_FILE).write_bytes(b"garbage")
    assert main(["serve", "--compiled", str(bert_compiled), "--packs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "checksum" in err and "no valid task pack" in err
    with pytest.raises(SystemExit) as exit_:  # a bad flag value: argparse's exit 2, before anything loads
        main(["serve", "--compiled", str(bert_compiled), "--packs", str(packs_dir), "--max-texts", "0"])
    assert exit_.value.code == 2 and "argument --max-texts: must be at least 1, got 0" in capsys.readouterr().err


def test_serve_command_listens_on_loopback(bert_compiled, packs_dir, names):
    """`bitfit serve` in a subprocess: it answers on 127.0.0.1, and is always terminated."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bitfit.cli", "serve", "--compiled", str(bert_compiled),
                             "--packs", str(packs_dir), "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"{url}/v1/predict", json={"task": names["single"], "texts": ["good fun"]}, timeout=10)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
    assert "3 tasks" in out and f"http://127.0.0.1:{port}" in out and "1 onnxruntime threads" in out


def test_server_imports_no_torch():
    from test_no_torch import run_blocked

    proc = run_blocked("""
        import sys
        import bitfit.serve.app, bitfit.serve.batcher, bitfit.serve.packdir, bitfit.cli
        blocked = ("torch", "transformers", "onnx", "onnx_ir", "onnxscript")
        print(sorted(m for m in sys.modules if m.split(".")[0] in blocked))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- token classification and QA --------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_packs(bert_model, tmp_path_factory) -> dict[str, Path]:
    from bitfit.training.train import train
    from head_data import write_qa_data, write_token_data

    root = tmp_path_factory.mktemp("serve-heads")
    tags = train(bert_model, write_token_data(root / "tags.jsonl"), root / "tags", epochs=2, lr=5e-3, batch_size=8,
                 task_name="tags", log=lambda *_: None, progress=False).pack_path
    qa = train(bert_model, write_qa_data(root / "qa.jsonl"), root / "qa", epochs=2, lr=5e-3, batch_size=8,
               task_kind="question-answering", task_name="qa", log=lambda *_: None, progress=False).pack_path
    return {"tags": Path(tags), "qa": Path(qa)}


@pytest.mark.parametrize("graph", ["plain", "mixed"])
def test_token_and_qa_tasks_are_served_as_the_session_runs_them(graphs, graph, packs_dir, head_packs):
    for key, path in head_packs.items():
        shutil.copytree(path, packs_dir / key)
    session = TaskSession(graphs[graph], threads=1)
    for path in head_packs.values():
        session.register(path)
    texts = ["the movie in the city", "zorbex love plot"]
    questions, contexts = ["what is the answer ?"] * 2, ["good fun answer movie plot", "city answer year day"]
    with TestClient(make_app(graphs[graph], packs_dir)) as c:
        kinds = {t["name"]: t["task_kind"] for t in c.get("/v1/tasks").json()["tasks"]}
        assert kinds["tags"] == "token-classification" and kinds["qa"] == "question-answering"
        assert not c.app.state.initial_load.refused

        r = c.post("/v1/tokens", json={"task": "tags", "texts": texts})
        assert r.status_code == 200, r.text
        got, want = r.json()["predictions"], session.run_tokens("tags", texts).records()
        assert [g["tokens"] for g in got] == [w["tokens"] for w in want] == [t.split() for t in texts]
        assert [g["labels"] for g in got] == [w["labels"] for w in want]
        assert [g["offsets"] for g in got] == [w["offsets"] for w in want]
        np.testing.assert_allclose([s for g in got for s in g["scores"]], [s for w in want for s in w["scores"]],
                                   rtol=0, atol=ATOL)

        r = c.post("/v1/answer", json={"task": "qa", "questions": questions, "contexts": contexts})
        assert r.status_code == 200, r.text
        got, want = r.json()["answers"], session.answer("qa", questions, contexts).records()
        assert [(g["answer"], g["start"], g["end"]) for g in got] == [(w["answer"], w["start"], w["end"]) for w in want]
        assert all(ctx[g["start"]:g["end"]] == g["answer"] for g, ctx in zip(got, contexts))
        np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], rtol=0, atol=ATOL)

        # each kind has its endpoint, and a request to another one is told which
        for path, body, right in (
            ("/v1/predict", {"task": "tags", "texts": texts}, "/v1/tokens"),
            ("/v1/predict", {"task": "qa", "texts": texts}, "/v1/answer"),
            ("/v1/tokens", {"task": "qa", "texts": texts}, "/v1/answer"),
            ("/v1/answer", {"task": "tags", "questions": texts, "contexts": texts}, "/v1/tokens"),
        ):
            r = c.post(path, json=body)
            assert r.status_code == 422 and f"POST it to {right}" in r.json()["error"], (path, r.text)
        for path, body, status, message in (
            ("/v1/tokens", {"task": "nope", "texts": texts}, 404, "nope"),
            ("/v1/tokens", {"task": "tags", "texts": []}, 422, "texts is empty"),
            ("/v1/tokens", {"task": "tags", "texts": texts, "text_pairs": texts}, 422, "unknown fields"),
            ("/v1/answer", {"task": "qa", "questions": questions}, 422, "missing field 'contexts'"),
            ("/v1/answer", {"task": "qa", "questions": questions, "contexts": contexts[:1]}, 422,
             "one context per question"),
            ("/v1/answer", {"task": "qa", "questions": questions, "contexts": ["x", ""]}, 422, "contexts[1] is empty"),
        ):
            r = c.post(path, json=body)
            assert r.status_code == status and message in r.json()["error"], (path, body, r.text)
        # sequence requests still batch beside them
        r = c.post("/v1/predict", json={"task": read_pack_manifest(packs_dir / "single").task, "texts": texts})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        metrics = c.get("/metrics").text
        assert 'bitfit_requests_total{endpoint="/v1/tokens",status="200"} 1.0' in metrics
        assert 'bitfit_requests_total{endpoint="/v1/answer",status="200"} 1.0' in metrics


def test_a_periodic_rescan_picks_up_a_new_pack_version(bert_compiled, packs_dir, packs, names):
    """reload_every_s: the server rescans on its own (what a replica that missed a reload relies on)."""
    with TestClient(make_app(bert_compiled, packs_dir, reload_every_s=0.2)) as c:
        before = {t["name"]: t["digest"] for t in c.get("/v1/tasks").json()["tasks"]}
        new = renamed(packs["other"], names["single"])
        save_pack(new, packs_dir / "single", overwrite=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = {t["name"]: t["digest"] for t in c.get("/v1/tasks").json()["tasks"]}
            if now[names["single"]] != before[names["single"]]:
                break
            time.sleep(0.1)
        assert now[names["single"]] == new.digest() and now[names["pairs"]] == before[names["pairs"]]
    with pytest.raises(BitFitError, match="reload_every_s must be 0"):
        ServeConfig(reload_every_s=-1)
