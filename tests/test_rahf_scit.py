"""SCIT (RAHF step 1a): Eq. 1 against a hand computation, options, GA scaling, columns, evaluate, LoRA."""

import math

import pytest
import torch
from peft import LoraConfig

from hf_repalign.formats import PreferenceFormatError, encode_pair
from hf_repalign.rahf.instructions import PROMPT_FORMAT, instructed_template
from hf_repalign.rahf.scit import SCITCollator, SCITConfig, SCITTrainer, scit_loss
from hf_repalign.testing import tiny_model

P_POS = "Be kind."
P_NEG = "Be rude, careless and wrong in every single answer."
ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five, obviously!!"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
    {"prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "Go away."},
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "7"},
]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none", use_cpu=True,
                save_strategy="no", preferred_instruction=P_POS, dispreferred_instruction=P_NEG, seed=0)
    base.update(kw)
    return SCITConfig(**base)


def _hand_logp(model, tokenizer, prompt, response, instruction, normalize=False):
    """log pi(response | instruction, prompt): one unpadded sequence, summed token by token."""
    ids, n_prompt = encode_pair(tokenizer, prompt, response, instructed_template(tokenizer, instruction))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), -1)
    total = sum(logprobs[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))
    return total / (len(ids) - n_prompt) if normalize else total


def _hand_eq1(model, tokenizer, rows, normalize=False, sft_weight=1.0, smoothing=0.0):
    losses = []
    for row in rows:
        for response, own, opposite in ((row["chosen"], P_POS, P_NEG), (row["rejected"], P_NEG, P_POS)):
            p = _hand_logp(model, tokenizer, row["prompt"], response, own, normalize)
            q = _hand_logp(model, tokenizer, row["prompt"], response, opposite, normalize)
            logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
            contrast = (1 - smoothing) * logsig(p - q) + smoothing * logsig(q - p)
            losses.append(-(sft_weight * p + contrast))
    return sum(losses) / len(losses)


def _trainer_loss(trainer, rows):
    features = [trainer.train_dataset[i] for i in range(2 * len(rows))]
    batch = trainer.data_collator(features)
    with torch.no_grad():
        return trainer.compute_loss(trainer.model.eval(), batch).item()


@pytest.mark.parametrize("chat", [True, False])
def test_scit_loss_matches_hand_eq1_with_instructions_of_different_lengths(tmp_path, tokenizer, plain_tokenizer, chat):
    tok = tokenizer if chat else plain_tokenizer
    assert len(tok(P_NEG)["input_ids"]) > len(tok(P_POS)["input_ids"]) + 20
    model = tiny_model("llama", vocab_size=len(tok))
    trainer = SCITTrainer(model, _args(tmp_path), train_dataset=ROWS[:2], processing_class=tok)
    expected = _hand_eq1(model, tok, ROWS[:2])
    assert _trainer_loss(trainer, ROWS[:2]) == pytest.approx(expected, rel=1e-5)


def test_reusing_positive_labels_on_negative_input_would_differ(tmp_path, tokenizer):
    """The bug in the authors' code: the positive sequence's label positions applied to the negative input."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    trainer = SCITTrainer(model, _args(tmp_path), train_dataset=ROWS[:1], processing_class=tokenizer)
    feature = trainer.train_dataset[0]
    assert feature["opposite_prompt_length"] != feature["prompt_length"]
    own_response = feature["input_ids"][feature["prompt_length"]:]
    assert feature["opposite_input_ids"][feature["opposite_prompt_length"]:] == own_response
    shifted = feature["opposite_input_ids"][feature["prompt_length"]:][: len(own_response)]
    assert shifted != own_response


def test_plain_prompt_format_is_the_papers(plain_tokenizer):
    text = instructed_template(plain_tokenizer, "Be kind.")("What is 2+2?", " It is 4.")
    assert text == "Human: Be kind. What is 2+2?\n\nAssistant: It is 4."
    assert PROMPT_FORMAT == "Human: {query}\n\nAssistant: "


def test_options_change_the_loss_as_documented(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    rows = ROWS[:2]
    cases = [
        (dict(length_normalize=True), dict(normalize=True)),
        (dict(sft_weight=0.0), dict(sft_weight=0.0)),
        (dict(sft_weight=2.5), dict(sft_weight=2.5)),
        (dict(label_smoothing=0.2), dict(smoothing=0.2)),
    ]
    plain = _hand_eq1(model, tokenizer, rows)
    for options, hand in cases:
        trainer = SCITTrainer(model, _args(tmp_path, **options), train_dataset=rows, processing_class=tokenizer)
        expected = _hand_eq1(model, tokenizer, rows, **hand)
        assert _trainer_loss(trainer, rows) == pytest.approx(expected, rel=1e-5), options
        assert abs(expected - plain) > 1e-4, options


def test_scit_loss_function_and_smoothing_bounds():
    p, q = torch.tensor([-3.0]), torch.tensor([-5.0])
    assert scit_loss(p, q).item() == pytest.approx(3.0 - math.log(1 / (1 + math.exp(-2.0))), rel=1e-6)
    assert scit_loss(p, q, sft_weight=0.0).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        SCITConfig(output_dir="x", label_smoothing=0.7, report_to="none")


@pytest.mark.parametrize("n_rows, whole, split", [(2, 4, 2), (3, 6, 4)])
def test_gradient_accumulation_weighs_examples_equally(tmp_path, tokenizer, n_rows, whole, split):
    """One optimizer step on the whole batch equals 2 accumulated micro-batches (SGD), also when the second is
    partial (3 rows = 6 examples: 4 + 2)."""
    weights = []
    for batch, accumulation in ((whole, 1), (split, 2)):
        model = tiny_model("llama", vocab_size=len(tokenizer))
        args = _args(tmp_path / f"{batch}", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                     max_steps=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=1e9)
        trainer = SCITTrainer(model, args, train_dataset=ROWS[:n_rows], processing_class=tokenizer)
        trainer.train()
        weights.append(model.model.embed_tokens.weight.detach().clone())
    untouched = tiny_model("llama", vocab_size=len(tokenizer)).model.embed_tokens.weight
    assert not torch.allclose(weights[0], untouched)
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


def test_columns_survive_remove_unused_columns_and_evaluate_works(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    args = _args(tmp_path, remove_unused_columns=True, max_steps=2, per_device_eval_batch_size=2)
    trainer = SCITTrainer(model, args, train_dataset=ROWS, eval_dataset=ROWS[:2], processing_class=tokenizer)
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert "eval_logps/own" in metrics
    output = trainer.predict(trainer.eval_dataset)
    assert output.predictions.shape == (4, 2)


def test_lora_training_changes_only_the_adapter(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SCITTrainer(model, _args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=ROWS,
                          processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear",
                                                                             task_type="CAUSAL_LM"))
    trainer.train()
    lora = {k: v for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())
    base = trainer.model.get_base_model().state_dict()
    for name, value in before.items():
        wrapped = name.replace(".weight", ".base_layer.weight")
        key = wrapped if wrapped in base else name
        torch.testing.assert_close(base[key], value)


def test_missing_columns_error_names_the_row(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    rows = ROWS[:2] + [{"prompt": "x", "chosen": "y", "rejected": None}]
    with pytest.raises(PreferenceFormatError, match="row 2"):
        SCITTrainer(model, _args(tmp_path), train_dataset=rows, processing_class=tokenizer)


def test_collator_labels_only_response_tokens():
    collator = SCITCollator(pad_token_id=0)
    batch = collator([{"input_ids": [5, 6, 7, 8], "prompt_length": 2, "opposite_input_ids": [9, 7, 8],
                       "opposite_prompt_length": 1}])
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 7, 8, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_truncation_keeps_the_response_identical_under_both_instructions(tmp_path, tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    rows = [{"prompt": "Tell me a story about a dragon. " * 3, "chosen": "Once upon a time " * 4, "rejected": "No."}]
    trainer = SCITTrainer(model, _args(tmp_path, max_length=200), train_dataset=rows, processing_class=tokenizer)
    longest_prompt = 0
    for feature in trainer.train_dataset:
        own = feature["input_ids"][feature["prompt_length"]:]
        opposite = feature["opposite_input_ids"][feature["opposite_prompt_length"]:]
        assert own == opposite and len(own) >= 1
        assert max(len(feature["input_ids"]), len(feature["opposite_input_ids"])) <= 200
        longest_prompt = max(longest_prompt, feature["prompt_length"], feature["opposite_prompt_length"])
    chosen = trainer.train_dataset[0]
    assert len(chosen["input_ids"]) - chosen["prompt_length"] == 200 - longest_prompt  # the response was cut
    with pytest.raises(ValueError, match="leaves no room"):  # the only row is skipped: nothing left to train on
        SCITTrainer(model, _args(tmp_path, max_length=longest_prompt), train_dataset=rows,
                    processing_class=tokenizer)


def test_prompts_longer_than_max_prompt_length_are_skipped_never_cut(tmp_path, tokenizer, monkeypatch):
    # A left cut would drop the instruction at the prompt's start, and the two stimuli would no longer contrast.
    from hf_repalign.rahf import scit

    warnings = []
    monkeypatch.setattr(scit.logger, "warning", warnings.append)
    rows = [{"prompt": "Hi?", "chosen": "Hello there.", "rejected": "No."},
            {"prompt": "Tell me a story about a dragon. " * 3, "chosen": "Once upon a time.", "rejected": "No."}]
    trainer = SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), _args(tmp_path, max_prompt_length=90),
                          train_dataset=rows, processing_class=tokenizer)
    assert len(trainer.train_dataset) == 2  # row 0 only, two examples
    for feature in trainer.train_dataset:
        for key in ("input_ids", "opposite_input_ids"):
            assert P_POS in tokenizer.decode(feature[key]) or P_NEG in tokenizer.decode(feature[key])
    assert any("skipped 1 row(s)" in w and "(rows 1)" in w and "max_prompt_length=90" in w for w in warnings)


def test_rows_whose_prompt_leaves_no_room_are_skipped_and_named(tmp_path, tokenizer, monkeypatch):
    from hf_repalign.rahf import scit

    warnings = []
    monkeypatch.setattr(scit.logger, "warning", warnings.append)
    rows = [{"prompt": "Hi?", "chosen": "Hello there.", "rejected": "No."},
            {"prompt": "Tell me a story about a dragon. " * 3, "chosen": "Once upon a time.", "rejected": "No."},
            {"prompt": "Bye?", "chosen": "Goodbye.", "rejected": "Go."}]
    trainer = SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), _args(tmp_path, max_length=120),
                          train_dataset=rows, processing_class=tokenizer)
    assert len(trainer.train_dataset) == 4  # rows 0 and 2, two examples each
    assert any("skipped 1 row(s)" in w and "(rows 1)" in w and "max_length=120" in w for w in warnings), warnings


def test_multi_turn_prompts_and_chat_templates_carry_the_instruction(tokenizer, plain_tokenizer):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    text = instructed_template(plain_tokenizer, "Be kind.")(dialogue, " See you.")
    assert text == "Human: Be kind. Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you."
    chat = instructed_template(tokenizer, "Be kind.")(dialogue, " See you.")
    assert chat.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert chat.endswith("<|im_start|>assistant\nSee you.<|im_end|>\n")
    assert "system" not in instructed_template(tokenizer, "")("Hi", "Yo")

