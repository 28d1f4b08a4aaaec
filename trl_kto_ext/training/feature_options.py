"""Defaults and checks of the KTOExtConfig fields for scores to labels, truncation, humanline, reference sync and the
KL pairing left unset."""

from __future__ import annotations

from trl_kto_ext.data.scores import LABEL_MODES, SCORE_WEIGHTINGS

TRUNCATION_MODES = ("keep_start", "keep_end")
# Humanline (arXiv 2509.24207): the authors' clamp bounds of the per-token log-ratio and the sync interval used here.
HUMANLINE_LOG_EPSILON = (-1.0, 1.5)
HUMANLINE_SYNC_STEPS = 1
# TRL's defaults of its reference-sync fields (TR-DPO), used when humanline is off.
TRL_SYNC_DEFAULTS = {"ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512}


def resolve_reference_sync(config) -> None:
    """TRL's sync fields left unset (None) take TRL's defaults, or with humanline: sync on, alpha 1.0, every
    HUMANLINE_SYNC_STEPS steps (the reference becomes the policy)."""
    if config.sync_ref_model is None:
        config.sync_ref_model = bool(config.humanline)
    if config.ref_model_mixup_alpha is None:
        config.ref_model_mixup_alpha = 1.0 if config.humanline else TRL_SYNC_DEFAULTS["ref_model_mixup_alpha"]
    if config.ref_model_sync_steps is None:
        config.ref_model_sync_steps = (
            HUMANLINE_SYNC_STEPS if config.humanline else TRL_SYNC_DEFAULTS["ref_model_sync_steps"]
        )


def check_features(config) -> None:
    """Checks of the score-labelling, truncation and humanline fields (each a one-line error with the fix)."""
    for name, choices in (
        ("label_mode", LABEL_MODES),
        ("score_weighting", SCORE_WEIGHTINGS),
        ("truncation_mode", TRUNCATION_MODES),
    ):
        if getattr(config, name) not in choices:
            raise ValueError(
                f"`{name}` must be one of {', '.join(map(repr, choices))}, got {getattr(config, name)!r}."
            )
    low, high = float(config.humanline_log_epsilon_P), float(config.humanline_log_epsilon_R)
    if not (low <= 0.0 <= high and low < high):
        raise ValueError(
            f"humanline_log_epsilon_P={low} and humanline_log_epsilon_R={high} must satisfy P <= 0 <= R with P < R: "
            "they bound log(pi_theta/pi_ref) per token below and above (the authors use -1.0 and 1.5)."
        )
    if config.humanline and config.precompute_ref_log_probs:
        raise ValueError(
            "humanline=True needs the reference's per-token log-probs at every step (and, with sync_ref_model, a "
            "reference that changes), but precompute_ref_log_probs caches per-sequence sums once: set "
            "precompute_ref_log_probs=False."
        )
    steps, alpha = config.ref_model_sync_steps, config.ref_model_mixup_alpha
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`ref_model_sync_steps` must be a whole number of optimizer steps >= 1, got {steps!r}.")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"`ref_model_mixup_alpha` must lie in (0, 1], got {alpha!r}.")


def resolve_kl_pairing(config) -> None:
    """Sets `config.kl_pairing` when it is None: "dataset" with `precompute_ref_log_probs` (the KL rows' reference
    log-probs are cached with the targets', so a step runs no reference forward), "batch" otherwise; records in
    `config.kl_pairing_from_default` whether it was unset (the start line says which pairing is used and why)."""
    config.kl_pairing_from_default = config.kl_pairing is None
    if config.kl_pairing is None:
        config.kl_pairing = "dataset" if config.precompute_ref_log_probs else "batch"
