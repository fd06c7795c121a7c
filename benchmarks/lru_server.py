"""The baseline of benchmarks/lru_serving.py: a model per task behind an LRU of K resident models, the way
per-task (and multi-adapter) servers hold more tasks than fit: a request for a task not resident loads its
model, evicting the least recently used one.

A task's "model" is an onnxruntime session whose bias initializers are the task's, baked in at load with
SessionOptions.add_initializer: what loading one optimum model per task costs (a session, its own copy of the
weights, its arena) without writing 1,000 model files of 86 MB. Same HTTP API as `bitfit serve`
(POST /v1/predict {"task", "texts"} -> {"predictions": [{label, logits}]}, GET /healthz, GET /stats).

    python lru_server.py --compiled DIR --packs DIR --slots K --port P [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort


class LruModels:
    def __init__(self, compiled: Path, packs: Path, slots: int, threads: int):
        from bitfit.runtime.compiled import CompiledModel
        from bitfit.runtime.heads import Head
        from bitfit.runtime.pack import load_pack
        from bitfit.runtime.tokenize import TextEncoder

        self.compiled = CompiledModel.open(compiled)
        m = self.compiled.manifest
        if not m.bias_defaults or m.mixed:
            raise SystemExit("lru_server needs a plain graph with bias defaults (initializers to override)")
        self.encoder = TextEncoder(str(self.compiled.tokenizer_path), pad_token=m.pad_token,
                                   pad_token_id=m.pad_token_id, token_inputs=m.token_inputs)
        self.packs = {}
        for d in sorted(p for p in packs.iterdir() if (p / "manifest.json").is_file()):
            pack = load_pack(d)
            self.packs[pack.name] = (pack, Head.from_tensors(pack.manifest.pooling, pack.tensors))
        self.slots, self.threads = slots, threads
        self.resident: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0
        self.load_seconds = 0.0

    def session(self, task: str) -> ort.InferenceSession:
        with self.lock:
            if task in self.resident:
                self.resident.move_to_end(task)
                return self.resident[task]
        t = time.perf_counter()
        pack = self.packs[task][0]
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as bitfit serve
        options.log_severity_level = 3
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, np.float32)) for v in pack.biases.values()]
        for name, value in zip(pack.biases, values):
            options.add_initializer(name, value)
        session = ort.InferenceSession(str(self.compiled.model_path), options, providers=["CPUExecutionProvider"])
        session._bitfit_keep = values  # the initializers must outlive the session
        with self.lock:
            self.loads += 1
            self.load_seconds += time.perf_counter() - t
            self.resident[task] = session
            while len(self.resident) > self.slots:
                self.resident.popitem(last=False)
        return session

    def run(self, task: str, texts: list[str]) -> list[dict]:
        pack, head = self.packs[task]
        m = pack.manifest
        feeds = self.encoder(texts, None, max_length=m.max_length)
        hidden = self.session(task).run([self.compiled.manifest.output], feeds)[0]
        logits = head(hidden, feeds["attention_mask"])
        return [{"label": m.labels[int(row.argmax())], "logits": row.tolist()} for row in logits]


def serve(args) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    models = LruModels(Path(args.compiled), Path(args.packs), args.slots, args.threads)
    gate = threading.Lock()  # one inference at a time, as bitfit serve's batcher thread

    def run(task, texts):
        with gate:
            return models.run(task, texts)

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        task, texts = body.get("task"), body.get("texts")
        if task not in models.packs:
            return JSONResponse({"error": f"unknown task {task!r}"}, 404)
        out = await asyncio.get_running_loop().run_in_executor(None, run, task, texts)
        return JSONResponse({"predictions": out})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "tasks": len(models.packs)})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"loads": models.loads, "load_seconds": round(models.load_seconds, 3),
                             "resident": len(models.resident), "slots": models.slots})

    app = Starlette(routes=[Route("/v1/predict", predict, methods=["POST"]), Route("/healthz", healthz),
                            Route("/stats", stats)])
    print(f"{len(models.packs)} tasks, {args.slots} slots", file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--compiled", required=True)
    ap.add_argument("--packs", required=True)
    ap.add_argument("--slots", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    serve(ap.parse_args())
