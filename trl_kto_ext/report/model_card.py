"""The model card (output_dir/README.md) of a KTO run: base model, data, λ_D/λ_U, β, final metrics, command, versions."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
from typing import Any

# Keys of the final metrics table: the last logged training value of each, and the eval_ twin when evaluated.
FINAL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "kl_raw")
VERSIONS = ("trl-kto-ext", "trl", "transformers", "torch", "peft", "datasets", "tokenizers", "accelerate")

TEMPLATE = """---
{{ card_data }}
---

# Model Card for {{ model_name }}

This model is {{ base_sentence }}, aligned with KTO ([Kahneman-Tversky Optimization](https://arxiv.org/abs/2402.01306))
on {{ dataset_sentence }}. It has been trained with trl-kto-ext
(`KTOExtTrainer`, a drop-in `trl.KTOTrainer`) on [TRL](https://github.com/huggingface/trl).

## Quick start

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{{ load_path }}")
print(generator("{{ example_prompt }}", max_new_tokens=32, return_full_text=False)[0]["generated_text"])
```

## Training procedure

- Method: KTO, loss type `{{ loss_type }}`, β = {{ beta }}
- Loss aversion ({{ loss_aversion_mode }}): λ_D = {{ lambda_d }}, λ_U = {{ lambda_u }}, n_D = {{ n_d }}, n_U = {{ n_u }},
  λ_D·n_D / (λ_U·n_U) = {{ ratio }} (the paper advises [1, 4/3])
- KL pairing for z0: `{{ kl_pairing }}`; sampler: `{{ sampler }}`
{% for line in feature_lines %}- {{ line }}
{% endfor %}- Steps: {{ steps }}, learning rate {{ learning_rate }}, per-device batch size {{ batch_size }}, gradient accumulation
  {{ grad_accum }}, {{ precision }}{% if peft %}, LoRA adapters (reference = base model with adapters off){% endif %}

### Final metrics

Last logged values (training values are averages over the last logging window{% if has_eval %}; eval over the eval set{% endif %}):

| metric | train |{% if has_eval %} eval |{% endif %}
|---|---|{% if has_eval %}---|{% endif %}
{% for name, train, evaluation in metrics %}| {{ name }} | {{ train }} |{% if has_eval %} {{ evaluation }} |{% endif %}
{% endfor %}
{% if has_curves %}Curves: `training_curves.png` in this folder (`trl-kto-ext plot OUTPUT_DIR` redraws them from `trainer_state.json`).{% else %}Curves: `trl-kto-ext plot OUTPUT_DIR` draws them from the run's `trainer_state.json` (saved by `trainer.save_state()` and
in each checkpoint).{% endif %}

### Reproduce

{% if command %}```bash
{{ command }}
```
{% else %}Trained from Python with `KTOExtTrainer`; the full arguments are in `training_args.bin`
(`torch.load(..., weights_only=False)`).
{% endif %}{% if config %}
<details><summary>Resolved configuration</summary>

```yaml
{{ config }}```

</details>
{% endif %}
### Framework versions

{% for name, version in versions %}- {{ name }}: {{ version }}
{% endfor %}
## Citations

Cite KTO as:

```bibtex
{{ kto_citation }}
```

Cite TRL as:

```bibtex
{% raw %}@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}{% endraw %}
```
"""


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _last(history: list[dict], key: str) -> Any:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def feature_lines(trainer) -> list[str]:
    """Card lines for the settings that change what is trained on: per-row weights, labels from scores, prompt
    truncation, humanline and reference sync (none when they are at their defaults)."""
    args, aversion, lines = trainer.args, trainer.loss_aversion, []
    columns = getattr(trainer.train_dataset, "column_names", None) or []
    if getattr(aversion, "weighted", False):
        lines.append(
            f"Per-row weights (`weight` column): weighted class mass W_D = {aversion.mass_desirable:.6g}, W_U = "
            f"{aversion.mass_undesirable:.6g}; loss = sum w·λ_y·(1 − v) / sum w"
        )
    if "score" in columns:
        rule = f"`label_mode={args.label_mode!r}`"
        if args.label_mode == "threshold":
            rule += f", desirable_threshold = {args.desirable_threshold:g}"
        lines.append(f"Labels from the `score` column: {rule}, score_weighting `{args.score_weighting}`")
    if getattr(args, "truncation_mode", "keep_start") != "keep_start":
        lines.append(f"Truncation: `{args.truncation_mode}` (long prompts keep their end; completions kept whole)")
    if getattr(args, "humanline", False):
        lines.append(
            f"Humanline (arXiv 2509.24207): per-token log-ratio clamped to [{args.humanline_log_epsilon_P:g}, "
            f"{args.humanline_log_epsilon_R:g}]"
        )
    if getattr(args, "sync_ref_model", False):
        lines.append(
            f"Reference synced to the policy every {args.ref_model_sync_steps} steps "
            f"(π_ref = {args.ref_model_mixup_alpha:g}·π_θ + {1 - args.ref_model_mixup_alpha:g}·π_ref)"
        )
    return lines


def _base_model(trainer) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = getattr(model, "get_base_model", lambda: model)()
    return getattr(base.config, "_name_or_path", "") or "unknown"


def create_model_card(
    self,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
    command: str | list[str] | None = None,
    config: str | None = None,
) -> str | None:
    """Write `<output_dir>/README.md` for a `KTOExtTrainer` and return its path (None off the main process).

    Replaces TRL's `create_model_card` (which TRL calls at each checkpoint save) because TRL's card names no base for a
    local model ("a fine-tuned version of [None]"), no data and no KTO settings. Ours records: the base model (Hub id or
    local path), the dataset, KTO with its BibTeX citation, β, λ_D/λ_U with n_D/n_U and their ratio, the last logged
    metrics (with eval), the command line and resolved config when given, and library versions.

    Args:
        model_name: title of the card (default: the output folder's name).
        dataset_name: the data trained on (default: `self.model_card_info["dataset_name"]`, else "not recorded").
        tags: extra Hub tags (`trl`, `kto`, `trl-kto-ext` are always set).
        command: the command line that started the run (a string or argv list).
        config: the resolved configuration as YAML text.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if not self.is_world_process_zero():
        return None
    info = dict(getattr(self, "model_card_info", None) or {})
    dataset_name = dataset_name or info.get("dataset_name")
    command = command or info.get("command")
    config = config or info.get("config")
    if isinstance(command, list | tuple):
        command = shlex.join(command)
    output_dir = self.args.output_dir
    model_name = model_name or os.path.basename(os.path.abspath(output_dir))
    base = _base_model(self)
    on_hub = bool(base) and not os.path.isdir(base) and base != "unknown"
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags = sorted({*tags, *self._tag_names, "trl-kto-ext"})

    history = self.state.log_history
    aversion = self.loss_aversion
    metrics = []
    for key in FINAL_METRICS:
        train, evaluation = _last(history, key), _last(history, f"eval_{key}")
        if train is not None or evaluation is not None:
            metrics.append((key, _fmt(train), _fmt(evaluation)))
    train_loss = _last(history, "train_loss")
    if train_loss is not None:
        metrics.append(("train_loss (mean over the run)", _fmt(train_loss), "-"))
    args = self.args
    card_data = ModelCardData(
        base_model=base if on_hub else None,
        datasets=[dataset_name] if dataset_name and "/" in dataset_name and not os.path.exists(dataset_name) else None,
        library_name="transformers",
        model_name=model_name,
        tags=tags,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        base_sentence=f"a fine-tuned version of [{base}](https://huggingface.co/{base})"
        if on_hub
        else f"a fine-tuned version of the local model `{base}`",
        dataset_sentence=f"`{dataset_name}`" if dataset_name else "a dataset not recorded in this card",
        load_path=self.hub_model_id or os.path.abspath(output_dir),
        example_prompt="1+2=" if dataset_name == "tiny-arithmetic" else "Hello",
        loss_type=args.loss_type,
        beta=args.beta,
        loss_aversion_mode=aversion.mode,
        lambda_d=f"{self.desirable_weight:.6g}",
        lambda_u=f"{self.undesirable_weight:.6g}",
        n_d=aversion.n_desirable,
        n_u=aversion.n_undesirable,
        ratio=f"{aversion.ratio:.4g}"
        if aversion.missing_class is None
        else f"undefined (no {aversion.missing_class} rows)",
        kl_pairing=getattr(args, "kl_pairing", "batch"),
        feature_lines=feature_lines(self),
        sampler=args.train_sampling_strategy,
        steps=self.state.global_step,
        learning_rate=args.learning_rate,
        batch_size=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        peft=hasattr(self.accelerator.unwrap_model(self.model), "peft_config"),
        has_eval=any(m[2] != "-" for m in metrics),
        has_curves=os.path.exists(os.path.join(output_dir, "training_curves.png")),
        metrics=metrics,
        command=command,
        config=config,
        versions=[(name, _version(name)) for name in VERSIONS],
        kto_citation=self._paper["citation"],
    )
    path = os.path.join(output_dir, "README.md")
    os.makedirs(output_dir, exist_ok=True)
    card.save(path)
    return path
