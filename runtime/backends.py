"""The engines a TaskSession runs its graph on: onnxruntime (the default, the core install), OpenVINO (an
optional extra: Intel CPUs, GPUs and NPUs) and IREE (an optional extra: the ahead-of-time modules of
`bitfit compile --target iree-cpu`). An engine loads the graph once, prepares a task's bias arrays
once as its own tensors, and runs token feeds plus prepared values; the session above it holds the tasks.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .compiled import IREE_FUNCTION, TASK_IDS, CompiledManifest
from .errors import BitFitError, CompiledModelError

BACKENDS = ("onnxruntime", "openvino", "openvino-int8", "iree")


def _declared_inputs(manifest: CompiledManifest) -> set[str]:
    declared = set(manifest.token_inputs) | set(manifest.bias_specs) | {h.name for h in manifest.head_inputs}
    return declared | ({TASK_IDS} if manifest.mixed else set())


def _check_inputs(found: set[str], manifest: CompiledManifest, model_path: Path) -> None:
    declared = _declared_inputs(manifest)
    if found != declared:
        raise CompiledModelError(
            f"{model_path} has inputs that differ from its manifest (only in graph: {sorted(found - declared)[:4]}, "
            f"only in manifest: {sorted(declared - found)[:4]}): compile again"
        )


class OrtEngine:
    """onnxruntime with IO binding: a task's biases become OrtValues once (on the GPU for cuda) and are bound
    on every call, so switching tasks copies nothing."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, manifest: CompiledManifest, *, threads: int | None, device: str,
                 spinning: bool) -> None:
        self.device, providers = _ort_device(device)
        self.output = manifest.output
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Bias inputs are initializers on purpose (their default is the base model): skip the warning per bias.
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors
            hint = (f" (it was optimised offline by {manifest.optimized_with}, this is onnxruntime {ort.__version__}: "
                    "compile it again with this one)" if manifest.optimized_with else "")
            raise CompiledModelError(f"onnxruntime cannot load {model_path} ({e}){hint}: compile again") from e
        _check_inputs({i.name for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]},
                      manifest, model_path)

    @property
    def shares_memory(self) -> bool:
        """Whether value() reads the array's memory (the CPU) rather than a copy (a GPU)."""
        return self.device == "cpu"

    def value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def run(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


class OpenVinoEngine:
    """OpenVINO: the graph compiled for an OpenVINO device; a task's biases become ov.Tensors once (sharing the
    arrays' memory). int8: OpenVINO's own int8 weight compression (NNCF) at load.

    OpenVINO turns every input that has a default into a constant, so it takes only graphs compiled without
    defaults (`bitfit compile --no-defaults`); and it does not run onnxruntime's contrib ops, so not graphs
    onnxruntime optimised offline (the int8 and fused ones): OpenVINO's int8 is `openvino-int8` on an fp32
    graph."""

    def __init__(self, model_path: Path, manifest: CompiledManifest, *, threads: int | None, device: str,
                 int8: bool = False) -> None:
        try:
            import openvino as ov
        except ModuleNotFoundError:
            raise BitFitError("the openvino backend needs OpenVINO: pip install 'bitfit-deploy[openvino]'") from None
        if manifest.bias_defaults:
            raise CompiledModelError(f"{model_path.parent} was compiled with bias defaults, which OpenVINO turns into "
                                     "constants (every fed bias would be ignored): compile with --no-defaults")
        if manifest.optimized_with or manifest.fused_ops:
            raise CompiledModelError(f"{model_path.parent} holds onnxruntime's contrib ops ({manifest.optimized_with or 'fused kernels'}), "
                                     "which OpenVINO does not run: compile without --quantize/--fuse (and use "
                                     "backend 'openvino-int8' for int8 weights)")
        self.name = "openvino-int8" if int8 else "openvino"
        self._ov = ov
        core = ov.Core()
        try:
            model = core.read_model(str(model_path))
        except Exception as e:  # OpenVINO raises RuntimeError for a graph it cannot read
            raise CompiledModelError(f"OpenVINO cannot read {model_path} ({e}): compile again") from e
        _check_inputs({name for port in model.inputs for name in port.get_names()}, manifest, model_path)
        if int8:
            try:
                import nncf
            except ModuleNotFoundError:
                raise BitFitError("backend 'openvino-int8' compresses weights with NNCF: pip install "
                                  "'bitfit-deploy[openvino]'") from None
            model = nncf.compress_weights(model)  # int8 weights, per channel; inputs (the biases) untouched
        # f32 compute: OpenVINO's CPU default is bf16 where the CPU has it (seen here: AVX-512 BF16), which moved
        # MiniLM's hidden states by ~1e-2 -- not the graph that was verified
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        target = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}.get(device)
        if target is None:
            raise BitFitError(f"unknown device {device!r} for OpenVINO: use cpu, gpu, npu or auto")
        try:
            self.compiled = core.compile_model(model, target, config)
        except Exception as e:  # a device that is not there, a config it refuses
            raise BitFitError(f"OpenVINO cannot compile the graph for {target} ({e}): choose another device") from e
        self.session = self.compiled
        self.output = self.compiled.output(manifest.output)
        self._requests = threading.local()  # an infer request is not thread-safe: one per thread

    shares_memory = True  # value() wraps the array's memory (shared_memory=True; OpenVINO's default copies)

    def value(self, array: np.ndarray) -> Any:
        return self._ov.Tensor(array, shared_memory=True)  # the session keeps the array alive

    def run(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> np.ndarray:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        inputs = {name: self._ov.Tensor(np.ascontiguousarray(a)) for name, a in feeds.items()}
        request.infer({**inputs, **values})
        return np.array(request.get_tensor(self.output).data, copy=True)


class IreeEngine:
    """IREE: the ahead-of-time module(s) compiled beside the graph (compiler/iree.py), weights inside as
    constants, token inputs and biases as the function's arguments in the graph's input order. A task's biases
    become device arrays once (copies: re-made when the mixed graph's tables change). A module compiled for
    static shape buckets gets each call padded to the smallest bucket that holds it (pad tokens, mask 0), and a
    batch larger than every bucket runs in slices; rows and positions added are cut from the output.

    Only the llvm-cpu target runs here (driver local-task); the GPU targets are compiled, not run, by this
    toolkit so far. `threads`: the local-task driver's worker count, a process-wide IREE flag (the first
    engine made in a process sets it)."""

    name = "iree"
    shares_memory = False  # value() copies into an IREE buffer: a mixed table's in-place writes need refresh()

    def __init__(self, model_path: Path, manifest: CompiledManifest, *, threads: int | None, device: str) -> None:
        try:
            import iree.runtime as rt
        except ModuleNotFoundError:
            raise BitFitError("the iree backend needs IREE's runtime: pip install 'bitfit-deploy[iree]'") from None
        root = model_path.parent
        info = manifest.iree
        if info is None:
            raise CompiledModelError(f"{root} holds no IREE module: compile it with `bitfit compile --target iree-cpu`")
        if info["target"] != "iree-cpu":
            raise CompiledModelError(f"{root} was compiled for {info['target']}, which this toolkit compiles but does "
                                     "not run yet: compile with --target iree-cpu")
        if device not in ("cpu", "auto"):
            raise BitFitError(f"unknown device {device!r} for the iree backend: its modules run on the CPU "
                              "(cpu or auto)")
        missing = sorted(set(info["cpu_features"]) - set(host_cpu_features()))
        if missing:  # the module's code would stop on an illegal instruction
            raise CompiledModelError(f"{root}'s module was compiled for CPU features this machine lacks "
                                     f"({', '.join(missing[:6])}): compile it on (or for) this machine")
        arguments = list(info["arguments"])
        if set(arguments) != _declared_inputs(manifest):
            raise CompiledModelError(f"{root}'s module arguments differ from its manifest's inputs: compile again")
        self._rt = rt
        if threads:
            rt.flags.parse_flags(f"--task_topology_max_group_count={int(threads)}")
        self._config = rt.Config("local-task")
        self.device = self._config.device
        self.output = manifest.output
        self._arguments = arguments
        self._pads = {"input_ids": manifest.pad_token_id, "attention_mask": 0, "token_type_ids": 0, TASK_IDS: 0}
        self._functions = []
        for module in info["modules"]:
            path = root / module["file"]
            try:
                vm = rt.VmModule.mmap(self._config.vm_instance, str(path))
                context = rt.SystemContext(config=self._config, vm_modules=[vm])
                function = context.modules.module[IREE_FUNCTION]
            except Exception as e:  # IREE raises RuntimeError/KeyError for a module it cannot load
                raise CompiledModelError(f"IREE cannot load {path} ({e}): compile again with this IREE "
                                         f"({_iree_version(rt)}; compiled with {info['iree_version']})") from e
            # the calling convention, e.g. "0rrr_r": one r per argument. An importer that froze an input into a
            # constant leaves fewer arguments than the graph has inputs.
            arity = re.search(r"\(0([a-z]*)_", repr(function.vm_function))
            if arity is None or len(arity.group(1)) != len(arguments):
                raise CompiledModelError(f"{path} takes {len(arity.group(1)) if arity else '?'} arguments, the graph "
                                         f"{len(arguments)} inputs (an input frozen into a constant?): compile again")
            self._functions.append((int(module["batch"]), int(module["sequence"]), function))
        self.session = self._functions[0][2]
        self._lock = threading.Lock()  # one call at a time into a context: the driver has its own worker threads

    def value(self, array: np.ndarray) -> Any:
        return self._rt.asdevicearray(self.device, np.ascontiguousarray(array))

    def _bucket(self, batch: int, sequence: int) -> tuple[int, int, Any]:
        """The module a [batch, sequence] call runs on: of those that hold it, the one padding least (a static
        one before the dynamic one at equal size); else the widest that holds the sequence, run in slices."""
        def holds(f: tuple[int, int, Any]) -> bool:
            return (f[0] == 0 or f[0] >= batch) and (f[1] == 0 or f[1] >= sequence)

        fits = [f for f in self._functions if holds(f)]
        if fits:
            return min(fits, key=lambda f: ((f[0] or batch) * (f[1] or sequence), f[0] == 0))
        longest = [f for f in self._functions if f[1] == 0 or f[1] >= sequence]
        if not longest:
            sizes = ", ".join(f"{b}x{s}" for b, s, _ in self._functions)
            raise BitFitError(f"a sequence of {sequence} tokens fits none of the module's shape buckets ({sizes}): "
                              "truncate it (max_length) or compile with a longer bucket (--buckets)")
        return max(longest, key=lambda f: (f[0], -f[1]))

    def run(self, feeds: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> np.ndarray:
        batch, sequence = next(iter(feeds.values())).shape[:2]
        width, length, function = self._bucket(batch, sequence)
        width = width or batch
        outputs = []
        for start in range(0, batch, width):
            rows = {k: v[start:start + width] for k, v in feeds.items()}
            n = len(next(iter(rows.values())))
            args = [self.value(self._pad(rows[name], name, width, length)) if name in rows else values[name]
                    for name in self._arguments]
            with self._lock:
                result = function(*args)
            # a copy while `result` lives: to_host() maps the output buffer, which IREE reuses once it is freed
            outputs.append(np.array(result.to_host()[:n, :sequence], copy=True))
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _pad(self, array: np.ndarray, name: str, width: int, length: int) -> np.ndarray:
        rows = width - len(array)
        cols = (length - array.shape[1]) if length and array.ndim == 2 else 0
        if rows <= 0 and cols <= 0:
            return array
        pad = [(0, max(rows, 0))] + ([(0, max(cols, 0))] if array.ndim == 2 else [])
        return np.pad(array, pad, constant_values=self._pads.get(name, 0))


def host_cpu_features() -> list[str]:
    """This CPU's instruction-set features as LLVM names them (x86: /proc/cpuinfo's flags, which mostly agree;
    empty where unknown, which then checks nothing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def _iree_version(rt: Any) -> str:
    try:
        from importlib.metadata import version

        return version("iree-base-runtime")
    except Exception:  # not installed from a wheel
        return getattr(rt, "__version__", "unknown")


def open_engine(backend: str, model_path: Path, manifest: CompiledManifest, *, threads: int | None, device: str,
                spinning: bool) -> OrtEngine | OpenVinoEngine | IreeEngine:
    if backend == "onnxruntime":
        return OrtEngine(model_path, manifest, threads=threads, device=device, spinning=spinning)
    if backend in ("openvino", "openvino-int8"):
        return OpenVinoEngine(model_path, manifest, threads=threads, device=device, int8=backend == "openvino-int8")
    if backend == "iree":
        return IreeEngine(model_path, manifest, threads=threads, device=device)
    raise BitFitError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def _ort_device(device: str) -> tuple[str, list[str]]:
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BitFitError(
                f"device 'cuda' asked for, but this onnxruntime has only {', '.join(available)}: install "
                "onnxruntime-gpu (instead of onnxruntime), or use device 'cpu' or 'auto'"
            )
        return "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BitFitError(f"unknown device {device!r}: use cpu, cuda or auto")
