"""BitFit deployment toolkit: train -> task pack -> compile -> session -> verify.

Each stage is a function here and a `bitfit` subcommand. Imports are lazy so that `predict` and
`inspect` work on a box with the runtime alone (no torch).
"""
from __future__ import annotations

from typing import Any

from bitfit.runtime.errors import BitFitError, ParityError
from bitfit.runtime.version import __version__


def train(*args: Any, **kwargs: Any):
    from bitfit.training.train import train as _train

    return _train(*args, **kwargs)


def compile(*args: Any, **kwargs: Any):  # noqa: A001 - the stage is called compile
    from bitfit.compiler.compile import compile_model

    return compile_model(*args, **kwargs)


def verify(*args: Any, **kwargs: Any):
    from bitfit.compiler.verify import verify as _verify

    return _verify(*args, **kwargs)


def predict(*args: Any, **kwargs: Any):
    from .prediction import predict as _predict

    return _predict(*args, **kwargs)


def inspect(*args: Any, **kwargs: Any):
    from .inspection import inspect as _inspect

    return _inspect(*args, **kwargs)


def extract(*args: Any, **kwargs: Any):
    from bitfit.training.extract import extract as _extract

    return _extract(*args, **kwargs)


def import_peft(*args: Any, **kwargs: Any):
    from bitfit.training.peft_import import import_peft as _import_peft

    return _import_peft(*args, **kwargs)


def export_adapter(*args: Any, **kwargs: Any):
    from bitfit.exporters.adapter import export_adapter as _export_adapter

    return _export_adapter(*args, **kwargs)


def export_bank(*args: Any, **kwargs: Any):
    from bitfit.exporters.bank import export_bank as _export_bank

    return _export_bank(*args, **kwargs)


def export_triton(*args: Any, **kwargs: Any):
    from bitfit.exporters.triton import export_triton as _export_triton

    return _export_triton(*args, **kwargs)


def export_web(*args: Any, **kwargs: Any):
    from bitfit.exporters.web import export_web as _export_web

    return _export_web(*args, **kwargs)


def serve_web(*args: Any, **kwargs: Any):
    from bitfit.exporters.site_server import serve_web as _serve_web

    return _serve_web(*args, **kwargs)


STAGES = ["compile", "export_adapter", "export_bank", "export_triton", "export_web", "extract", "import_peft", "inspect",
          "predict", "serve_web", "train", "verify"]
__all__ = ["BitFitError", "ParityError", "__version__", *STAGES]
