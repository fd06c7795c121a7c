"""The torch side of a base encoder, shared by training, compiling and verification: which biases each
architecture has and where (`biases`), loading, the base fingerprint, positions and the task head
module (`model`). Needs torch and transformers; the runtime never imports it."""
