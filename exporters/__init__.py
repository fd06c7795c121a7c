"""Writers of formats other tools read: onnxruntime adapter files (`adapter`), the bias bank and its C
header for fixed-weight hardware (`bank`; runtime.bank reads it), and NVIDIA Triton model repositories
(`triton`). They stand on the runtime's readers (CompiledModel, packs) and, for Triton, the compiler's
graph passes."""
