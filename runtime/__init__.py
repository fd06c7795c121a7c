"""Deployment runtime: numpy, onnxruntime, safetensors and tokenizers only (no torch, no transformers)."""
from .compiled import CompiledManifest, check_pack_fits, read_manifest
from .errors import BitFitError, CompiledModelError, IncompatibleError, PackError, UnknownTaskError
from .pack import PackManifest, TaskPack, TensorSpec, load_pack, read_manifest as read_pack_manifest, save_pack
from .heads import Answers, TokenPredictions
from .session import Predictions, TaskSession, load
from .version import __version__

__all__ = [
    "Answers", "BitFitError", "CompiledManifest", "CompiledModelError", "IncompatibleError", "PackError", "PackManifest",
    "Predictions", "TaskPack", "TaskSession", "TensorSpec", "TokenPredictions", "UnknownTaskError", "check_pack_fits", "load",
    "load_pack", "read_manifest", "read_pack_manifest", "save_pack",
]
