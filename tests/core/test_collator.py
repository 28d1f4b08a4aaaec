"""KTOExtCollator: every KL row pairs a prompt with a completion written for a different prompt."""

import itertools
import json
import random

import pytest
import torch
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from trl_kto_ext import KTOExtCollator
from trl_kto_ext.pairing import draw_kl_partners

PAD = 0
_UNIQUE = itertools.count(1000)  # completion ids unique across every example made


def make_examples(n_rows, n_prompts, rng):
    """Rows whose prompt is one of `n_prompts` distinct token sequences; completions are unique per row."""
    prompts = [[100 + p] * rng.randint(1, 4) + [p + 1] for p in range(n_prompts)]
    examples = []
    for _ in range(n_rows):
        p = rng.randrange(n_prompts)
        examples.append(
            {
                "prompt_ids": list(prompts[p]),
                "completion_ids": [next(_UNIQUE)] * rng.randint(1, 3),
                "label": rng.random() < 0.5,
            }
        )
    return examples


def split_rows(ids, completion_mask):
    """(prompt ids, completion ids) of each padded row, read back from the tensors."""
    rows = []
    for row, mask in zip(ids.tolist(), completion_mask.tolist()):
        prompt = [t for t, m in zip(row, mask) if m == 0 and t != PAD]
        completion = [t for t, m in zip(row, mask) if m == 1]
        rows.append((prompt, completion))
    return rows


def owner_of(completion, examples):
    return [i for i, ex in enumerate(examples) if ex["completion_ids"] == completion]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
@pytest.mark.parametrize("n_prompts", [1, 2, 3, 50])
def test_every_kl_row_has_a_different_prompt(batch_size, n_prompts):
    rng = random.Random(batch_size * 100 + n_prompts)
    dataset = make_examples(200, max(n_prompts, 2), rng)  # the dataset always has >= 2 prompts
    collator = KTOExtCollator(pad_token_id=PAD, seed=7, fallback_dataset=dataset)
    seen = list(dataset)  # every example the collator could have drawn from: the dataset and earlier batches
    for _ in range(60):
        batch_examples = make_examples(batch_size, n_prompts, rng)  # a batch may share one prompt
        batch = collator(batch_examples)
        targets = split_rows(batch["input_ids"], batch["completion_mask"])
        kl_rows = split_rows(batch["KL_input_ids"], batch["KL_completion_mask"])
        assert len(kl_rows) == batch_size
        for i, ((prompt, completion), (kl_prompt, kl_completion)) in enumerate(zip(targets, kl_rows)):
            assert prompt == batch_examples[i]["prompt_ids"] and completion == batch_examples[i]["completion_ids"]
            assert kl_prompt == prompt, "KL row i must start with prompt i"
            assert kl_completion != completion, "a KL row may never reuse its own completion"
            pool = batch_examples + seen
            owners = owner_of(kl_completion, pool)
            assert owners, "the KL completion must come from a real example"
            assert all(pool[j]["prompt_ids"] != prompt for j in owners), "KL completion written for the same prompt"
        assert batch["label"].dtype == torch.bool
        seen.extend(batch_examples)


def test_paired_data_side_by_side_never_pairs_a_prompt_with_its_own_answers():
    # Paired data turned unpaired: (x, chosen) and (x, rejected) adjacent, prompts repeated twice per batch.
    rng = random.Random(0)
    collator = KTOExtCollator(pad_token_id=PAD, seed=1)
    for step in range(100):
        examples = []
        for p in range(4):
            prompt = [200 + step, p + 1]
            examples.append({"prompt_ids": prompt, "completion_ids": [300 + 2 * p], "label": True})
            examples.append({"prompt_ids": prompt, "completion_ids": [301 + 2 * p], "label": False})
        rng.shuffle(examples)
        batch = collator(examples)
        for i, (_, kl_completion) in enumerate(split_rows(batch["KL_input_ids"], batch["KL_completion_mask"])):
            partner = owner_of(kl_completion, examples)[0]
            assert examples[partner]["prompt_ids"] != examples[i]["prompt_ids"]


def test_batch_of_one_uses_history_then_dataset():
    dataset = [{"prompt_ids": [5], "completion_ids": [50], "label": True}]
    collator = KTOExtCollator(pad_token_id=PAD, seed=0, fallback_dataset=dataset)
    first = collator([{"prompt_ids": [1, 2], "completion_ids": [9], "label": True}])
    assert first["KL_input_ids"].tolist() == [[1, 2, 50]]  # from the dataset: nothing seen before
    second = collator([{"prompt_ids": [3], "completion_ids": [8, 8], "label": False}])
    assert second["KL_input_ids"].tolist() == [[3, 9]]  # from the previous batch


def test_no_other_prompt_anywhere_is_a_clear_error():
    collator = KTOExtCollator(pad_token_id=PAD, seed=0)
    with pytest.raises(ValueError, match="at least two distinct prompts"):
        collator([{"prompt_ids": [1], "completion_ids": [2], "label": True}] * 3)


def test_same_seed_same_pairing_different_seed_different_pairing():
    rng = random.Random(3)
    batches = [make_examples(8, 8, rng) for _ in range(20)]

    def pairings(seed):
        collator = KTOExtCollator(pad_token_id=PAD, seed=seed)
        return [collator(b)["KL_input_ids"].tolist() for b in batches]

    assert pairings(11) == pairings(11)
    assert pairings(11) != pairings(12)


def test_state_dict_resumes_the_same_pairings():
    rng = random.Random(4)
    batches = [make_examples(5, 5, rng) for _ in range(10)]
    straight = KTOExtCollator(pad_token_id=PAD, seed=2)
    expected = [straight(b)["KL_input_ids"].tolist() for b in batches]
    first = KTOExtCollator(pad_token_id=PAD, seed=2)
    for b in batches[:4]:
        first(b)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = KTOExtCollator(pad_token_id=PAD, seed=999)
    resumed.load_state_dict(state)
    assert [resumed(b)["KL_input_ids"].tolist() for b in batches[4:]] == expected[4:]


def test_padding_and_keys_match_trl_collator():
    rng = random.Random(5)
    examples = make_examples(6, 6, rng)
    ours = KTOExtCollator(pad_token_id=PAD, seed=0, max_length=4)(examples)
    trl = DataCollatorForUnpairedPreference(pad_token_id=PAD, max_length=4)(examples)
    assert set(ours) == set(trl) | {"KL_input_ids", "KL_attention_mask", "KL_completion_mask"}
    for key in trl:
        assert torch.equal(ours[key], trl[key])
    assert ours["KL_input_ids"].shape[1] <= 4


def test_apo_mode_builds_no_kl_rows():
    examples = make_examples(3, 3, random.Random(6))
    batch = KTOExtCollator(pad_token_id=PAD, build_kl=False)(examples)
    assert "KL_input_ids" not in batch


def test_cycle_is_used_when_prompts_are_distinct():
    # With distinct prompts the pairing is a permutation: each completion is reused exactly once.
    rng = random.Random(0)
    for n in range(2, 12):
        partners = draw_kl_partners(list(range(n)), rng)
        assert sorted(partners) == list(range(n)) and all(p != i for i, p in enumerate(partners))
