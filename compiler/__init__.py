"""Compile a frozen encoder to ONNX with its biases as graph inputs (torch, transformers, onnx-ir)."""
from .compile import compile

__all__ = ["compile"]
