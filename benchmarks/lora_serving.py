"""What serving a task costs with BitFit against LoRA, side by side in one run (issue 16).

Per model (a bert-base-shaped encoder with random weights, and the real all-MiniLM-L6-v2) and batch 1 and 8
at sequence length 128, timed interleaved (one call of each variant per round) against the frozen graph:

- frozen: the base encoder, nothing task-specific (the reference of every ratio);
- bitfit: our compiled graph (`compile(head=False)`), every bias an input fed from a task pack;
- lora inputs: the same encoder exported with LoRA (r=8 on query and value, PEFT's default targets for BERT)
  whose A and B of each adapted matrix are graph inputs, fed per task, as onnxruntime's multi-LoRA serves
  adapters (scaling folded into B);
- lora merged: LoRA merged into the weights: one graph per task, as fast as frozen by construction, paid
  for in memory and in a new session per task;
- mixed batches, where rows of different tasks share one forward pass: bitfit mixed (our --mixed graph:
  [tasks, dim] bias tables gathered per row) and lora mixed (A and B tables [tasks, in, r] gathered per row,
  two batched matmuls per adapted matrix), at batch 8 with the rows spread over 4 tasks.

Also per variant: bytes a task adds (what is fed, or the merged graph's weights), the cost of switching
tasks (feeding other arrays: alternating two tasks vs one; merged: a new onnxruntime session from disk),
and resident memory a merged task's session adds (measured in a fresh process). The engine is called
directly for every variant (onnxruntime with io binding, no TaskSession checks), so the rows differ only in
their graphs. Before each block the script waits for the machine to be quiet, else skips and says so.

    python benchmarks/lora_serving.py [--models bert-base,minilm] [--threads 2] [--out benchmarks/results]
"""
from __future__ import annotations

import copy
import gc
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bitfit.compiler.compile import compile
from bitfit.compiler.export import export_onnx
from bitfit.encoder.model import load_encoder, uses_token_types
from bitfit.runtime.compiled import CompiledModel
from common import (
    hidden_runner,
    machine,
    minilm_dir,
    ort_session,
    quiet_batches,
    session_cost,
    time_interleaved,
    timing_arguments,
    write_results,
)
from latency import bert_base_dir, paired_ratio
from torch import nn

SEQ = 128
PARITY_ATOL = 1e-4  # a variant that computes something else is not timed
RANK = 8
TARGETS = ("query", "value")
MIXED_TASKS = 4


def lora_modules(encoder: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]


def random_lora(encoder: nn.Module, rng: np.random.Generator, tasks: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per adapted Linear: A [tasks, in, r] and B [tasks, r, out] (scaling folded in), of a trained adapter's
    size. Values matter only for parity; the timing is the same for any."""
    out = []
    for _, m in lora_modules(encoder):
        a = rng.normal(0, 0.02, (tasks, m.in_features, RANK)).astype(np.float32)
        b = rng.normal(0, 0.02, (tasks, RANK, m.out_features)).astype(np.float32)
        out.append((a, b))
    return out


class LoRAInputs(nn.Module):
    """forward(*tokens, [task_ids], A_0, B_0, A_1, B_1, ...) -> last_hidden_state. Each adapted Linear adds
    (x @ A) @ B to its output (a forward hook, as compiler/export.py adds bias rows). Without task_ids A and
    B are one task's [in, r] and [r, out]; with them they are tables gathered per row."""

    def __init__(self, encoder: nn.Module, token_inputs: list[str], mixed: bool):
        super().__init__()
        self.encoder, self.token_inputs, self.mixed = encoder, token_inputs, mixed
        self.targets = [m for _, m in lora_modules(encoder)]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        n = len(self.token_inputs)
        tokens = dict(zip(self.token_inputs, args[:n]))
        rest = args[n:]
        task_ids = rest[0] if self.mixed else None
        pairs = rest[1:] if self.mixed else rest
        hooks = []
        try:
            for i, module in enumerate(self.targets):
                a, b = pairs[2 * i], pairs[2 * i + 1]
                if task_ids is not None:
                    a, b = a[task_ids], b[task_ids]  # [batch, in, r], [batch, r, out]
                    hook = (lambda a, b: lambda _m, inp, out: out + torch.bmm(torch.bmm(inp[0], a), b))(a, b)
                else:
                    hook = (lambda a, b: lambda _m, inp, out: out + (inp[0] @ a) @ b)(a, b)
                hooks.append(module.register_forward_hook(hook))
            return self.encoder(**tokens).last_hidden_state
        finally:
            for h in hooks:
                h.remove()


def export_lora(encoder: nn.Module, token_inputs: list[str], path: Path, *, mixed: bool) -> list[str]:
    """The LoRA graph with A and B as inputs; returns their input names in order."""
    wrapper = LoRAInputs(encoder, token_inputs, mixed).eval()
    ids = torch.randint(5, 50, (2, 7))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    loras = random_lora(encoder, np.random.default_rng(0), tasks=3)
    names, tensors, dynamic = [], [], {n: {0: "batch", 1: "sequence"} for n in token_inputs}
    for (name, _), (a, b) in zip(lora_modules(encoder), loras):
        for suffix, t in (("lora_A", a), ("lora_B", b)):
            names.append(f"{name}.{suffix}")
            tensors.append(torch.from_numpy(t) if mixed else torch.from_numpy(t[0]))
            if mixed:
                dynamic[names[-1]] = {0: "tasks"}
    args = tuple(example[n] for n in token_inputs)
    inputs = list(token_inputs)
    if mixed:
        args += (torch.tensor([0, 2]),)
        inputs.append("task_ids")
        dynamic["task_ids"] = {0: "batch"}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args + tuple(tensors), str(path), input_names=inputs + names,
                          output_names=["last_hidden_state"], dynamic_axes=dynamic, opset_version=17,
                          do_constant_folding=True, dynamo=False)
    return names


def merged(encoder: nn.Module, lora: list[tuple[np.ndarray, np.ndarray]]) -> nn.Module:
    """A copy of the encoder with one task's LoRA merged into its weights: W' = W + (A B)^T."""
    out = copy.deepcopy(encoder)
    with torch.no_grad():
        for (_, m), (a, b) in zip(lora_modules(out), lora):
            m.weight += torch.from_numpy(a[0] @ b[0]).T
    return out


_OPEN_GRAPH = """
import numpy as np, onnxruntime as ort
def open_one():
    o = ort.SessionOptions(); o.intra_op_num_threads = {threads}; o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession({path!r}, o, providers=["CPUExecutionProvider"])
    ids = np.full((1, 16), 5, np.int64)
    feed = {{i.name: (np.ones_like(ids) if i.name == "attention_mask" else ids if i.name == "input_ids" else 0 * ids)
            for i in s.get_inputs()}}
    s.run(None, feed)  # a session serves a call before it counts
    return s
"""


def merged_session_cost(path: Path, threads: int) -> dict[str, float]:
    """A merged task's price when it is not resident: a new session from disk (the second in a fresh process,
    file in the page cache), and the resident memory each merged task's session adds."""
    cost = session_cost(_OPEN_GRAPH.format(path=str(path), threads=threads))
    return {"new session s": cost["seconds"], "rss per task MB": cost["rss_per_session"] / 2**20}


def build(name: str, model_dir: Path, work: Path, threads: int, rng: np.random.Generator) -> dict:
    print(f"[{name}] exporting variants ...", flush=True)
    eager = load_encoder(model_dir, attn_implementation="eager")
    tokens = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types(eager) else [])
    quiet = {"log": lambda *_: None}
    export_onnx(eager, [], tokens, work / f"{name}-frozen.onnx", 17)
    task_loras = [random_lora(eager, rng) for _ in range(2)]
    export_onnx(merged(eager, task_loras[0]), [], tokens, work / f"{name}-merged.onnx", 17)
    lora_names = export_lora(eager, tokens, work / f"{name}-lora.onnx", mixed=False)
    export_lora(eager, tokens, work / f"{name}-lora-mixed.onnx", mixed=True)
    bitfit = compile(model_dir, work / f"{name}-bitfit", head=False, **quiet)
    bitfit_mixed = compile(model_dir, work / f"{name}-bitfit-mixed", head=False, mixed=True, **quiet)

    opened = CompiledModel.open(bitfit, check_integrity=False)
    bias_names = [b.name for b in opened.manifest.bias_inputs]
    task_biases = [{k: (opened.base_biases[k] + rng.normal(0, 0.02, opened.base_biases[k].shape)).astype(np.float32)
                    for k in bias_names} for _ in range(2)]
    lora_feeds = [{n: np.ascontiguousarray(t[0]) for n, t in zip(lora_names, [x for ab in lora for x in ab])}
                  for lora in task_loras]
    mixed_lora = random_lora(eager, rng, tasks=MIXED_TASKS)
    mixed_lora_feed = {n: t for n, t in zip(lora_names, [x for ab in mixed_lora for x in ab])}
    mixed_bias_feed = {k: (opened.base_biases[k] + rng.normal(0, 0.02, (MIXED_TASKS, *opened.base_biases[k].shape)))
                       .astype(np.float32) for k in bias_names}
    sessions = {"frozen": work / f"{name}-frozen.onnx", "bitfit": Path(bitfit) / "model.onnx",
                "lora inputs": work / f"{name}-lora.onnx", "lora merged": work / f"{name}-merged.onnx",
                "bitfit mixed": Path(bitfit_mixed) / "model.onnx", "lora mixed": work / f"{name}-lora-mixed.onnx"}
    runners = {k: hidden_runner(ort_session(p, threads)) for k, p in sessions.items()}
    per_task = {"frozen": {}, "bitfit": task_biases[0], "lora inputs": lora_feeds[0], "lora merged": {}}
    return {"name": name, "tokens": tokens, "config": eager.config, "runners": runners, "paths": sessions,
            "per_task": per_task, "other_task": {"bitfit": task_biases[1], "lora inputs": lora_feeds[1]},
            "mixed": {"bitfit mixed": mixed_bias_feed, "lora mixed": mixed_lora_feed},
            "eager": eager, "lora": task_loras[0], "lora_names": lora_names, "biases": task_biases[0]}


def token_feed(b: dict, batch: int, rng: np.random.Generator, seq: int = SEQ) -> dict[str, np.ndarray]:
    vocab = b["config"].vocab_size
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch, seq)).astype(np.int64)
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: full[k] for k in b["tokens"]}


def parity(b: dict, rng: np.random.Generator) -> dict[str, float]:
    """Each graph against torch on one batch: LoRA inputs vs the merged torch model, mixed rows vs each row's
    task alone (so the numbers timed are the numbers a user gets)."""
    feed = token_feed(b, 2, rng, seq=16)
    eager = merged(b["eager"], b["lora"])
    with torch.inference_mode():
        want = eager(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    got = b["runners"]["lora inputs"](feed, b["per_task"]["lora inputs"])
    merged_got = b["runners"]["lora merged"](feed, {})
    ids = np.array([1, 3], np.int64)
    mixed = b["runners"]["lora mixed"]({**feed, "task_ids": ids}, b["mixed"]["lora mixed"])
    single = [b["runners"]["lora inputs"]({k: v[i:i + 1] for k, v in feed.items()},
                                          {n: np.ascontiguousarray(t[ids[i]]) for n, t in b["mixed"]["lora mixed"].items()})
              for i in range(2)]
    bias_ids = np.array([2, 0], np.int64)
    bias_mixed = b["runners"]["bitfit mixed"]({**feed, "task_ids": bias_ids}, b["mixed"]["bitfit mixed"])
    bias_single = [b["runners"]["bitfit"]({k: v[i:i + 1] for k, v in feed.items()},
                                          {n: np.ascontiguousarray(t[bias_ids[i]]) for n, t in b["mixed"]["bitfit mixed"].items()})
                   for i in range(2)]
    return {"lora inputs vs torch merged": float(np.abs(got - want).max()),
            "lora merged graph vs torch merged": float(np.abs(merged_got - want).max()),
            "lora mixed rows vs each task alone": float(np.abs(mixed - np.concatenate(single)).max()),
            "bitfit mixed rows vs each task alone": float(np.abs(bias_mixed - np.concatenate(bias_single)).max())}


def check_parity(found: dict[str, float], model: str) -> dict[str, float]:
    bad = {k: v for k, v in found.items() if not v <= PARITY_ATOL}
    if bad:
        raise SystemExit(f"{model}: graphs disagree beyond {PARITY_ATOL}: {bad}; nothing timed")
    return found


def switch_and_memory(b: dict, feed: dict, rounds: int, threads: int) -> dict:
    """Switching tasks by feeding other arrays (alternating two tasks vs one), and a merged task's cost: a
    new session from disk, and the resident memory it adds."""
    out = {}
    for variant in ("bitfit", "lora inputs"):
        run = b["runners"][variant]
        one, two = b["per_task"][variant], b["other_task"][variant]
        single, alternating = [], []
        for i in range(rounds):
            t = time.perf_counter()
            run(feed, one)
            single.append(time.perf_counter() - t)
            t = time.perf_counter()
            run(feed, one if i % 2 else two)
            alternating.append(time.perf_counter() - t)
        out[variant] = {"alternating / single": float(np.median(alternating) / np.median(single))}
    out["lora merged"] = merged_session_cost(b["paths"]["lora merged"], threads)
    return out


def task_bytes(b: dict) -> dict[str, int]:
    merged_weights = b["paths"]["lora merged"].stat().st_size
    return {"bitfit": sum(v.nbytes for v in b["per_task"]["bitfit"].values()),
            "lora inputs": sum(v.nbytes for v in b["per_task"]["lora inputs"].values()),
            "lora merged": merged_weights}


def main() -> None:
    args = timing_arguments(__doc__.splitlines()[0], rounds=30)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bitfit-lora-"))
    rows, extras, skipped = [], {}, []
    for name in args.models.split(","):
        model_dir = bert_base_dir(work) if name == "bert-base" else minilm_dir()
        b = build(name, model_dir, work, args.threads, rng)
        extras[name] = {"parity": check_parity(parity(b, rng), name), "task_bytes": task_bytes(b),
                        "lora_inputs": len(b["lora_names"]), "bias_inputs": len(b["biases"])}
        for batch, rounds in quiet_batches(args, name, skipped):
            tokens = token_feed(b, batch, rng)
            ids = (np.arange(batch) % MIXED_TASKS).astype(np.int64)
            feeds = {k: (tokens, v) for k, v in b["per_task"].items()}
            feeds |= {k: ({**tokens, "task_ids": ids}, v) for k, v in b["mixed"].items()}
            runners = {k: (lambda run, f: lambda _feed: run(*f))(b["runners"][k], feeds[k]) for k in feeds}
            print(f"[{name}] timing batch {batch} x {SEQ}, {rounds} interleaved rounds ...", flush=True)
            times = time_interleaved(runners, {}, rounds)
            for variant, ts in times.items():
                ratio, low, high = paired_ratio(ts, times["frozen"], rng)
                rows.append({"model": name, "batch": batch, "seq": SEQ, "variant": variant,
                             "median_ms": float(np.median(ts)) * 1e3, "vs_frozen": ratio, "vs_frozen_low": low,
                             "vs_frozen_high": high})
            if batch == 1:
                extras[name]["switch"] = switch_and_memory(b, tokens, rounds, args.threads)
        del b
        gc.collect()

    lines = [f"BitFit vs LoRA (r={RANK} on {'/'.join(TARGETS)}) serving cost; {machine(args.threads)}; "
             f"sequence {SEQ}; ratios: median over interleaved rounds of time / frozen graph's, [95% bootstrap]",
             "", f"{'model':<10} {'batch':>5} {'variant':<13} {'median ms':>10} {'vs frozen [95%]':>24}"]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['batch']:>5} {r['variant']:<13} {r['median_ms']:>10.2f} "
                     f"{r['vs_frozen']:>8.3f} [{r['vs_frozen_low']:.3f}, {r['vs_frozen_high']:.3f}]")
    lines.append("")
    for name, e in extras.items():
        kb = {k: f"{v / 1024:,.0f} KB" for k, v in e["task_bytes"].items()}
        lines.append(f"{name}: bytes per task {kb}; inputs: {e['bias_inputs']} biases, {e['lora_inputs']} LoRA A/B")
        lines.append(f"{name}: parity (max abs) " + ", ".join(f"{k} {v:.1e}" for k, v in e["parity"].items()))
        if "switch" in e:
            s = e["switch"]
            lines.append(f"{name}: switch: bitfit alternating/single {s['bitfit']['alternating / single']:.3f}, "
                         f"lora inputs {s['lora inputs']['alternating / single']:.3f}; lora merged: new session "
                         f"{s['lora merged']['new session s']:.2f} s, +{s['lora merged']['rss per task MB']:.0f} MB "
                         "resident per task")
    lines += [f"mixed variants: batch rows spread over {MIXED_TASKS} tasks in one call"] + \
             [f"skipped: {s}" for s in skipped]
    write_results(args.out, "lora_serving", "\n".join(lines),
                  {"machine": machine(args.threads), "rank": RANK, "targets": list(TARGETS), "seq": SEQ,
                   "rows": rows, "models": extras, "skipped": skipped})


if __name__ == "__main__":
    main()
