"""The IREE targets of `bitfit compile --target iree-*`: the fp32 no-defaults graph compiled ahead of time by IREE
(ONNX importer, then iree-compile) into a module per shape bucket, the frozen weights inside as constants and the
token inputs and biases as the function's arguments, in the graph's input order. What a fixed-weight accelerator,
an embedded board or a GPU loads once and then feeds per task.

IREE's ONNX importer turns an input that also has an initializer into a constant (torch-mlir's
`elide_initialized_inputs`): a graph with bias defaults would come out with every bias frozen, silently. So only
graphs without defaults go in, and the imported function is checked to keep every input as an argument.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bitfit.runtime.backends import host_cpu_features
from bitfit.runtime.compiled import IREE_FUNCTION, IREE_TARGETS, TASK_IDS, CompiledManifest
from bitfit.runtime.errors import BitFitError, CompiledModelError

# target -> (iree-compile's HAL device flags, the architecture flag, its default). CPU: the machine compiling,
# whose features the manifest records (the runtime refuses a machine that lacks one: illegal instructions).
_TARGETS: dict[str, tuple[list[str], str, str]] = {
    "iree-cpu": (["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu"],
                 "--iree-llvmcpu-target-cpu", "host"),
    "iree-cuda": (["--iree-hal-target-device=cuda"], "--iree-cuda-target", "sm_80"),
    "iree-rocm": (["--iree-hal-target-device=hip"], "--iree-rocm-target", "gfx942"),  # IREE 3.13's flag names
    "iree-vulkan": (["--iree-hal-target-device=vulkan"], "--iree-vulkan-target", "ampere"),
}
_HAL_BACKEND = {"iree-cpu": "llvm-cpu", "iree-cuda": "cuda", "iree-rocm": "rocm", "iree-vulkan": "vulkan-spirv"}
# x86 ISA extensions LLVM may use; /proc/cpuinfo's other flags (fpu, vme, ...) say nothing about the code
_ISA = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|vpclmul|vaes|gfni|sha_ni|movbe|popcnt|lzcnt|abm|adx|"
                  r"asimd|sve|neon|fp$|i8mm|bf16|dotprod)")
Bucket = tuple[int, int]  # (batch, sequence); (0, 0): dynamic shapes
assert set(_TARGETS) == set(IREE_TARGETS)


def parse_buckets(spec: str | Sequence[Bucket] | None) -> list[Bucket]:
    """`1x128,8x128,dynamic` (or [(1, 128), (8, 128), (0, 0)]) -> the buckets; None: dynamic shapes only."""
    if spec is None:
        return [(0, 0)]
    items: list[Any] = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[Bucket] = []
    for item in items:
        if item in ("dynamic", (0, 0), [0, 0]):
            bucket = (0, 0)
        else:
            m = re.fullmatch(r"(\d+)x(\d+)", item) if isinstance(item, str) else None
            pair = (int(m.group(1)), int(m.group(2))) if m else item
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1 << 16 for x in pair)):
                raise BitFitError(f"bad shape bucket {item!r}: write BATCHxSEQUENCE (e.g. 8x128) or 'dynamic'")
            bucket = (int(pair[0]), int(pair[1]))
        if bucket in out:
            raise BitFitError(f"shape bucket {bucket[0]}x{bucket[1]} is listed twice")
        out.append(bucket)
    if not out:
        raise BitFitError("no shape buckets given: write e.g. 1x128,8x128 or 'dynamic'")
    return out


def check_options(target: str, *, quantize: str | None, fp16: bool, fuse: bool, bias_defaults: bool | None) -> None:
    """Refuse the compile options an IREE target cannot take, with the reason."""
    if target not in IREE_TARGETS:
        raise BitFitError(f"unknown target {target!r}: use onnx or one of {', '.join(IREE_TARGETS)}")
    if fuse:
        raise BitFitError(f"--fuse writes onnxruntime's contrib ops, which IREE's ONNX importer does not take: "
                          f"compile for {target} without --fuse")
    if quantize:
        raise BitFitError(f"--quantize writes int8 QLinear/MatMulInteger graphs, which IREE's ONNX importer does not "
                          f"take: compile for {target} in fp32")
    if fp16:
        raise BitFitError(f"--fp16 is not supported for {target} yet: compile in fp32")
    if bias_defaults:
        raise BitFitError(f"{target} takes the graph without bias defaults: IREE's importer turns every input with "
                          "a default into a constant (every fed bias would be ignored); drop the defaults "
                          "(--no-defaults, the target's default)")


def iree_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iree-base-compiler")
    except PackageNotFoundError:
        return "unknown"


def _tool(name: str) -> str:
    try:
        from iree.compiler.tools.binaries import find_tool
    except ModuleNotFoundError:
        raise BitFitError("compiling for IREE needs IREE's compiler: "
                          "pip install 'bitfit-deploy[iree-compile]'") from None
    return str(find_tool(name))


def compile_modules(
    directory: Path,
    manifest: CompiledManifest,
    *,
    target: str = "iree-cpu",
    buckets: Sequence[Bucket] = ((0, 0),),
    arch: str | None = None,
    flags: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compile `directory`/model.onnx (no bias defaults) into one module per shape bucket beside it; return the
    manifest's `iree` record (write_manifest adds the modules' checksums)."""
    import onnx

    compiler = _tool("iree-compile")
    model_path = directory / "model.onnx"
    graph = onnx.load(str(model_path))
    initialized = {i.name for i in graph.graph.initializer}
    frozen = [i.name for i in graph.graph.input if i.name in initialized]
    if frozen:  # the importer would make them constants: every fed value ignored
        raise CompiledModelError(f"graph inputs {frozen[:4]} have defaults, which IREE's importer freezes into "
                                 "constants: compile with --no-defaults")
    contrib = sorted({n.op_type for n in graph.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise CompiledModelError(f"the graph holds ops IREE's importer does not take ({', '.join(contrib[:4])}): "
                                 "compile without --fuse/--quantize")
    arguments = [i.name for i in graph.graph.input]
    device_flags, arch_flag, arch_default = _TARGETS[target]
    arch = arch or arch_default
    all_flags = [*device_flags, f"{arch_flag}={arch}", "--iree-input-type=onnx", *flags]
    modules = []
    for batch, sequence in buckets:
        if sequence > manifest.max_positions:
            raise BitFitError(f"shape bucket {batch}x{sequence} is longer than the model's {manifest.max_positions} "
                              "positions: choose a shorter one")
        name = "module.vmfb" if batch == 0 else f"module-{batch}x{sequence}.vmfb"
        source = model_path
        if batch:
            source = directory / f"static-{batch}x{sequence}.onnx"
            onnx.save(_fix_shapes(graph, batch, sequence, manifest.hidden_size), str(source))
        mlir = directory / f"{name}.mlir"
        shape = "dynamic shapes" if batch == 0 else f"[{batch}, {sequence}]"
        log(f"compiling for {target} ({arch}, {shape}) with IREE {iree_version()}")
        _run([sys.executable, "-m", "iree.compiler.tools.import_onnx", str(source), "-o", str(mlir)], "importing")
        kept = _argument_count(mlir)
        if kept != len(arguments):
            raise CompiledModelError(f"IREE's importer kept {kept} of the graph's {len(arguments)} inputs as arguments "
                                     "(the rest frozen into constants): this graph cannot be compiled for IREE")
        _run([compiler, str(mlir), *all_flags, "-o", str(directory / name)], "compiling")
        mlir.unlink()
        if source != model_path:
            source.unlink()
        modules.append({"file": name, "batch": batch, "sequence": sequence, "sha256": ""})
    features = [f for f in host_cpu_features() if _ISA.match(f)] if target == "iree-cpu" and arch == "host" else []
    return {"target": target, "hal_backend": _HAL_BACKEND[target], "cpu": arch, "cpu_features": features,
            "iree_version": iree_version(), "flags": all_flags, "arguments": arguments, "modules": modules}


def _fix_shapes(graph: Any, batch: int, sequence: int, hidden: int) -> Any:
    """A copy of the graph with its token inputs (and task_ids, and the output) at fixed sizes: IREE then
    compiles the bucket's shapes, faster than dynamic ones."""
    import onnx

    static = onnx.ModelProto()
    static.CopyFrom(graph)
    for value in [*static.graph.input, *static.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name == TASK_IDS:
            sizes = [batch]
        elif len(dims) == 2 and value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            sizes = [batch, sequence]  # token inputs
        elif value in static.graph.output and len(dims) == 3:
            sizes = [batch, sequence, hidden]
        else:
            continue
        for dim, size in zip(dims, sizes):
            dim.ClearField("dim_param")
            dim.dim_value = size
    return static


def _argument_count(mlir: Path) -> int:
    """The arguments of the imported main function (the importer's first func.func line)."""
    with open(mlir) as f:
        for line in f:
            if f"func.func @{IREE_FUNCTION}(" in line:
                return len(re.findall(r"%arg\d+:", line.split(") ->")[0]))
    raise CompiledModelError(f"IREE's importer wrote no function {IREE_FUNCTION} in {mlir}")


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        errors = [line.strip()[:300] for line in lines if "error:" in line]  # the IR dumps around them are long
        tail = errors[:3] or lines[-6:]
        raise CompiledModelError(f"IREE failed {what} the graph ({Path(command[0]).name} exit {done.returncode}):\n  "
                                 + "\n  ".join(tail))


def run_module_tool() -> str | None:
    """iree-run-module (shipped in the runtime wheel, beside its native library), or None."""
    try:
        import iree._runtime_libs as libs

        beside = str(Path(libs.__file__).parent)
    except ModuleNotFoundError:
        beside = None
    return shutil.which("iree-run-module", path=beside) if beside else shutil.which("iree-run-module")
