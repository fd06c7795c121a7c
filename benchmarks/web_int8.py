"""int8 in the browser: how far onnxruntime-web's int8 kernels (wasm) and Python onnxruntime's (x86) each move a
trained task's logits and labels from fp32, on all-MiniLM-L6-v2. Not a timing: the machine may be busy.

The task is a real pack (the quickstart's movie-sentiment, or --pack); texts are movie-sentiment dev texts.

    python benchmarks/web_int8.py [--pack runs/quickstart/packs/movie-sentiment] [--texts 400]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from bitfit.compiler.compile import compile
from bitfit.exporters.browser import Browser
from bitfit.exporters.site_server import serve_site
from bitfit.exporters.web import export_web
from bitfit.runtime import TaskSession
from bitfit.training.data import load_builtin
from common import machine, minilm_dir, write_results

CHUNK = 50


def page_logits(site: Path, task: str, texts: list[str]) -> np.ndarray:
    out = []
    with serve_site(site) as url, Browser(timeout_s=600) as browser:
        browser.call("goto", url=url + "site.json")
        for i in range(0, len(texts), CHUNK):
            out += browser.call("eval", js=f"""async () => {{
                const {{ loadSite }} = await import('/bitfit.js');
                window.site ??= await loadSite('/');
                return (await window.site.predict({json.dumps(task)}, {json.dumps(texts[i:i + CHUNK])})).records.map((r) => r.logits);
            }}""")
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default="runs/quickstart/packs/movie-sentiment")
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    data = load_builtin("movie-sentiment")
    texts = [e.text for e in data.dev[: args.texts]]
    gold = np.array(data.targets(data.dev[: args.texts]))
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, options in (("fp32", {}), ("int8", {"quantize": "int8"})):
            compiled = compile(minilm_dir(), Path(tmp) / precision, log=lambda *_: None, **options)
            python = TaskSession(compiled)
            task = python.register(args.pack)
            logits[f"python {precision}"] = np.concatenate(
                [python.run(task, texts[i : i + CHUNK]).logits for i in range(0, len(texts), CHUNK)])
            export_web(compiled, [args.pack], Path(tmp) / f"site-{precision}")
            logits[f"page {precision}"] = page_logits(Path(tmp) / f"site-{precision}", task, texts)
    reference = logits["python fp32"]
    rows = []
    for name, value in logits.items():
        rows.append({"runtime": name, "max_abs_dlogit_vs_fp32": float(np.abs(value - reference).max()),
                     "labels_equal_fp32": int((value.argmax(1) == reference.argmax(1)).sum()),
                     "accuracy": float((value.argmax(1) == gold).mean() * 100)})
    pair = float(np.abs(logits["page int8"] - logits["python int8"]).max())
    head = f"{'runtime':<12} {'max |dlogit| vs Python fp32':>28} {'labels = fp32':>14} {'dev accuracy':>13}"
    lines = [f"web_int8: all-MiniLM-L6-v2 int8 (per channel) in onnxruntime-web (Chromium, wasm) and Python onnxruntime "
             f"(x86), {len(texts)} movie-sentiment dev texts, pack {args.pack}; {machine(2)}", "", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['runtime']:<12} {r['max_abs_dlogit_vs_fp32']:>28.2e} {r['labels_equal_fp32']:>9}/{len(texts)} "
                     f"{r['accuracy']:>12.2f}%")
    lines.append(f"\npage int8 vs Python int8: max |dlogit| {pair:.3f} (the two int8 kernels round differently)")
    write_results(args.out, "web_int8", "\n".join(lines),
                  {"machine": machine(2), "texts": len(texts), "pack": args.pack, "rows": rows,
                   "page_vs_python_int8_max_abs_dlogit": pair})


if __name__ == "__main__":
    main()
