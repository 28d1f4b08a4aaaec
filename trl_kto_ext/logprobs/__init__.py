"""The speed machinery: completion-only log-probs, the fast path, the shared-prompt pass, the reference cache and the
host-memory reference. Exactness against TRL's padded pass is checked once per model; anything unchecked falls back."""
