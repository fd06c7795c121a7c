"""Deployment runtime: numpy, onnxruntime, safetensors and tokenizers only (no torch, no transformers)."""
from . import decode
from .compiled import CompiledManifest, CompiledModel, check_pack_fits, read_compiled_manifest, read_manifest
from .errors import (
    BitFitError,
    CompiledModelError,
    IncompatibleError,
    PackError,
    ParityError,
    UnknownTaskError,
)
from .kinds import KINDS, TaskKind, WrongCallError
from .pack import PackManifest, TaskPack, TensorSpec, load_pack, save_pack
from .pack import read_pack_manifest
from .results import Answers, Predictions, TokenPredictions
from .session import TaskSession, load
from .version import __version__

__all__ = [
    "KINDS", "Answers", "decode", "BitFitError", "CompiledManifest", "CompiledModel", "CompiledModelError", "IncompatibleError",
    "PackError", "PackManifest", "ParityError", "Predictions", "TaskKind", "TaskPack", "TaskSession", "TensorSpec", "TokenPredictions",
    "UnknownTaskError", "WrongCallError", "check_pack_fits", "load", "load_pack", "read_compiled_manifest", "read_manifest",
    "read_pack_manifest",
    "save_pack", "__version__",
]
