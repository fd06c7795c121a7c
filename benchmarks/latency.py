"""Latency, throughput, task-switch cost and memory of compiled BitFit graphs, side by side in one run.

Every onnxruntime session here runs with intra-op spinning off: on 2 cores, worker threads that keep
spinning after a run slowed the next session's run by up to 40% (measured), which made the order of
the variants, not the variants, decide the result. torch keeps its defaults.

Models: a bert-base-shaped encoder (random weights from BertConfig, random biases) and the real
all-MiniLM-L6-v2. Shapes: batch 1 and 8 at sequence length 128. Every variant is built from the same
weights, then timed interleaved (one call of each variant per round), so machine noise hits all alike.
Rows: torch eager (sdpa attention); onnxruntime with baked biases (the reference); ours fp32 (bias
inputs fed from a task pack); ours fused (onnxruntime's fused kernels, biases still inputs); ours int8
(what compile --quantize int8 makes: int8 kernels fused around live biases); ours int8 plain (the
int8 graph compile falls back to: bias Adds unfused); baked int8; and, where OpenVINO is installed,
openvino fp32 and openvino int8 (its own int8 weight compression) on the no-defaults graph. All
onnxruntime sessions use ORT_ENABLE_ALL and the same thread count; OpenVINO f32 compute, the same threads.

How close to the machine: the same run measures a 1024 x 1024 x 1024 MatMul's GFLOP/s through onnxruntime
(fp32, and dynamic int8) and OpenVINO (f32, int8 weights), and gives each variant's GFLOP/s as a share of
the best of those for its precision.

Also: the cost of switching tasks (alternating two tasks vs one, and the bias binding itself)
against creating a session per task; resident memory with 1, 10 and 100 tasks registered, measured
in fresh processes that import the runtime only.

Before each block of timings the script checks that no other process is using the CPU; if one is,
it waits, then skips the block and says so in the table rather than time it.

    python benchmarks/latency.py [--models bert-base,minilm] [--threads 2] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bitfit.compiler.compile import compile
from bitfit.compiler.export import export_onnx
from bitfit.compiler.quantize import quantize_int8
from bitfit.encoder.model import load_encoder, uses_token_types
from bitfit.runtime import TaskSession
from bitfit.runtime.pack import save_pack
from common import (
    hidden_runner,
    machine,
    minilm_dir,
    ort_session,
    plain_int8,
    quiet_batches,
    session_cost,
    synthetic_pack,
    time_interleaved,
    timing_arguments,
    wait_until_quiet,
    write_results,
)

SEQ = 128
GOALS = {
    "ours fp32 / baked fp32": ("<=", 1.02),
    "torch / ours fp32 (batch 1)": (">=", 1.2),
    "torch / ours int8 (batch 1)": (">=", 2.6),
    "ours int8 / baked int8": ("<=", 1.00),
    "task switch (us)": ("<", 50.0),
    "memory 100 tasks / 1 task": ("<=", 1.05),
}


# -- variants -------------------------------------------------------------------------------------
def flops(config, batch: int, seq: int) -> float:
    h = config.hidden_size
    i = config.intermediate_size
    layers = config.num_hidden_layers
    per_layer = 2 * seq * h * h * 4 + 2 * 2 * seq * seq * h + 2 * 2 * seq * h * i
    return float(batch * layers * per_layer)


@dataclass
class Built:
    name: str
    config: object
    token_inputs: list[str]
    runners: dict = field(default_factory=dict)  # variant -> callable(feed)
    sessions: dict = field(default_factory=dict)  # variant -> TaskSession (ours)
    dirs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build(name: str, model_dir: Path, work: Path, threads: int, rng: np.random.Generator) -> Built:
    print(f"[{name}] building variants ...", flush=True)
    encoder = load_encoder(model_dir)
    tokens = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(encoder) else [])
    b = Built(name, encoder.config, tokens)

    def torch_run(feed):
        with torch.inference_mode():
            return encoder(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state

    b.runners["torch eager"] = torch_run
    eager = load_encoder(model_dir, attn_implementation="eager")
    export_onnx(eager, [], tokens, work / f"{name}-baked.onnx", 17)
    quantize_int8(work / f"{name}-baked.onnx", work / f"{name}-baked-int8.onnx")
    b.runners["ort baked fp32"] = hidden_runner(ort_session(work / f"{name}-baked.onnx", threads))
    b.runners["ort baked int8"] = hidden_runner(ort_session(work / f"{name}-baked-int8.onnx", threads))
    quiet = {"log": lambda *_: None}
    b.dirs["ours fp32"] = compile(model_dir, work / f"{name}-fp32", **quiet)
    b.dirs["ours int8"] = compile(model_dir, work / f"{name}-int8", quantize="int8", **quiet)
    b.dirs["ours int8 plain"] = plain_int8(model_dir, work / f"{name}-int8-plain")
    # what a deployment served only by our runtime compiles (it applies the head in numpy): no in-graph head,
    # which onnxruntime would run on every call (benchmarks/head_cost.py)
    b.dirs["ours fp32 no head"] = compile(model_dir, work / f"{name}-fp32-nohead", head=False, **quiet)
    b.dirs["ours int8 no head"] = compile(model_dir, work / f"{name}-int8-nohead", quantize="int8", head=False, **quiet)
    b.dirs["ours fused"] = compile(model_dir, work / f"{name}-fused", fuse=True, **quiet)
    backends = {variant: "onnxruntime" for variant in b.dirs}
    try:
        import openvino  # noqa: F401
    except ModuleNotFoundError:
        b.notes.append("openvino rows: OpenVINO is not installed (pip install 'bitfit-deploy[openvino]')")
    else:
        no_defaults = compile(model_dir, work / f"{name}-no-defaults", bias_defaults=False, **quiet)
        b.dirs["openvino fp32"] = b.dirs["openvino int8"] = no_defaults
        backends |= {"openvino fp32": "openvino", "openvino int8": "openvino-int8"}
    for variant, directory in b.dirs.items():
        session = TaskSession(directory, threads=threads, spinning=False, backend=backends[variant])
        for task in ("task-a", "task-b"):
            session.register(synthetic_pack(Path(directory), task, rng))
        b.sessions[variant] = session
        b.runners[variant] = (lambda s: lambda feed: s.hidden_states(feed, "task-a"))(session)
    # where ours int8 / baked int8 loses what it loses, in layers: the engine alone (no TaskSession input
    # checks), and the engine with nothing bound for the biases (the graph's defaults: no binding either)
    engine = b.sessions["ours int8 no head"]
    values = engine._get("task-a", engine._state).values
    b.runners["ours int8 no head, engine only"] = lambda feed: engine.engine.run(feed, values)
    b.runners["ours int8 no head, defaults"] = lambda feed: engine.engine.run(feed, {})
    order = ["torch eager", "ort baked fp32", "ours fp32", "ours fp32 no head", "ours fused", "openvino fp32",
             "ours int8", "ours int8 no head", "ours int8 no head, engine only", "ours int8 no head, defaults",
             "ours int8 plain", "ort baked int8", "openvino int8"]
    b.runners = {k: b.runners[k] for k in order if k in b.runners}
    return b


def matmul_peaks(work: Path, threads: int, rounds: int = 20, n: int = 1024) -> dict[str, float]:
    """GFLOP/s of one n x n x n MatMul (constant weights) through onnxruntime fp32 and dynamic int8, and through
    OpenVINO f32 and int8 weights: the most this machine gave a plain matrix product in this run."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.02, (n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [weight])
    fp32 = work / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    int8 = work / "matmul-int8.onnx"
    quantize_int8(fp32, int8)
    x = rng.normal(0, 1, (n, n)).astype(np.float32)
    runners = {}
    for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        session = ort_session(path, threads)
        runners[name] = (lambda s: lambda feed: s.run(["y"], feed))(session)
    try:
        import nncf
        import openvino as ov
    except ModuleNotFoundError:
        pass
    else:
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        for name, model in (("openvino f32", core.read_model(str(fp32))),
                            ("openvino int8 weights", nncf.compress_weights(core.read_model(str(fp32))))):
            request = core.compile_model(model, "CPU", config).create_infer_request()
            runners[name] = (lambda r: lambda feed: r.infer({"x": feed["x"]}))(request)
    times = time_interleaved(runners, {"x": x}, rounds)
    return {k: 2 * n**3 / float(np.median(v)) / 1e9 for k, v in times.items()}


def paired_ratio(times: list[float], base: list[float], rng: np.random.Generator) -> tuple[float, float, float]:
    """The median over rounds of this variant's time over the baked graph's in the same round (the rounds are
    interleaved: a round's machine state hits both alike), and a 95% bootstrap interval of that median."""
    r = np.asarray(times) / np.asarray(base)
    boot = [np.median(rng.choice(r, r.size)) for _ in range(2000)]
    return float(np.median(r)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def precision_of(variant: str) -> str:
    return "int8" if "int8" in variant else "fp32"


def feed_for(b: Built, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(1000, b.config.vocab_size, size=(batch, SEQ)).astype(np.int64)
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: full[k] for k in b.token_inputs}


# -- task switching and memory (fresh processes, runtime only) -------------------------------------
_MEMORY_CHILD = r"""
import json, sys, resource
sys.path[:0] = [{root!r}]
from bitfit.runtime import TaskSession, load_pack
session = TaskSession({compiled!r}, threads=1)
paths = {packs!r}
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS"))
out = {{}}
registered = 0
for n in (1, 10, 100):
    while registered < n:
        session.register(load_pack(paths[registered]), name=f"t{{registered}}")
        registered += 1
    out[n] = rss()
print(json.dumps(out))
"""

_OPEN_TASK_SESSION = """
from bitfit.runtime import TaskSession
def open_one():
    return TaskSession({compiled!r}, threads=1)
"""


def memory_with_tasks(compiled: Path, work: Path, rng: np.random.Generator) -> dict[int, int]:
    packs = []
    for i in range(100):  # 100 distinct packs: shared arrays would understate memory
        packs.append(str(save_pack(synthetic_pack(compiled, f"t{i}", rng), work / f"mem-pack-{i}", overwrite=True)))
    code = _MEMORY_CHILD.format(root=str(Path(__file__).resolve().parents[1]), compiled=str(compiled), packs=packs)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def new_session_cost(compiled: Path) -> dict[str, float]:
    return session_cost(_OPEN_TASK_SESSION.format(compiled=str(compiled)))


def switch_cost(session: TaskSession, feed: dict, rounds: int) -> dict[str, float]:
    """Median call time alternating two tasks vs one task, and the bias binding a call does."""
    single, alternating = [], []
    for i in range(rounds):
        t = time.perf_counter()
        session.hidden_states(feed, "task-a")
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        session.hidden_states(feed, "task-a" if i % 2 else "task-b")
        alternating.append(time.perf_counter() - t)
    values = session._get("task-b").values
    n = 2000
    binding = session.session.io_binding()
    t = time.perf_counter()
    for _ in range(n):
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
    bind = (time.perf_counter() - t) / n
    return {"single_ms": float(np.median(single) * 1e3), "alternating_ms": float(np.median(alternating) * 1e3),
            "bind_us": bind * 1e6, "bias_inputs": len(values)}


# -- models ---------------------------------------------------------------------------------------
def bert_base_dir(work: Path) -> Path:
    """bert-base shape, random weights and biases; all-MiniLM-L6-v2's tokenizer (the same uncased vocab)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    directory = work / "bert-base-random"
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(directory)
    return directory


def main() -> None:
    args = timing_arguments(__doc__.splitlines()[0], rounds=40)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bitfit-bench-"))
    rows, extras, skipped = [], {}, []
    peaks: dict[str, float] = {}
    try:
        if wait_until_quiet(args.max_load, patience=60) is None:
            print("timing the machine's matmul peak ...", flush=True)
            peaks = matmul_peaks(work, args.threads)
        else:
            skipped.append("matmul peak: machine busy; no share of peak")
        for name in args.models.split(","):
            model_dir = bert_base_dir(work) if name == "bert-base" else minilm_dir()
            b = build(name, model_dir, work, args.threads, rng)
            for batch, rounds in quiet_batches(args, name, skipped):
                print(f"[{name}] timing batch {batch} x {SEQ}, {rounds} interleaved rounds ...", flush=True)
                times = time_interleaved(b.runners, feed_for(b, batch, rng), rounds)
                medians = {k: float(np.median(v)) for k, v in times.items()}
                for variant, ts in times.items():
                    base = f"ort baked {precision_of(variant)}"
                    ratio, low, high = paired_ratio(ts, times[base], rng)
                    rows.append({
                        "model": name, "batch": batch, "seq": SEQ, "variant": variant,
                        "median_ms": medians[variant] * 1e3, "p90_ms": float(np.percentile(ts, 90)) * 1e3,
                        "seq_per_s": batch / medians[variant],
                        "gflops": flops(b.config, batch, SEQ) / medians[variant] / 1e9,
                        "vs_baked": ratio, "vs_baked_low": low, "vs_baked_high": high,
                        "torch_over_this": medians["torch eager"] / medians[variant],
                    })
            if wait_until_quiet(args.max_load, patience=60) is None:
                compiled = Path(b.dirs["ours fp32"])
                extras[name] = {
                    "switch": switch_cost(b.sessions["ours fp32"], feed_for(b, 1, rng), 2 * args.rounds),
                    "new_session": new_session_cost(compiled),
                    "memory": memory_with_tasks(compiled, work, rng),
                    "pack_bias_bytes": int(sum(np.prod(s.shape) * 4 for s in b.sessions["ours fp32"].manifest.bias_inputs)),
                }
            else:
                skipped.append(f"{name}: task switch and memory not measured (machine busy)")
            extras.setdefault(name, {})["notes"] = b.notes
            del b
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {p: max([v for k, v in peaks.items() if precision_of(k) == p], default=float("nan")) for p in ("fp32", "int8")}
    for r in rows:
        r["share_of_peak"] = r["gflops"] / best[precision_of(r["variant"])]
    extras["matmul_peak_gflops"] = peaks
    report(rows, extras, skipped, args)


def _goal(key: str, value: float, low: float | None = None, high: float | None = None) -> str:
    """Met / NOT met from the value; with an interval, 'not distinguishable' when it straddles the goal."""
    op, target = GOALS[key]
    ok = value <= target if op == "<=" else value >= target if op == ">=" else value < target
    text = f"{value:.3g}"
    if low is not None and high is not None:
        text += f" [{low:.3g}, {high:.3g}]"
        if low <= target <= high:
            return f"{text} (goal {op} {target:g}: not distinguishable from the goal in this run)"
    return f"{text} (goal {op} {target:g}: {'met' if ok else 'NOT met'})"


def report(rows: list[dict], extras: dict, skipped: list[str], args: argparse.Namespace) -> None:
    w = max([17] + [len(r["variant"]) for r in rows if "variant" in r])
    header = (f"{'model':<10} {'batch':>5} {'variant':<{w}} {'median ms':>10} {'p90 ms':>8} {'seq/s':>8} "
              f"{'GFLOP/s':>8} {'of peak':>8} {'vs baked [95%]':>22} {'torch/this':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        interval = f"{r['vs_baked']:.3f} [{r['vs_baked_low']:.3f}, {r['vs_baked_high']:.3f}]"
        lines.append(f"{r['model']:<10} {r['batch']:>5} {r['variant']:<{w}} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
                     f"{r['seq_per_s']:>8.1f} {r['gflops']:>8.1f} {r['share_of_peak']:>8.0%} {interval:>22} "
                     f"{r['torch_over_this']:>10.2f}")
    peaks = extras.get("matmul_peak_gflops", {})
    if peaks:
        lines.append("matmul peak (1024^3, GFLOP/s, this run): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
                     + "; 'of peak' is a row's GFLOP/s over the best peak of its precision (fp32 / int8)")
    goals = {}
    for model in sorted({r["model"] for r in rows if "model" in r}):
        get = {(r["batch"], r["variant"]): r for r in rows if r["model"] == model}
        for batch in sorted({r["batch"] for r in rows if r["model"] == model}):
            if (batch, "ours fp32") in get:
                for variant, goal in (("ours fp32", "ours fp32 / baked fp32"), ("ours fp32 no head", "ours fp32 / baked fp32"),
                                      ("ours int8", "ours int8 / baked int8"), ("ours int8 no head", "ours int8 / baked int8")):
                    if (batch, variant) in get:
                        r = get[(batch, variant)]
                        goals[f"{model} b{batch}: {variant} / baked"] = _goal(goal, r["vs_baked"], r["vs_baked_low"],
                                                                              r["vs_baked_high"])
            if batch == 1 and (1, "ours fp32") in get:
                goals[f"{model} b1: torch / ours fp32"] = _goal("torch / ours fp32 (batch 1)", get[(1, "ours fp32")]["torch_over_this"])
                goals[f"{model} b1: torch / ours int8"] = _goal("torch / ours int8 (batch 1)", get[(1, "ours int8")]["torch_over_this"])
        e = extras.get(model, {})
        if "switch" in e:
            s, m = e["switch"], e["memory"]
            lines.append(f"\n{model}: task switch: alternating two tasks {s['alternating_ms']:.2f} ms vs one task "
                         f"{s['single_ms']:.2f} ms per call (batch 1); binding a task's {s['bias_inputs']} bias "
                         f"OrtValues {s['bind_us']:.1f} us, done on every call; a new session per task instead: "
                         f"{e['new_session']['seconds'] * 1e3:.0f} ms and {e['new_session']['rss_per_session'] / 2**20:.0f} MiB")
            lines.append(f"{model}: resident memory (runtime only) with 1 / 10 / 100 tasks: "
                         + " / ".join(f"{m[n] / 2**20:.0f} MiB" for n in (1, 10, 100))
                         + f"; each pack's biases are {e['pack_bias_bytes'] / 1024:.0f} KiB")
            goals[f"{model}: task switch (us)"] = _goal("task switch (us)", s["bind_us"])
            goals[f"{model}: memory 100 tasks / 1 task"] = _goal("memory 100 tasks / 1 task", m[100] / m[1])
        for note in e.get("notes", []):
            lines.append(f"{model}: {note}")
    lines.append("\ngoals (ratios from this run):")
    lines += [f"  {k}: {v}" for k, v in goals.items()]
    for s in skipped:
        lines.append(f"  skipped: {s}")
    where = f"{machine(args.threads)}, torch {torch.__version__}"
    lines.append(f"\nmachine: {where}; sequence length {SEQ}; medians of interleaved rounds")
    write_results(args.out, "latency", "\n".join(lines), {"machine": where, "platform": platform.platform(), "rows": rows,
                                                        "extras": extras, "goals": goals, "skipped": skipped})


if __name__ == "__main__":
    main()
