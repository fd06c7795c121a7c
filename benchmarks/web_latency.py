"""Tasks in the browser: onnxruntime-web in headless Chromium against Python onnxruntime on the same machine, on
all-MiniLM-L6-v2 compiled fp32 and int8, each page on one wasm thread (a plain page) and on two (a cross-origin
isolated page, which wasm threads need).

Measured per variant, in a fresh browser profile (cold HTTP cache), the site served on 127.0.0.1:
- first load: loadSite (site.json, the graph, tokenizer and base biases fetched and sha256-checked, the
  InferenceSession created) plus the first task's load;
- each further task's load (its description and binary fetched and checked), over --tasks synthetic packs
  (the size of a trained `all` pack: every bias and a 2-label head);
- per-text latency, batch 1, on --texts movie-sentiment dev texts (their real lengths), the page's predict
  against TaskSession.run on the same text with the same thread count, in alternating blocks;
- bytes over the wire per task (headers and bodies of its two files, as Chromium received them) and the graph's.

    python benchmarks/web_latency.py [--texts 60] [--tasks 12] [--out benchmarks/results]

Timings are worth recording only from a quiet machine (the CPU-load guard refuses to time a busy one).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bitfit.compiler.compile import compile
from bitfit.exporters.browser import Browser
from bitfit.exporters.site_server import serve_site
from bitfit.exporters.web import export_web
from bitfit.runtime import TaskSession
from bitfit.training.data import load_builtin
from common import machine, minilm_dir, synthetic_pack, wait_until_quiet, write_results

BLOCK = 10  # texts per alternating block


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def page_run(browser: Browser, url: str, tasks: list[str], texts: list[str], rounds_of: int) -> dict:
    """Open the site in the browser (its first load), load every task, and time batch-1 calls in blocks."""
    browser.call("goto", url=url + "site.json")
    first = browser.call("eval", js=f"""async () => {{
        const t0 = performance.now();
        const {{ loadSite }} = await import('/bitfit.js');
        const site = await loadSite('/');
        await site.task({json.dumps(tasks[0])});
        const first = performance.now() - t0;
        window.site = site;
        return {{ first, stats: site.stats }};
    }}""")
    further = browser.call("eval", js=f"""async () => {{
        const out = [];
        for (const name of {json.dumps(tasks[1:])}) {{
            const t0 = performance.now();
            await window.site.task(name);
            out.push(performance.now() - t0);
        }}
        return out;
    }}""")
    wire = {}
    for r in browser.call("requests"):
        path = r["url"].split("/", 3)[-1]
        wire[path] = r["bytes"]
    return {"first": first, "further": further, "wire": wire}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=60, help="texts timed per variant (batch 1)")
    ap.add_argument("--tasks", type=int, default=12, help="synthetic task packs in the site")
    ap.add_argument("--max-load", type=float, default=0.3, help="cores other processes may use while timing")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    texts = [e.text for e in load_builtin("movie-sentiment").dev[: args.texts]]
    rng = np.random.default_rng(0)
    rows, data = [], {"machine": machine(2), "variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for precision, options in (("fp32", {}), ("int8", {"quantize": "int8"})):
            compiled = compile(minilm_dir(), work / f"compiled-{precision}", log=lambda *_: None, **options)
            packs = [synthetic_pack(compiled, f"task{i:03d}", rng) for i in range(args.tasks)]
            names = [p.name for p in packs]
            site = work / f"site-{precision}"
            index = export_web(compiled, packs, site)
            for threads, isolated in ((1, False), (2, True)):
                load = wait_until_quiet(args.max_load, patience=120)
                if load is not None:
                    raise SystemExit(f"other processes use {load:.1f} cores: not timing on a busy machine")
                python = TaskSession(compiled, threads=threads)
                for p in packs[:1]:
                    python.register(p)
                with serve_site(site, isolated=isolated) as url, Browser(timeout_s=600) as browser:
                    loads = page_run(browser, url, names, texts, BLOCK)
                    assert loads["first"]["stats"]["threads"] == threads, loads["first"]["stats"]
                    page_ms, python_ms = [], []
                    for start in range(0, len(texts), BLOCK):
                        block = texts[start : start + BLOCK]
                        page_ms += browser.call("eval", js=f"""async () => {{
                            const out = [];
                            for (const text of {json.dumps(block)}) {{
                                const t0 = performance.now();
                                await window.site.predict({json.dumps(names[0])}, [text]);
                                out.push(performance.now() - t0);
                            }}
                            return out;
                        }}""")
                        for text in block:
                            t0 = time.perf_counter()
                            python.run(names[0], [text])
                            python_ms.append((time.perf_counter() - t0) * 1000)
                    page_ms, python_ms = page_ms[1:], python_ms[1:]  # the first call of each warms up
                    # the page's logits on the timed texts, against Python's: the numbers timed are the right ones
                    logits = browser.call("eval", js=f"async () => (await window.site.predict({json.dumps(names[0])}, "
                                                     f"{json.dumps(texts[:32])})).records.map((r) => r.logits)")
                    diff = float(np.abs(np.array(logits) - python.run(names[0], texts[:32]).logits).max())
                task_files = [t for t in index["tasks"]]
                wire_task = []
                for t in task_files:
                    description = json.loads((site / t["description"]["file"]).read_text())
                    wire_task.append(loads["wire"].get(t["description"]["file"], 0)
                                     + loads["wire"].get(description["binary"]["file"], 0))
                row = {
                    "graph": precision, "threads": threads, "graph_bytes": index["graph"]["bytes"],
                    "graph_wire_bytes": loads["wire"].get(index["graph"]["file"], 0),
                    "first_load_ms": loads["first"]["first"], "fetch_and_check_ms": loads["first"]["stats"]["fetchMs"],
                    "session_ms": loads["first"]["stats"]["sessionMs"],
                    "task_load_ms_median": statistics.median(loads["further"]),
                    "task_load_ms_p90": pct(loads["further"], 90),
                    "task_bytes_on_disk": statistics.median(t["bytes"] for t in task_files),
                    "task_wire_bytes_median": statistics.median(wire_task),
                    "page_ms_median": statistics.median(page_ms), "page_ms_p90": pct(page_ms, 90),
                    "python_ms_median": statistics.median(python_ms), "python_ms_p90": pct(python_ms, 90),
                    "page_over_python": statistics.median(page_ms) / statistics.median(python_ms),
                    "max_logit_diff": diff, "texts_timed": len(page_ms), "tasks_loaded": len(loads["further"]) + 1,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        data["variants"] = rows
    head = (f"{'graph':<5} {'thr':>3} {'graph MB':>8} {'first load':>10} {'task load':>16} {'task KB':>8} "
            f"{'page ms':>14} {'python ms':>14} {'page/py':>7} {'max|dlogit|':>11}")
    lines = [f"web_latency: onnxruntime-web in headless Chromium vs Python onnxruntime, all-MiniLM-L6-v2, batch 1, "
             f"{args.texts} movie-sentiment dev texts; {data['machine']}",
             "first load: site.json + graph + tokenizer + base biases fetched from 127.0.0.1 and sha256-checked, the "
             "session created, one task loaded; task load: median (p90) of each further task; page/python: ratio of "
             "median per-text latencies (median (p90) shown)", "", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['graph']:<5} {r['threads']:>3} {r['graph_bytes'] / 2**20:>8.1f} {r['first_load_ms'] / 1000:>9.2f}s "
            f"{r['task_load_ms_median']:>7.1f} ({r['task_load_ms_p90']:>5.1f}) ms {r['task_wire_bytes_median'] / 1024:>7.1f} "
            f"{r['page_ms_median']:>6.1f} ({r['page_ms_p90']:>5.1f}) {r['python_ms_median']:>6.1f} ({r['python_ms_p90']:>5.1f}) "
            f"{r['page_over_python']:>6.2f}x {r['max_logit_diff']:>11.1e}")
    write_results(args.out, "web_latency", "\n".join(lines), data)


if __name__ == "__main__":
    main()
