"""Compile a frozen encoder to ONNX with its biases as graph inputs: `compiler.compile.compile`
(torch, transformers, onnx-ir), also `bitfit.compile`.

Nothing is imported here: the graph passes (compiler.head, used by `bitfit export-triton`) need
onnx-ir only, and importing the package must not load torch.
"""
