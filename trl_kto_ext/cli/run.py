"""Steps shared by the `trl-kto-ext` commands (offline and online): model inputs, trainer, training and report."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from typing import Any

from trl_kto_ext.cli.parsing import _fail, as_flags, format_config
from trl_kto_ext.data.pipeline import _looks_local
from trl_kto_ext.errors import UserFault
from trl_kto_ext.models import SMOLLM2_MODEL, TINY_MODEL
from trl_kto_ext.training.peft_utils import check_kbit_backend


def load_model_inputs(script_args, training_args, model_args):
    """(model path, tokenizer, trainer keyword arguments) as TRL's kto.py sets them up: the trainer loads the model
    from its path with `training_args.model_init_kwargs` (set here), plus the LoRA and k-bit configs."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    if model_args.load_in_4bit or model_args.load_in_8bit:
        check_kbit_backend(training_args.device.type)  # before any weights are loaded
    model_path = resolve_model_path(model_args.model_name_or_path)
    hub_kwargs = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    model_init_kwargs = dict(hub_kwargs, attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["device_map"] = get_kbit_device_map()
    user_kwargs = training_args.model_init_kwargs  # a flag gives a JSON string
    model_init_kwargs.update((json.loads(user_kwargs) if isinstance(user_kwargs, str) else user_kwargs) or {})
    training_args.model_init_kwargs = model_init_kwargs
    gguf = {"gguf_file": model_init_kwargs["gguf_file"]} if model_init_kwargs.get("gguf_file") else {}
    tokenizer = _load_tokenizer(AutoTokenizer, model_path, {**hub_kwargs, **gguf})  # a GGUF file holds its tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"peft_config": get_peft_config(model_args), "quantization_config": quantization_config}
    return model_path, tokenizer, kwargs


def run(trainer_class, script_args, training_args, model_args, command, heldout, method: str = "KTO", **kwargs) -> str:
    """Build `trainer_class` from the configured model (one torch thread for `tiny`), train it and report
    ([`train_and_report`]); `command` (argv) and the resolved config go into the model card. Returns the output_dir."""
    card_info = {
        "dataset_name": script_args.dataset_name,
        "command": command,
        "config": format_config(script_args, training_args, model_args),
    }
    with threads_for(model_args.model_name_or_path):
        model_path, tokenizer, model_kwargs = load_model_inputs(script_args, training_args, model_args)
        trainer = build_trainer(
            trainer_class, model_path, training_args, card_info, processing_class=tokenizer, **model_kwargs, **kwargs
        )
        if heldout is not None and not _tiny_vocabulary(tokenizer):
            # The tiny task's exact-match check reads the tiny model's bare answers ("a+b=" -> "c"); another model
            # answers in its own words, so its score there would be a wrong number, not a measurement.
            print(
                f"Held-out greedy accuracy is measured for the {TINY_MODEL} model (and models trained from it) only."
            )
            heldout = None
        return train_and_report(trainer, tokenizer, training_args, heldout, method=method)


def build_trainer(trainer_class, model_path, training_args, card_info: dict[str, Any], **kwargs):
    """`trainer_class(model_path, args=training_args, **kwargs)`; its input checks' ValueError as one line in flag
    words. `card_info` (dataset name, command, config) goes into the model card."""
    try:
        trainer = trainer_class(model_path, args=training_args, **kwargs)
    except ValueError as err:
        _fail(as_flags(str(err)))
    trainer.model_card_info = card_info  # read by trainer.create_model_card (checkpoints and the final card)
    return trainer


def train_and_report(trainer, tokenizer, training_args, heldout, method: str = "KTO") -> str:
    """Trains, saves the model, tokenizer, state, model card and curves to output_dir, and prints the held-out
    accuracy before and after (tiny data) and where everything went. Returns the output_dir.

    A fault of the user's input found while training ([`UserFault`]: a reward function's output, a data row, a
    diverging loss) stops the command with its one-line message; any other exception is a bug and keeps its
    traceback. A run in which no step made an update saves its outputs, then exits non-zero (the saved model is the
    starting one: a script going on to use it must not take it for a trained model)."""
    from trl_kto_ext.models.tiny import greedy_accuracy
    from trl_kto_ext.report.plotting import plot_training

    main_process = trainer.is_world_process_zero()
    if heldout is not None and main_process:
        before = greedy_accuracy(trainer.model, tokenizer, *heldout)
        print(f"Held-out greedy accuracy before {method}: {before:.3f} ({len(heldout[0])} prompts)", flush=True)
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except UserFault as err:
        _end_progress_bars(trainer)  # the message starts on a line of its own
        _fail(as_flags(" ".join(line.strip() for line in str(err).splitlines() if line.strip())))
    trainer.save_model(training_args.output_dir)  # model + tokenizer
    trainer.save_state()  # trainer_state.json, read by the plot
    plot = plot_training(training_args.output_dir) if main_process else None  # before the card, which names it
    card = trainer.create_model_card()  # README.md: base model, data, KTO settings, final metrics, command
    if main_process:
        if heldout is not None:
            after = greedy_accuracy(trainer.model, tokenizer, *heldout)
            print(f"Held-out greedy accuracy after {method}:  {after:.3f} (before: {before:.3f})", flush=True)
        out = os.path.abspath(training_args.output_dir)
        print(f"lambda_D = {trainer.desirable_weight:.4g}, lambda_U = {trainer.undesirable_weight:.4g}")
        print(f"Outputs in {out}:\n  final model + tokenizer: {out}\n  training curves: {os.path.abspath(plot)}")
        print(f"  model card: {os.path.abspath(card)}")
        if "tensorboard" in (training_args.report_to or []):
            print(f"  tensorboard logs: {os.environ.get('TENSORBOARD_LOGGING_DIR') or os.path.join(out, 'runs')}")
    if hasattr(trainer, "end"):
        trainer.end()
    # Under torchrun, ranks leave together with the process group torn down (one still alive at exit can abort).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if getattr(trainer, "no_update_message", None):  # said in full at the end of training
        _fail(
            f"no training step made an update, so the model saved in {os.path.abspath(training_args.output_dir)} is "
            "the model the run started from (why and the likely fixes: the warning above)."
        )
    return training_args.output_dir


def _end_progress_bars(trainer) -> None:
    """Closes transformers' progress bars (an interrupted one is left open on its line)."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


@contextlib.contextmanager
def threads_for(model_name: str | None):
    """One torch thread for the tiny model (a second only adds synchronisation); the caller's setting restored."""
    import torch

    threads = torch.get_num_threads()
    if model_name == TINY_MODEL:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _load_tokenizer(auto_tokenizer, model_path: str, hub_kwargs: dict[str, Any]):
    """The model's tokenizer, the first thing read from a Hub id: an unreachable Hub or a model missing from the
    offline cache stops here in one line instead of a long traceback (or ~30 s of retries)."""
    from trl_kto_ext.data.hub import check_hub_reachable

    if not os.path.exists(model_path):
        try:
            check_hub_reachable(model_path)
        except FileNotFoundError as err:  # its message speaks of datasets; the reason is the same
            reason = str(err).split("(", 1)[-1].split(")", 1)[0]
            _fail(
                f"could not load the model {model_path!r}: it is not a local folder and the Hub cannot be reached "
                f"({reason}).{_embedded_hint(model_path)} Check the name and your network, pass a local model folder "
                "(or `tiny`), or set HF_HUB_OFFLINE=1 to load it from the local Hub cache."
            )
    try:
        return auto_tokenizer.from_pretrained(model_path, **hub_kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        fix = (
            "With HF_HUB_OFFLINE=1 only models already in the local Hub cache load: download it on a machine with "
            "network access, or pass a local model folder (or `tiny`)."
            if offline
            else "Check the name, your network / HF_TOKEN, or pass a local model folder (or `tiny`)."
        )
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _fail(f"could not load the model {model_path!r}: {first_line}{_embedded_hint(model_path)} {fix}")


# Hub ids of the embedded models, which load here without the Hub
_EMBEDDED_HUB_IDS = {"huggingfacetb/smollm2-135m-instruct": SMOLLM2_MODEL}


def _embedded_hint(name: str) -> str:
    """ " Did you mean `smollm2-135m-instruct`?" for a name close to an embedded model's, or the embedded name of a Hub
    id this package builds without the Hub; else ""."""
    if name.lower() in _EMBEDDED_HUB_IDS:
        return (
            f" It is built in without the Hub (weights dequantized from its Q4_1 GGUF release): --model_name_or_path "
            f"{_EMBEDDED_HUB_IDS[name.lower()]}."
        )
    close = difflib.get_close_matches(name.lower(), [TINY_MODEL, SMOLLM2_MODEL], n=1, cutoff=0.75)
    return f" Did you mean `{close[0]}` (an embedded model)?" if close else ""


def get_kbit_device_map() -> dict[str, int] | None:
    """TRL's `get_kbit_device_map` (gone from TRL 1.x): the local process' GPU, or None without CUDA."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def resolve_model_path(name: str | None, build_tiny: bool = True) -> str:
    """The local folder of `tiny` or `smollm2-135m-instruct` (built and cached on first use; `build_tiny=False` only
    checks the name), an existing local path, or a Hub id unchanged."""
    if not name:
        _fail(f"no model: set model_name_or_path (a Hub id, a local folder, {TINY_MODEL} or {SMOLLM2_MODEL}).")
    if name == TINY_MODEL and build_tiny:
        from trl_kto_ext.models.tiny import build_tiny_default

        return str(build_tiny_default().model_dir)
    if name == SMOLLM2_MODEL:
        if not build_tiny:
            return name
        from trl_kto_ext.models.smollm2 import FetchError, build_smollm2

        try:
            return build_smollm2().model_dir
        except (FetchError, ImportError) as err:
            _fail(f"{SMOLLM2_MODEL}: {err}")
    if _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        _fail(f"model path {name} does not exist. Give an existing local folder or a Hub id like 'org/model'.")
    return os.path.expanduser(name) if _looks_local(name) else name


def _tiny_vocabulary(tokenizer) -> bool:
    """Whether `tokenizer` is the tiny model's character-level tokenizer (the tiny model or one trained from it)."""
    from trl_kto_ext.models.tiny import build_tokenizer

    return tokenizer.get_vocab() == build_tokenizer().get_vocab()
