"""Writers of formats other tools read: onnxruntime adapter files (`adapter`), the bias bank and its C
header for fixed-weight hardware (`bank`; runtime.bank reads it), NVIDIA Triton model repositories
(`triton`), and static web sites that run task packs in the browser (`web`; `site_server` serves one for a
preview, `browser` drives headless Chromium for the tests, benchmarks and quickstart). They stand on the
runtime's readers (CompiledModel, packs) and, for Triton and the web, the compiler's graph passes (onnx-ir,
never torch)."""
