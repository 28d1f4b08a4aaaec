"""Embedded models that need no Hub: the tiny addition model (offline default) and its task."""

TINY_MODEL = "tiny"  # `model_name_or_path` of the embedded tiny model (built and cached on first use)
TINY_DATASET = "tiny-arithmetic"  # `dataset_name` of its embedded addition data
