"""`bitfit serve` on Ray Serve (bitfit.serve.ray_app), on a local Ray cluster of this machine with 2 replicas:
answers equal the session's (what `bitfit predict` prints), every replica reports the packs it serves, and
a load of mixed-task requests survives a replica killed with ray.kill and a pack reloaded midway: no wrong
answer, every failure a 5xx, a 408 from Ray's proxy or a dropped connection that succeeds on retry, and
after the reload every replica serves the new pack."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from bitfit.runtime import TaskSession, load_pack, read_pack_manifest, save_pack
from bitfit.runtime.pack import TaskPack

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from bitfit.serve.ray_app import DEPLOYMENT, patient_proxy, run

ATOL = 1e-4
TEXTS = ["good fun movie", "awful boring plot", "the actor", "love the city", "what money", "great film"]
TOKEN = "ray-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(bert_compiled, pack_all, pack_pairs, pack_scores, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    packs = root / "packs"
    for key, path in {"single": pack_all, "pairs": pack_pairs, "scores": pack_scores}.items():
        shutil.copytree(path, packs / key)
    patient_proxy()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    try:
        run(bert_compiled, packs, port=port, replicas=2, replica_cpus=0.5, threads=1, blocking=False,
            admin_token=TOKEN)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield {"url": url, "packs": packs, "compiled": bert_compiled}
    finally:
        serve.shutdown()
        ray.shutdown()


def handle():
    return serve.get_deployment_handle(DEPLOYMENT, "bitfit")


def replicas() -> list[dict]:
    """What every live replica says of itself (a replica dying meanwhile is left out)."""
    answers = handle().broadcast("describe").results(timeout_s=60, return_exceptions=True)
    return [a for a in answers if isinstance(a, dict)]


def expected(compiled: Path, packs: dict[str, Path | TaskPack]) -> dict[str, list[dict]]:
    session = TaskSession(compiled, threads=1)
    out = {}
    for name, pack in packs.items():
        session.register(pack, name=name)
        pairs = ["a bad plot"] * len(TEXTS) if read_manifest(pack).text_pair else None
        out[name] = [session.run(name, [t], None if pairs is None else [pairs[0]]).records()[0] for t in TEXTS]
    return out


def read_manifest(pack):
    return pack.manifest if isinstance(pack, TaskPack) else read_pack_manifest(pack)


def test_answers_equal_the_sessions_on_every_replica(cluster):
    packs = {read_pack_manifest(d).task: d for d in cluster["packs"].iterdir()}
    want = expected(cluster["compiled"], packs)
    seen = set()
    with httpx.Client(base_url=cluster["url"], timeout=60) as c:
        for _ in range(6):  # Ray routes each request to a replica of its choice: several rounds reach both
            for task, records in want.items():
                pairs = {"text_pairs": ["a bad plot"] * len(TEXTS)} if packs[task].name == "pairs" else {}
                r = c.post("/v1/predict", json={"task": task, "texts": TEXTS, **pairs})
                assert r.status_code == 200, r.text
                for got, w in zip(r.json()["predictions"], records):
                    assert got["label"] == pytest.approx(w["label"], abs=ATOL) if isinstance(w["label"], float) \
                        else got["label"] == w["label"]
                    assert np.allclose(got["logits"], w["logits"], atol=ATOL, rtol=0)
            seen.add(c.get("/v1/tasks").json()["replica"])
    described = replicas()
    assert len(described) == 2 and {d["replica"] for d in described} >= seen
    digests = {task: load_pack(path).digest() for task, path in packs.items()}
    assert all(d["digests"] == digests for d in described)


def test_a_replica_killed_and_a_pack_reloaded_under_load(cluster):
    packs = {read_pack_manifest(d).task: d for d in cluster["packs"].iterdir()}
    tasks = sorted(packs)
    swapped = read_pack_manifest(cluster["packs"] / "single").task
    old = load_pack(packs[swapped])
    new = TaskPack(old.manifest, {**old.tensors, "head.bias": old.tensors["head.bias"] + np.float32(0.5)})
    new.manifest.manifest_sha256 = new.manifest.tensors_sha256 = ""
    want = {old.digest()[:16]: expected(cluster["compiled"], {swapped: old})[swapped],
            new.digest()[:16]: expected(cluster["compiled"], {swapped: new})[swapped]}
    others = expected(cluster["compiled"], {t: packs[t] for t in tasks if t != swapped})
    rng = np.random.default_rng(0)
    plan = [(tasks[int(rng.integers(len(tasks)))], int(rng.integers(len(TEXTS)))) for _ in range(2000)]
    events: dict[str, float] = {}
    outcomes: list[dict] = []

    async def one(client: httpx.AsyncClient, task: str, i: int) -> dict:
        inputs = [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [TEXTS[i]]}]
        if packs[task].name == "pairs":
            inputs.append({"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["a bad plot"]})
        failures = []
        for _ in range(10):
            sent = time.monotonic()
            try:
                r = await client.post(f"/v2/models/{task}/infer", json={"inputs": inputs})
            except httpx.HTTPError as e:
                failures.append(type(e).__name__)
            else:
                if r.status_code == 200:
                    body = r.json()
                    return {"task": task, "i": i, "sent": sent, "failures": failures, "body": body}
                failures.append(r.status_code)
            await asyncio.sleep(0.2)
        return {"task": task, "i": i, "sent": sent, "failures": failures, "body": None}

    async def load() -> None:
        queue = iter(plan)

        async def worker(client):
            for task, i in queue:
                outcomes.append(await one(client, task, i))

        async def disrupt(client):
            while len(outcomes) < len(plan) // 3:
                await asyncio.sleep(0.05)
            victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                          if f"{DEPLOYMENT}#" in a["name"] and "REPLICA" in a["name"].upper())
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            events["killed"] = time.monotonic()
            # the reload goes out once Ray has replaced the replica: then it must reach both, by broadcast alone
            # (a replica that starts after a broadcast reads the directory as it is then; the periodic rescan,
            # off here, is what catches up one that started in between)
            while len(await asyncio.to_thread(replicas)) < 2 or len(outcomes) < len(plan) // 2:
                await asyncio.sleep(0.5)
            await asyncio.to_thread(save_pack, new, cluster["packs"] / "single", overwrite=True)
            r = await client.post("/v1/admin/reload", json={}, headers={"authorization": f"Bearer {TOKEN}"})
            events["reloaded"] = time.monotonic()
            events["reload"] = r.json()

        async with httpx.AsyncClient(base_url=cluster["url"], timeout=60) as client:
            await asyncio.gather(*(worker(client) for _ in range(8)), disrupt(client))

    asyncio.run(asyncio.wait_for(load(), 600))
    assert "killed" in events and "reloaded" in events
    answered = [o for o in outcomes if o["body"] is not None]
    failed = [o for o in outcomes if o["failures"]]
    print(json.dumps({"requests": len(plan), "answered": len(answered), "retried": len(failed),
                      "failures": sorted({str(f) for o in failed for f in o["failures"]}),
                      "reload": events["reload"]})[:2000])
    assert len(answered) == len(plan), "every request succeeded, on retry where it failed"
    for o in failed:  # what a failure looked like: a server error or a dropped connection, never a 4xx
        # 5xx, or 408: Ray's proxy times a request out when the replica holding it died (seen once in a
        # fresh-clone CI run on 2 busy cores); both are retryable and the retry is checked to succeed above
        assert all(f in (408, 500, 502, 503, 504) or isinstance(f, str) for f in o["failures"]), o["failures"]
    reload_answers = events["reload"]["replicas"]
    assert len(reload_answers) == events["reload"]["running"] == 2, events["reload"]
    assert all(a["digests"][swapped] == new.digest() for a in reload_answers)
    wrong, late_old = [], 0
    for o in answered:
        version = o["body"]["model_version"]
        outputs = {t["name"]: t["data"] for t in o["body"]["outputs"]}
        if o["task"] == swapped:
            assert version in want, version
            record = want[version][o["i"]]
            if version == old.digest()[:16] and o["sent"] > events["reloaded"]:
                late_old += 1  # a replica still serving the old pack after the reload returned
        else:
            record = others[o["task"]][o["i"]]
        if not np.allclose(outputs["logits"], record["logits"], atol=ATOL, rtol=0):
            wrong.append({"task": o["task"], "text": o["i"], "version": version, "sent": o["sent"],
                          "killed": events["killed"], "reloaded": events["reloaded"]})
    assert not wrong, wrong[:5]  # the version a response names is the pack that computed it
    assert late_old == 0
    deadline = time.monotonic() + 120  # Ray replaces the killed replica; it serves the new pack
    while time.monotonic() < deadline:
        described = replicas()
        if len(described) == 2 and all(d["digests"].get(swapped) == new.digest() for d in described):
            break
        time.sleep(1)
    assert len(described) == 2 and all(d["digests"].get(swapped) == new.digest() for d in described)


def test_the_documented_config_builds_and_bad_arguments_are_refused(bert_compiled, tmp_path, monkeypatch):
    """examples/ray-serve.yaml's args, paths swapped for real ones, build the app (no cluster needed to bind);
    what a person might get wrong in that file is refused by name."""
    import yaml
    from bitfit.runtime.errors import BitFitError
    from bitfit.serve.ray_app import build

    monkeypatch.delenv("BITFIT_ADMIN_TOKEN", raising=False)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "ray-serve.yaml").read_text())
    args = dict(config["applications"][0]["args"], compiled=str(bert_compiled), packs=str(tmp_path))
    app = build(args)
    assert isinstance(app, serve.Application)
    with pytest.raises(BitFitError, match="unknown arguments \\['replica'\\]"):
        build(dict(args, replica="2"))
    with pytest.raises(BitFitError, match="give packs=DIR"):
        build({k: v for k, v in args.items() if k != "packs"})
    with pytest.raises(BitFitError, match="no compiled directory at .*every node"):
        build(dict(args, compiled=str(tmp_path / "missing")))
    with pytest.raises(BitFitError, match="admin_token"):
        build({k: v for k, v in args.items() if k != "admin_token"})
    with pytest.raises(BitFitError):
        build(dict(args, max_texts="0"))  # a ServeConfig limit is checked once, not in every replica


def test_the_cli_refuses_a_bad_replica_count(capsys):
    from bitfit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--ray", "--compiled", "c", "--packs", "p", "--replicas", "0"])
    assert e.value.code == 2 and "give a number of replicas from 1 to 1024, or auto" in capsys.readouterr().err
