"""Run-time pieces of the trainers: guards against bad steps, resumable pairing state, scoped changes, LoRA/k-bit."""
