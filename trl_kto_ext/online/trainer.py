"""OnlineKTOTrainer: sample from the current policy, label the samples with reward functions, train with KTO."""

from __future__ import annotations

from trl_kto_ext import compat  # noqa: F401  # isort: skip  (first: an unsupported TRL stops here with the supported range)

import json
import logging
import math
import os
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import is_conversational

from trl_kto_ext.data.special_tokens import text_prompt_ids
from trl_kto_ext.errors import UserInputError
from trl_kto_ext.loss_aversion import LossAversion
from trl_kto_ext.online.config import OnlineKTOConfig
from trl_kto_ext.online.one_class import (
    drop_one_class_groups,
    no_update_advice,
    skipped_step_message,
    train_one_class_message,
)
from trl_kto_ext.online.rewards import (
    call_reward_func,
    combine_rewards,
    label_rewards,
    load_reward_funcs,
    reward_func_name,
)
from trl_kto_ext.online.rolling_loss_aversion import RollingLossAversion
from trl_kto_ext.trainer import KTOExtTrainer
from trl_kto_ext.training.guards import count_zeroed_loss
from trl_kto_ext.training.scoped import activation_checkpointing_off, attribute
from trl_kto_ext.trl_internals import tokenize_row as _tokenize

logger = logging.getLogger(__name__)

# Dataset columns that are not passed to reward functions as keyword arguments (GRPOTrainer's list).
_NOT_REWARD_KWARGS = ("prompt", "completion", "completion_ids", "prompts", "completions")


class _WindowLossAversion(LossAversion):
    """The latest window's weights and counts, for the model card: its ratio is NaN while a count is 0."""

    __slots__ = ()

    @property
    def ratio(self) -> float:
        return super().ratio if self.n_desirable > 0 and self.n_undesirable > 0 else float("nan")


def _rows(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate function of the prompt dataloader: the raw rows; sampling and collation happen in `_prepare_inputs`."""
    return features


def check_prompt_dataset(dataset, name: str) -> None:
    """A prompt dataset: a `prompt` column of strings or lists of chat messages. Raises ValueError naming the fix."""
    if dataset is None:
        if name == "train":
            raise ValueError("Online KTO needs a `train_dataset` of prompts (a `prompt` column).")
        return
    if isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)
        columns, prompts = (list(first) if first else []), ([first["prompt"]] if first and "prompt" in first else [])
    elif isinstance(dataset, Dataset):
        columns = dataset.column_names
        prompts = dataset["prompt"] if "prompt" in columns else []
    else:
        raise ValueError(f"The {name} dataset must be a datasets.Dataset or IterableDataset, got {type(dataset)}.")
    if "prompt" not in columns:
        raise ValueError(
            f"The {name} dataset has no `prompt` column (columns: {columns}): online KTO samples its completions "
            "from the prompts. Rename the column holding them, e.g. `dataset.rename_column('question', 'prompt')`."
        )
    if len(prompts) == 0:
        raise ValueError(f"The {name} dataset has 0 prompts: there is nothing to sample from.")
    for row, prompt in enumerate(prompts):
        check_prompt(prompt, f"Row {row} of the {name} dataset")


def check_prompt(prompt, where: str) -> None:
    """[`UserInputError`] unless `prompt` is non-empty text or a list of chat messages; `where` names its row."""
    chat = isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt)
    if not (chat or (isinstance(prompt, str) and prompt.strip())):
        raise UserInputError(
            f"{where} has prompt {prompt!r}: a prompt must be non-empty text or a list of {{'role': ..., 'content': "
            "...}} messages."
        )


class OnlineKTOTrainer(KTOExtTrainer):
    """Online KTO: at each step, sample `num_generations` completions per prompt from the current policy, label them
    with the reward functions, and take one KTO step on these rows.

    The rows go through the offline pieces unchanged: [`KTOExtCollator`] builds the KL rows (each prompt with a
    completion sampled for a *different* prompt), [`kto_loss`] is the loss, and lambda_D/lambda_U follow the label
    counts of the last `loss_aversion_window` steps ([`RollingLossAversion`]). The reference is `ref_model`, a frozen
    copy of the initial model, or the base model with adapters off (PEFT). Arguments follow TRL's GRPOTrainer:

    Args:
        model: a model or a model path (as for [`KTOExtTrainer`]).
        reward_funcs: a callable `f(prompts, completions, completion_ids, **columns) -> list[float]`, a dotted path to
            one, a sequence-classification reward model (object or path), or a list of these (summed with
            `args.reward_weights`). Every dataset column other than `prompt` reaches callables as a keyword argument
            (one value per completion), with `trainer_state`.
        args: an [`OnlineKTOConfig`].
        train_dataset: prompts (a `prompt` column, plain text or chat messages), plus any columns the rewards need.
        reward_processing_classes: tokenizers of the reward models (loaded from the model's path when None).

    Raises:
        ValueError: for a dataset without prompts, bad settings (see [`OnlineKTOConfig`]), and a reward function whose
            output has the wrong length, a NaN or a non-number; RuntimeError for an exception inside one.
    """

    def __init__(self, model, reward_funcs, args: OnlineKTOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, ref_model=None, **kwargs):  # fmt: skip
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = OnlineKTOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-OnlineKTO")
        if not isinstance(args, OnlineKTOConfig):
            raise TypeError(f"`args` must be an OnlineKTOConfig, got {type(args).__name__}.")
        if kwargs.get("data_collator") is not None:
            raise ValueError(
                "OnlineKTOTrainer collates the rows it samples with KTOExtCollator (the KL pairing across prompts); "
                "a custom `data_collator` is not supported. Leave it unset."
            )
        check_prompt_dataset(train_dataset, "train")
        check_prompt_dataset(eval_dataset, "eval")
        self.reward_funcs = load_reward_funcs(reward_funcs, args.model_init_kwargs)
        self.reward_func_names = [reward_func_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"{len(weights)} reward_weights for {len(self.reward_funcs)} reward functions "
                f"({', '.join(self.reward_func_names)}): give one weight per function."
            )
        self.reward_weights = weights
        self.reward_processing_classes = self._reward_tokenizers(reward_processing_classes)
        super().__init__(model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)  # fmt: skip
        # The KTO collator builds the KL rows from the sampled rows; the dataloader only hands over prompt rows.
        self.kl_collator = self.data_collator
        self.kl_collator.fallback_dataset = None  # the prompt dataset holds no completions to fall back on
        self.data_collator = _rows
        self.loss_aversion = None  # per step, from the rolling window (logged with the step's metrics)
        self.lambda_window = RollingLossAversion(
            args.loss_aversion_window, args.loss_aversion, args.loss_aversion_target,
            args.desirable_weight, args.undesirable_weight,
        )  # fmt: skip
        self.desirable_weight, self.undesirable_weight = (
            (args.desirable_weight, args.undesirable_weight) if args.loss_aversion == "manual" else (1.0, 1.0)
        )
        for i, func in enumerate(self.reward_funcs):
            if isinstance(func, torch.nn.Module):
                self.reward_funcs[i] = func.to(self.accelerator.device).eval().requires_grad_(False)

    def _reward_tokenizers(self, given):
        from transformers import AutoTokenizer

        given = list(given) if isinstance(given, list | tuple) else [given] * len(self.reward_funcs)
        if len(given) != len(self.reward_funcs):
            raise ValueError(f"{len(given)} reward_processing_classes for {len(self.reward_funcs)} reward functions.")
        tokenizers = []
        for func, tok in zip(self.reward_funcs, given):
            if isinstance(func, torch.nn.Module):
                tok = tok or AutoTokenizer.from_pretrained(func.config._name_or_path)
                if tok.pad_token_id is None:  # as GRPOTrainer: the batch of texts is padded (right) with EOS
                    tok.pad_token = tok.eos_token
                func.config.pad_token_id = tok.pad_token_id  # the classifier reads the last non-pad token
            tokenizers.append(tok if isinstance(func, torch.nn.Module) else None)
        return tokenizers

    # ----------------------------------------------------------------------------------------------- data set-up
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        check_prompt_dataset(dataset, dataset_name)  # prompts stay text: they are tokenized when sampled
        return dataset

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # every column may be a reward function's keyword argument

    def _get_dataloader(self, *args, **kwargs):
        # The batch sizes count completions (GRPO's convention): load batch_size / num_generations prompts.
        kwargs["batch_size"] = max(1, kwargs["batch_size"] // self.args.num_generations)
        return super()._get_dataloader(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------ sampling
    def _prepare_inputs(self, inputs):
        if isinstance(inputs, dict):  # an already collated batch
            return super()._prepare_inputs(inputs)
        examples = self.sample(inputs)
        labelled = [ex for ex in examples if ex["label"] is not None]
        n_d = sum(ex["label"] for ex in labelled)
        one_class = n_d == 0 or n_d == len(labelled)
        if not labelled or (one_class and self.args.one_class == "skip"):
            self._say_once("_said_skip", skipped_step_message(self.state.global_step + 1, n_d, len(labelled) - n_d,
                                                              len(examples), self.args))  # fmt: skip
            return {"no_preference": True}
        if one_class:
            self._say_once("_said_train_one_class", train_one_class_message(self.args.loss_aversion))
        # Left-out samples are still completions of their prompts: the KL rows may pair with them (a step whose
        # kept rows share one prompt needs a completion of another).
        self.kl_collator._pairs.history.extend(
            (tuple(ex["prompt_ids"]), list(ex["completion_ids"])) for ex in examples if ex["label"] is None
        )
        batch = self.kl_collator([{k: ex[k] for k in ("prompt_ids", "completion_ids", "label")} for ex in labelled])
        return super()._prepare_inputs(batch)

    def tokenize_prompt(self, prompt) -> list[int]:
        """Prompt token ids as the offline trainer tokenizes them (chat template with the generation prompt)."""
        if is_conversational({"prompt": prompt}):
            return _tokenize(self.processing_class, prompt, add_generation_prompt=True)["input_ids"]
        # without what the tokenizer appends to a text (an EOS from `add_eos_token=True` would end the prompt)
        return text_prompt_ids(self._tokenizer, _tokenize(self.processing_class, prompt)["input_ids"])

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """`num_generations` sampled completions per prompt, prompt-major ([P * G] lists of ids, each ending at its
        first EOS, which is kept; a completion cut by `max_completion_length` has none)."""
        args, tok = self.args, self._tokenizer
        model = self.accelerator.unwrap_model(self.model)
        device = self.accelerator.device
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in prompt_ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids], device=device)
        eos = model.generation_config.eos_token_id
        eos = ({tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos])) - {None}  # a tokenizer may have none
        was_training = model.training
        model.eval()
        try:
            with activation_checkpointing_off(model, args.gradient_checkpointing_kwargs):
                out = model.generate(
                    input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_completion_length,
                    num_return_sequences=args.num_generations, pad_token_id=tok.pad_token_id,
                    eos_token_id=sorted(eos), use_cache=True,
                )  # fmt: skip
        finally:
            model.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            completions.append(row[:end])
        return completions

    def sample(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Samples, scores and labels completions for a batch of prompt rows.

        Returns one dict per completion (prompt-major, `num_generations` per prompt) with `prompt`, `completion`
        (text, or an assistant message for chat prompts), `prompt_ids`, `completion_ids`, `reward` (weighted sum),
        `rewards` (per function), `verdict` (the label its reward gives: True/False, None for a `"relative"` tie
        group) and `label` (the label trained on: the verdict, or None when the row is left out: a tie group, or with
        `one_class="skip"` a prompt whose samples all got one verdict), and records the step's sampling metrics.
        """
        args, group = self.args, self.args.num_generations
        prompts = [row["prompt"] for row in rows]
        for i, prompt in enumerate(prompts):  # a streamed dataset is checked on its first row only at start
            check_prompt(prompt, f"Prompt {i} of the batch of step {self.state.global_step + 1}")
        prompt_ids = [self.tokenize_prompt(p) for p in prompts]
        completion_ids = self.generate(prompt_ids)
        texts = self._tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        chat = is_conversational({"prompt": prompts[0]})
        completions = [[{"role": "assistant", "content": t}] if chat else t for t in texts]
        all_prompts = [p for p in prompts for _ in range(group)]
        columns = [k for k in rows[0] if k not in _NOT_REWARD_KWARGS]
        kwargs = {k: [row[k] for row in rows for _ in range(group)] for k in columns}
        per_func = [
            self._reward_model_scores(i, all_prompts, completions)
            if isinstance(func, torch.nn.Module)
            else call_reward_func(
                func, name, all_prompts, completions, completion_ids, trainer_state=self.state, **kwargs
            )  # fmt: skip
            for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names))
        ]
        rewards = combine_rewards(per_func, self.reward_weights, self.reward_func_names, all_prompts)
        verdicts = label_rewards(rewards, group, args.label_mode, args.desirable_threshold)
        labels = verdicts
        if args.one_class == "skip":
            labels, all_d, all_u = drop_one_class_groups(verdicts, group)
            self._metrics["train" if self.model.training else "eval"]["count/one_class_prompts"].append(all_d + all_u)
        examples = [
            {
                "prompt": p,
                "completion": c,
                "prompt_ids": prompt_ids[i // group],
                "completion_ids": ids,
                "reward": r,
                "rewards": [f[i] for f in per_func],
                "label": lab,
                "verdict": verdict,
            }  # fmt: skip
            for i, (p, c, ids, r, lab, verdict) in enumerate(
                zip(all_prompts, completions, completion_ids, rewards, labels, verdicts)
            )
        ]
        self._record_sampling(examples, per_func)
        return examples

    @torch.no_grad()
    def _reward_model_scores(self, index: int, prompts: list, completions: list) -> list[float]:
        model, tokenizer = self.reward_funcs[index], self.reward_processing_classes[index]
        if is_conversational({"prompt": prompts[0]}):
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        scores = model(**{k: v.to(self.accelerator.device) for k, v in inputs.items()}).logits[:, 0].float().tolist()
        name = self.reward_func_names[index]
        return call_reward_func(lambda **_: scores, name, prompts, completions, [[]] * len(prompts))

    def _record_sampling(self, examples: list[dict[str, Any]], per_func: list[list[float | None]]) -> None:
        """Rewards, desirable share and, in training, this step's lambda_D/lambda_U from the rolling window."""
        mode = "train" if self.model.training else "eval"
        m = self._metrics[mode]
        labels = [ex["label"] for ex in examples if ex["label"] is not None]
        n_d, n_u = sum(labels), len(labels) - sum(labels)
        verdicts = [ex["verdict"] for ex in examples if ex["verdict"] is not None]
        rewards = [ex["reward"] for ex in examples]
        mean = math.fsum(rewards) / len(rewards)
        if mode == "train":  # the run's lowest and highest reward, for the end-of-run warning of a run never updated
            low, high = getattr(self, "_rewards_seen", None) or (min(rewards), max(rewards))
            self._rewards_seen = (min(low, *rewards), max(high, *rewards))
        m["online/reward"].append(mean)
        m["online/reward_std"].append(math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / len(rewards)))
        for name, values in zip(self.reward_func_names, per_func):
            scored = [v for v in values if v is not None]
            if scored:
                m[f"online/rewards/{name}"].append(math.fsum(scored) / len(scored))
        m["online/completion_length"].append(sum(len(ex["completion_ids"]) for ex in examples) / len(examples))
        if verdicts:  # over every sample with a verdict, left out or not: how often the policy samples well
            m["online/desirable_share"].append(sum(verdicts) / len(verdicts))
        m["count/left_out"].append(len(examples) - len(labels))
        if mode != "train":
            return
        if self.accelerator.num_processes > 1:  # every process weighs its rows with the same, global, counts
            summed = self.accelerator.reduce(torch.tensor([n_d, n_u], device=self.accelerator.device), reduction="sum")
            n_d, n_u = summed.tolist()
        resolved = self.lambda_window.update(n_d, n_u)
        self.desirable_weight, self.undesirable_weight = resolved.desirable_weight, resolved.undesirable_weight
        m["lambda_D"].append(resolved.desirable_weight)
        m["lambda_U"].append(resolved.undesirable_weight)
        m["window/n_desirable"].append(resolved.n_desirable)
        m["window/n_undesirable"].append(resolved.n_undesirable)
        if resolved.n_desirable > 0 and resolved.n_undesirable > 0:
            m["loss_aversion_ratio"].append(resolved.ratio)

    def _say_once(self, flag: str, message: str) -> None:
        if not getattr(self, flag, False) and self.model.training:
            setattr(self, flag, True)
            if self.accelerator.is_main_process:
                logger.warning(message)

    # ------------------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        if inputs.get("no_preference"):
            # Every sampled group tied ("relative" labels): nothing to learn from; zero loss and gradient, counted.
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["skipped/no_preference_steps"].append(1)
            if mode == "train":
                count_zeroed_loss(self, "no_preference")  # its 0 is no loss: left out of the logged mean loss
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        return super()._compute_loss(model, inputs, return_outputs)

    def _no_update_advice(self) -> str:
        return no_update_advice(self.args, getattr(self, "_rewards_seen", None))

    def create_model_card(self, *args, **kwargs):
        # The card reports lambda_D / lambda_U with the counts they came from: here, the last step's window.
        last = self.lambda_window.last or LossAversion(
            self.desirable_weight, self.undesirable_weight, 0, 0, self.args.loss_aversion
        )
        with attribute(self, "loss_aversion", _WindowLossAversion(*last)):
            return super().create_model_card(*args, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "online_kto_state.json"), "w") as f:
            json.dump({"lambda_window": self.lambda_window.state_dict(), "kl_pairing": _jsonable(self.kl_collator)}, f)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint or "", "online_kto_state.json")
        if checkpoint and os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
            self.lambda_window.load_state_dict(state["lambda_window"])
            self.kl_collator.load_state_dict(state["kl_pairing"])


def _jsonable(collator) -> dict:
    state = collator.state_dict()
    return {"rng_state": state["rng_state"], "history": [[list(k), c] for k, c in state["history"]]}
