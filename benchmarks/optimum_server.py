"""The baseline of benchmarks/serving.py: one optimum ORTModelForSequenceClassification per task, behind the
same HTTP API as `bitfit serve` (POST /v1/predict {"task", "texts"} -> {"predictions": [{label, logits}]},
GET /healthz), on starlette + uvicorn as ours.

This is what a user deploys without BitFit's shared graph: every task fine-tuned into its own HF model,
exported with optimum, served by its own onnxruntime session. It runs in its own virtual environment
(optimum-onnx pins a transformers older than ours), so it imports nothing from bitfit.

    python optimum_server.py export CHECKPOINT_DIR... --out DIR   # optimum's ONNX export, one dir per task
    python optimum_server.py serve --models DIR --port P [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path


def export(checkpoints: list[str], out: Path) -> None:
    from optimum.exporters.onnx import main_export

    for i, ckpt in enumerate(checkpoints, 1):
        target = out / Path(ckpt).name
        if (target / "model.onnx").is_file():
            continue
        t = time.perf_counter()
        # validation off: benchmarks/serving.py checks every answer of this server against bitfit's own
        main_export(ckpt, target, task="text-classification", do_validation=False, local_files_only=True)
        print(f"exported {i}/{len(checkpoints)} {Path(ckpt).name} in {time.perf_counter() - t:.1f} s", flush=True)


def serve(models: Path, port: int, threads: int, max_length: int) -> None:
    import numpy as np
    import onnxruntime as ort
    import uvicorn
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from transformers import AutoTokenizer

    tasks = {}
    for d in sorted(p for p in models.iterdir() if (p / "model.onnx").is_file()):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as bitfit serve
        model = ORTModelForSequenceClassification.from_pretrained(d, file_name="model.onnx", session_options=options,
                                                                  provider="CPUExecutionProvider")
        tasks[d.name] = (model, AutoTokenizer.from_pretrained(d), model.config.id2label)
    print(f"{len(tasks)} models loaded, {threads} onnxruntime threads each", file=sys.stderr, flush=True)

    def run(task: str, texts: list[str]) -> list[dict]:
        model, tokenizer, id2label = tasks[task]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        logits = np.asarray(model(**enc).logits)
        return [{"label": id2label[int(row.argmax())], "logits": row.tolist()} for row in logits]

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        if body.get("task") not in tasks:
            return JSONResponse({"error": f"unknown task {body.get('task')!r}"}, status_code=404)
        # a worker thread per request, as a user would write it: onnxruntime releases the GIL
        return JSONResponse({"predictions": await asyncio.to_thread(run, body["task"], body["texts"])})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "tasks": len(tasks)})

    app = Starlette(routes=[Route("/v1/predict", predict, methods=["POST"]), Route("/healthz", healthz)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export")
    e.add_argument("checkpoints", nargs="+")
    e.add_argument("--out", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--models", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    if args.command == "export":
        export(args.checkpoints, Path(args.out))
    else:
        serve(Path(args.models), args.port, args.threads, args.max_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
