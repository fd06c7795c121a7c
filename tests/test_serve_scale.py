"""The server at scale (issue 25) and its one state (issue 24): a packs directory registered in one state
change, rescans that neither read nor hash unchanged packs, /v1/tasks in pages, gauges of tasks and table
capacity; every route behind the doors, one error type rendered per protocol, ServeConfig's fields described."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from bitfit.runtime import TaskPack, TaskSession, load_pack, save_pack
from starlette.requests import Request
from starlette.testclient import TestClient

from bitfit.serve import ServeConfig, create_app

QUIET = {"log": lambda s: None}


def _variant(pack_all: Path, task: str, shift: float = 0.0) -> TaskPack:
    """pack_all as another task (and other numbers with `shift`), to be saved as a new pack."""
    pack = load_pack(pack_all)
    pack = TaskPack(pack.manifest, {**pack.tensors, "head.bias": pack.tensors["head.bias"] + np.float32(shift)})
    pack.manifest.task = task
    pack.manifest.manifest_sha256 = pack.manifest.tensors_sha256 = ""
    return pack


@pytest.fixture
def packs_dir(tmp_path, pack_all) -> Path:
    root = tmp_path / "packs"
    root.mkdir()
    for i in range(4):
        save_pack(_variant(pack_all, f"task-{i}"), root / f"p{i}")
    return root


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """How often the scanner reads a manifest, hashes a file, loads a pack, and registers (one or many)."""
    from bitfit.serve import packdir

    counts = {"read_manifest": 0, "sha256_file": 0, "load_pack": 0, "register": 0, "register_many": 0}

    def counting(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    for name in ("read_manifest", "sha256_file", "load_pack"):
        counting(packdir, name)
    counting(TaskSession, "register_many")
    real_register = TaskSession.register  # register() goes through register_many: count only direct calls

    def register(self, *args, **kwargs):
        counts["register"] += 1
        return real_register(self, *args, **kwargs)
    monkeypatch.setattr(TaskSession, "register", register)
    return counts


def test_a_server_start_registers_the_whole_directory_in_one_state_change(bert_compiled, packs_dir, calls):
    app = create_app(TaskSession(bert_compiled, threads=1), packs_dir, ServeConfig())
    assert sorted(app.state.initial_load.added) == [f"task-{i}" for i in range(4)]
    assert calls["register_many"] == 1 and calls["register"] == 0


def test_a_rescan_with_nothing_changed_reads_and_hashes_nothing(bert_compiled, packs_dir, pack_all, calls):
    from bitfit.serve.packdir import PackDirectory

    directory = PackDirectory(packs_dir, TaskSession(bert_compiled, threads=1))
    assert len(directory.reload().added) == 4
    for k in calls:
        calls[k] = 0
    again = directory.reload()
    assert sorted(again.unchanged) == [f"task-{i}" for i in range(4)] and not again.added and not again.replaced
    assert calls == {"read_manifest": 0, "sha256_file": 0, "load_pack": 0, "register": 0, "register_many": 0}
    sorts = []  # the sorted task list is O(N log N): asked once per pack, a 10,000-pack rescan took 6-7 s
    listed = TaskSession.tasks.fget
    with pytest.MonkeyPatch.context() as m:
        m.setattr(TaskSession, "tasks", property(lambda self: sorts.append(1) or listed(self)))
        directory.reload()
    assert len(sorts) <= 1, f"a rescan of 4 packs listed every task {len(sorts)} times"

    save_pack(_variant(pack_all, "task-2", shift=0.5), packs_dir / "p2", overwrite=True)  # one pack changes
    third = directory.reload()
    assert third.replaced == ["task-2"] and sorted(third.unchanged) == ["task-0", "task-1", "task-3"]
    assert calls["read_manifest"] == 1 and calls["load_pack"] == 1  # only the changed one is read
    head = directory.session.pack("task-2").tensors["head.bias"]
    assert np.allclose(head, load_pack(pack_all).tensors["head.bias"] + 0.5)


def test_a_pack_the_session_refuses_in_a_batch_fails_alone(bert_compiled, packs_dir, monkeypatch):
    """register_many is all or nothing; the scanner then registers one by one, so the good packs serve."""
    session = TaskSession(bert_compiled, threads=1)
    real = TaskSession.register_many

    def refuse_task_1(self, packs, *, names=None, replace=False):
        if "task-1" in (names or []):
            raise RuntimeError("refused: task-1")
        return real(self, packs, names=names, replace=replace)
    monkeypatch.setattr(TaskSession, "register_many", refuse_task_1)
    from bitfit.serve.packdir import PackDirectory

    result = PackDirectory(packs_dir, session).reload()
    assert sorted(result.added) == ["task-0", "task-2", "task-3"] and result.refused == {"task-1": "refused: task-1"}


# -- /v1/tasks in pages ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many(bert_compiled, pack_all):
    session = TaskSession(bert_compiled, threads=1)
    pack = load_pack(pack_all)
    names = [f"t{i:03d}" for i in range(300)]
    session.register_many([pack] * len(names), names=names)
    with TestClient(create_app(session, None, ServeConfig())) as client:
        yield client, names


def test_tasks_come_in_pages_with_a_cursor(many):
    client, names = many
    first = client.get("/v1/tasks").json()
    assert [t["name"] for t in first["tasks"]] == names[:100] and first["next"] == names[99]  # bounded default
    seen, after, pages = [], None, 0
    while True:
        page = client.get("/v1/tasks", params={"limit": 64, **({"after": after} if after else {})}).json()
        seen += [t["name"] for t in page["tasks"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == names and pages == 5  # 64 * 4 + 44
    whole = client.get("/v1/tasks", params={"limit": 1000}).json()
    assert len(whole["tasks"]) == 300 and whole["next"] is None
    assert set(whole["tasks"][0]) == {"name", "task_kind", "labels", "text_pair", "max_length", "digest"}
    assert client.get("/v1/tasks", params={"after": "t299"}).json() == {"tasks": [], "next": None}
    assert [t["name"] for t in client.get("/v1/tasks", params={"after": "t1", "limit": 2}).json()["tasks"]] == \
        ["t100", "t101"]  # `after` need not be a task: the names after it


@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-3"])
def test_a_bad_page_size_is_refused(many, limit):
    client, _ = many
    r = client.get("/v1/tasks", params={"limit": limit})
    assert r.status_code == 422 and "limit must be a whole number from 1 to 1000" in r.json()["error"]


# -- metrics --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(bert_model, tmp_path_factory):
    from bitfit.compiler.compile import compile as compile_model

    out = tmp_path_factory.mktemp("mixed") / "graph"
    compile_model(bert_model, out, mixed=True, **QUIET)
    return out


def _gauge(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics_show_tasks_and_the_tables_capacity(mixed, bert_compiled, pack_all):
    pack = load_pack(pack_all)
    session = TaskSession(mixed, threads=1)
    session.register_many([pack] * 5, names=[f"m{i}" for i in range(5)])
    with TestClient(create_app(session, None, ServeConfig())) as client:
        text = client.get("/metrics").text
        assert _gauge(text, "bitfit_tasks") == 5
        assert _gauge(text, "bitfit_table_capacity") == session.capacity >= 5
        session.register_many([pack] * 20, names=[f"n{i}" for i in range(20)])  # read at each scrape
        text = client.get("/metrics").text
        assert _gauge(text, "bitfit_tasks") == 25 and _gauge(text, "bitfit_table_capacity") == session.capacity >= 25
    plain = TaskSession(bert_compiled, threads=1)
    plain.register(pack)
    with TestClient(create_app(plain, None, ServeConfig())) as client:
        assert _gauge(client.get("/metrics").text, "bitfit_table_capacity") == 0


# -- one state: doors on every route, one error type ----------------------------------------------------
def test_every_route_is_behind_the_doors(bert_compiled, pack_all):
    """The doors are the route wrapper's, not each handler's: a foreign Host is refused on every route."""
    session = TaskSession(bert_compiled, threads=1)
    task = session.register(pack_all)
    app = create_app(session, None, ServeConfig(allowed_hosts=("127.0.0.1",)))
    version = session.digest(task)[:16]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/healthz").status_code == 200
        for r in app.routes:
            path = r.path.replace("{model}", task).replace("{version}", version)
            for method in r.methods - {"HEAD"}:
                answer = client.request(method, path, headers={"host": "evil.example"}, json={})
                assert answer.status_code == 403 and "not answered here" in answer.json()["error"], (method, path)


def test_one_error_type_rendered_per_protocol():
    from bitfit.runtime.errors import BitFitError, UnknownTaskError

    from bitfit.serve.web import V1, V2, HTTPError

    request = Request({"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""})
    for exc, v1, v2 in ((HTTPError("bad shape"), 422, 400), (BitFitError("texts[0] is empty"), 422, 400),
                        (HTTPError("too many", 413), 413, 413), (UnknownTaskError("unknown task 'x'"), 404, 404),
                        (ValueError("boom"), 500, 500)):
        assert (V1.render(request, exc).status_code, V2.render(request, exc).status_code) == (v1, v2), exc


def test_both_protocols_share_the_limits_check(bert_compiled, pack_all):
    session = TaskSession(bert_compiled, threads=1)
    task = session.register(pack_all)
    with TestClient(create_app(session, None, ServeConfig(max_texts=2, max_text_chars=5))) as client:
        r1 = client.post("/v1/predict", json={"task": task, "texts": ["a", "b", "c"]})
        r2 = client.post(f"/v2/models/{task}/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]}]})
        assert (r1.status_code, r2.status_code) == (413, 413)
        assert r1.json()["error"] == "texts has 3 items, over the limit of 2 per request"
        assert r2.json()["error"] == "input 'text' has 3 items, over the limit of 2 per request"
        r1 = client.post("/v1/predict", json={"task": task, "texts": ["a", "toolong"]})
        r2 = client.post(f"/v2/models/{task}/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "toolong"]}]})
        assert r1.json()["error"] == "texts[1] has 7 characters, over the limit of 5"
        assert r2.json()["error"] == "input 'text'[1] has 7 characters, over the limit of 5"


def test_serve_config_fields_carry_defaults_and_help():
    """The CLI's serve flags are generated from these fields: each needs a default and a help text."""
    for f in dataclasses.fields(ServeConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.metadata.get("help"), f.name
    ServeConfig()  # the defaults pass the range checks


def test_serve_config_loads_without_the_web_stack():
    """The CLI builds its serve flags from ServeConfig on an install without the server's extra."""
    import subprocess
    import sys

    code = ("import sys; from bitfit.serve import ServeConfig; ServeConfig(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'prometheus_client')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
