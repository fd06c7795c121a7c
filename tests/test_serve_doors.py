"""The server's doors (issue 12): hostile bodies get a 4xx and the server keeps serving; the admin route
refuses cross-site and unauthenticated calls; a loopback server answers loopback names only; slow clients
are cut off; one bad pack never takes down what already serves."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from bitfit.runtime import TaskSession, read_pack_manifest
from bitfit.runtime.pack import MANIFEST_FILE
from conftest import write_sealed
from starlette.testclient import TestClient

from bitfit.serve import ServeConfig, create_app

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture
def packs_dir(tmp_path, pack_all, pack_pairs) -> Path:
    root = tmp_path / "packs"
    root.mkdir()
    shutil.copytree(pack_all, root / "single")
    shutil.copytree(pack_pairs, root / "pairs")
    return root


def make(compiled, packs_dir, **config):
    return create_app(TaskSession(compiled, threads=1), packs_dir, ServeConfig(**config))


@pytest.fixture
def client(bert_compiled, packs_dir):
    with TestClient(make(bert_compiled, packs_dir, admin_token=TOKEN)) as c:
        yield c


def task_of(packs_dir: Path, name: str = "single") -> str:
    return read_pack_manifest(packs_dir / name).task


HOSTILE = [
    # (name, path, raw body, status, part of the error)
    ("bad json", "/v1/predict", b'{"task": ', 400, "invalid JSON"),
    ("not utf-8", "/v1/predict", b'\xff{"a"}', 400, "invalid JSON"),
    ("5,000-digit integer", "/v1/predict", b'{"task": "x", "texts": ["a"], "n": ' + b"9" * 5000 + b"}", 400,
     "invalid JSON: Exceeds the limit"),
    ("deep nesting", "/v1/predict", b"[" * 100_000 + b"]" * 100_000, 400, "invalid JSON"),
    ("lone surrogate", "/v1/answer", b'{"task": "QA", "questions": ["\\ud800?"], "contexts": ["a b c"]}', 422,
     "questions[0] is not valid Unicode"),
    ("surrogate in texts", "/v1/predict", b'{"task": "SINGLE", "texts": ["ok \\udfff"]}', 422,
     "texts[0] is not valid Unicode"),
    ("empty text", "/v1/predict", b'{"task": "SINGLE", "texts": [""]}', 422, "texts[0] is empty"),
    ("invisible text", "/v1/predict", b'{"task": "SINGLE", "texts": ["good", "\\u200b\\u2060"]}', 422,
     "texts[1] gives no token"),
    ("control characters", "/v1/predict", b'{"task": "SINGLE", "texts": ["\\u0000\\u0001"]}', 422, "gives no token"),
    ("a number for a task", "/v1/predict", b'{"task": 5, "texts": ["a"]}', 422, "task must be a non-empty string"),
    ("an object for texts", "/v1/predict", b'{"task": "SINGLE", "texts": {"a": 1}}', 422, "texts must be a list"),
]


@pytest.mark.parametrize("path, body, status, message", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_4xx_and_the_server_keeps_serving(client, packs_dir, path, body, status, message):
    body = body.replace(b'"SINGLE"', json.dumps(task_of(packs_dir)).encode()).replace(b'"QA"', b'"nope"')
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    if message.startswith("questions[0]"):  # no QA pack here: the task check comes first, as it should
        assert r.status_code == 404, r.text
    else:
        assert r.status_code == status and message in r.json()["error"], r.text
    assert client.get("/healthz").status_code == 200


def test_a_lone_surrogate_reaches_the_qa_validator(bert_compiled, tmp_path, packs_dir, bert_model, head_data):
    from bitfit.training.train import train

    train(bert_model, head_data["qa"], packs_dir / "qa", epochs=1, batch_size=8, task_kind="question-answering",
          task_name="qa", progress=False, log=lambda s: None)
    with TestClient(make(bert_compiled, packs_dir)) as c:
        r = c.post("/v1/answer", content=b'{"task": "qa", "questions": ["\\ud800?"], "contexts": ["a b"]}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 422 and "questions[0] is not valid Unicode" in r.json()["error"]


@pytest.fixture(scope="module")
def head_data(tmp_path_factory):
    from head_data import write_qa_data

    root = tmp_path_factory.mktemp("doors-data")
    return {"qa": write_qa_data(root / "qa.jsonl", n=24)}


def test_the_admin_route_refuses_cross_site_and_unauthenticated_calls(client):
    reload = "/v1/admin/reload"
    auth = {"authorization": f"Bearer {TOKEN}"}
    # what a web page can send without asking: a simple POST, text/plain, its own Origin
    r = client.post(reload, content=b"{}", headers={**auth, "content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = client.post(reload, json={}, headers={**auth, "origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site request" in r.json()["error"]
    r = client.post(reload, json={})
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
    r = client.post(reload, json={}, headers={"authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401
    r = client.post(reload, json={}, headers={**auth, "origin": "http://testserver"})  # its own origin
    assert r.status_code == 200 and r.json()["unchanged"]
    r = client.post("/v1/predict", json={"task": "x", "texts": ["a"]}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403  # predictions are not for foreign pages either


def test_a_loopback_server_answers_loopback_names_only(bert_compiled, packs_dir):
    """DNS rebinding: a page whose own name resolves to 127.0.0.1 sends that name as Host."""
    with TestClient(make(bert_compiled, packs_dir, allowed_hosts=("127.0.0.1", "localhost", "::1"))) as c:
        assert c.get("/healthz", headers={"host": "evil.example:8000"}).status_code == 403
        assert c.get("/v1/tasks", headers={"host": "rebind.attacker.test"}).status_code == 403
        for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host


def test_a_slow_body_is_answered_408(bert_compiled, packs_dir):
    app = make(bert_compiled, packs_dir, body_timeout_s=0.3)

    async def trickle():
        yield b'{"task": "x", '
        await asyncio.sleep(3)
        yield b'"texts": ["a"]}'

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            start = time.monotonic()
            r = await c.post("/v1/predict", content=trickle(), headers={"content-type": "application/json"})
            return r, time.monotonic() - start

    r, seconds = asyncio.run(go())
    assert r.status_code == 408 and "did not arrive within 0.3 s" in r.json()["error"] and seconds < 3


def test_one_bad_pack_never_takes_down_what_serves(bert_compiled, packs_dir):
    """A pack whose task is a number (resealed, so only the schema can catch it), beside good ones."""
    bad = packs_dir / "bad"
    shutil.copytree(packs_dir / "single", bad)
    data = json.loads((bad / MANIFEST_FILE).read_text())
    write_sealed(bad / MANIFEST_FILE, {**data, "task": 12})
    with TestClient(make(bert_compiled, packs_dir)) as c:
        assert "bad" in c.app.state.initial_load.refused
        for path in ("/healthz", "/v1/tasks", "/metrics"):
            assert c.get(path).status_code == 200, path
        r = c.post("/v1/admin/reload", json={})
        assert r.status_code == 200 and "task must be 1 to 64 letters" in r.json()["refused"]["bad"]
        assert c.post("/v1/predict", json={"task": task_of(packs_dir), "texts": ["good"]}).status_code == 200


# -- the command, in a process of its own ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bert_compiled, packs_dir, *flags, env=None):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bitfit.cli", "serve", "--compiled", str(bert_compiled), "--packs",
                             str(packs_dir), "--port", str(port), "--threads", "1", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.communicate()[0]}")


def stop(proc) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=10)[0]


def test_half_a_header_is_cut_off_and_connections_are_capped(bert_compiled, packs_dir):
    proc, port = start(bert_compiled, packs_dir, "--header-timeout", "1", "--max-connections", "3")
    try:
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
        slow.settimeout(10)
        start_wait = time.monotonic()
        assert slow.recv(100) == b""  # the server closed it
        assert time.monotonic() - start_wait < 5
        slow.close()
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.3)
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert r.status_code == 503  # over the cap: answered, not queued forever
        for s in held:
            s.close()
        time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        stop(proc)


def test_a_network_server_needs_an_admin_token(bert_compiled, packs_dir, monkeypatch):
    from bitfit.cli import main

    monkeypatch.delenv("BITFIT_ADMIN_TOKEN", raising=False)
    assert main(["serve", "--compiled", str(bert_compiled), "--packs", str(packs_dir), "--host", "0.0.0.0",
                 "--port", str(free_port())]) == 2
    import os

    proc, port = start(bert_compiled, packs_dir, "--host", "0.0.0.0",
                       env={**os.environ, "BITFIT_ADMIN_TOKEN": TOKEN})
    try:
        url = f"http://127.0.0.1:{port}/v1/admin/reload"
        assert httpx.post(url, json={}, timeout=10).status_code == 401
        r = httpx.post(url, json={}, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code == 200
    finally:
        stop(proc)
