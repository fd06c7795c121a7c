"""The engines a TaskSession runs its graph on: onnxruntime (the default, the core install) and OpenVINO (an
optional extra: Intel CPUs, GPUs and NPUs). An engine loads the graph once, prepares a task's bias arrays
once as its own tensors, and runs token feeds plus prepared values; the session above it holds the tasks.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .compiled import TASK_IDS, CompiledManifest
from .errors import BitFitError, CompiledModelError

BACKENDS = ("onnxruntime", "openvino", "openvino-int8")


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


def open_engine(backend: str, model_path: Path, manifest: CompiledManifest, *, threads: int | None, device: str,
                spinning: bool) -> OrtEngine | OpenVinoEngine:
    if backend == "onnxruntime":
        return OrtEngine(model_path, manifest, threads=threads, device=device, spinning=spinning)
    if backend in ("openvino", "openvino-int8"):
        return OpenVinoEngine(model_path, manifest, threads=threads, device=device, int8=backend == "openvino-int8")
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
