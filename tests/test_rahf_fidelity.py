"""RAHF as the authors ran it (LoRA on the step-1 model, presets) and training that cannot fail silently (mixed
precision, non-finite settings and losses, seeds, bases that do not match)."""

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_repalign.rahf.instructions import DISPREFERRED_INSTRUCTION, PREFERRED_INSTRUCTION
from hf_repalign.rahf.scit import SCITConfig, SCITTrainer
from hf_repalign.rahf.trainer import RAHFConfig, stimulus_sides
from hf_repalign.testing import tiny_model

from rahf_helpers import ROWS, scit_adapter  # noqa: F401
from rahf_helpers import first_batch as _batch
from rahf_helpers import lora as _lora
from rahf_helpers import make_args as _args
from rahf_helpers import make_trainer as _trainer
from rahf_helpers import states as _states


def _hand_l2(lora, base, pos, neg, mask, alpha):
    target = base + alpha * (pos - neg)
    return (lora - target).double().norm(dim=-1)[:, mask.bool()].mean().item()


# ---- 1. the authors' arrangement: the LoRA on the step-1 model ----

def test_lora_on_the_scit_adapter_equals_a_lora_on_the_merged_scit_model(tmp_path, tokenizer, scit_adapter):
    """Naive reference: merge the SCIT adapter into a fresh base, put the trained LoRA's weights on it by hand."""
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, _lora(init_lora_weights=False), alpha=3.0)
    assert trainer.args.lora_on == "instructed" and trainer.stack == ["rahf_scit"]
    assert trainer.positive.model is None  # no second copy of the base weights
    batch = _batch(trainer)
    got = trainer.compute_loss(trainer.model.eval(), batch).item()

    scit = PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tokenizer)), scit_adapter).merge_and_unload()
    base = _states(scit, batch["input_ids"], batch["attention_mask"])
    pos = _states(scit, batch["positive_input_ids"], batch["positive_attention_mask"])
    neg = _states(scit, batch["negative_input_ids"], batch["negative_attention_mask"])
    reference = get_peft_model(scit, trainer.model.peft_config["default"])
    trained = {k: v for k, v in trainer.model.state_dict().items() if ".default." in k}
    missing = reference.load_state_dict(trained, strict=False)
    assert not missing.unexpected_keys
    lora = _states(reference.eval(), batch["input_ids"], batch["attention_mask"])
    assert got == pytest.approx(_hand_l2(lora, base, pos, neg, batch["response_mask"], 3.0), rel=1e-4)

    # and the other arrangement differs: A_base from the bare base, the LoRA without the SCIT adapter
    on_base = _trainer(tmp_path, tokenizer, scit_adapter, _lora(init_lora_weights=False), alpha=3.0, lora_on="base")
    assert on_base.stack == [] and on_base.compute_loss(on_base.model.eval(), batch).item() != pytest.approx(got)


def test_trained_adapters_and_frozen_step1_adapter(tmp_path, tokenizer, scit_adapter):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, max_steps=2, learning_rate=1e-2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if ".rahf_scit." in k}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    trainer.train()
    after = {k: v for k, v in trainer.model.state_dict().items() if ".rahf_scit." in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step-1 adapter never moves
    assert trainer.model.active_adapter == "default"  # what the Trainer's checkpoint/resume code reads


def test_full_step1_model_carries_the_lora_itself(tmp_path, tokenizer):
    scit = tiny_model("llama", vocab_size=len(tokenizer), seed=3)
    trainer = _trainer(tmp_path, tokenizer, scit, _lora(init_lora_weights=False), alpha=2.0)
    assert trainer.model.get_base_model() is scit and trainer.stack == []
    batch = _batch(trainer)
    got = trainer.compute_loss(trainer.model.eval(), batch).item()
    reference = tiny_model("llama", vocab_size=len(tokenizer), seed=3)
    base = _states(reference, batch["input_ids"], batch["attention_mask"])
    pos = _states(reference, batch["positive_input_ids"], batch["positive_attention_mask"])
    neg = _states(reference, batch["negative_input_ids"], batch["negative_attention_mask"])
    lora = _states(trainer.model.eval(), batch["input_ids"], batch["attention_mask"])
    assert got == pytest.approx(_hand_l2(lora, base, pos, neg, batch["response_mask"], 2.0), rel=1e-4)
    # the same from a model folder without a tokenizer (the given processing_class is used)
    reference.save_pretrained(tmp_path / "scit_full")
    folder = _trainer(tmp_path, tokenizer, str(tmp_path / "scit_full"), _lora(init_lora_weights=False), alpha=2.0)
    assert folder.stack == [] and folder.positive.model is None
    with torch.no_grad():
        folder.model.load_state_dict({k: v for k, v in trainer.model.state_dict().items() if ".default." in k},
                                     strict=False)
    assert folder.compute_loss(folder.model.eval(), batch).item() == pytest.approx(got, rel=1e-5)


def test_dual_lora_on_the_good_adapter(tmp_path, tokenizer, scit_adapter):
    bad = tmp_path / "bad"
    base = tiny_model("llama", vocab_size=len(tokenizer))
    torch.manual_seed(5)  # another random adapter than the good one (tiny_model reseeds)
    get_peft_model(base, _lora(init_lora_weights=False)).save_pretrained(str(bad))
    # The byte-level test tokenizer makes the authors' instructions ~400 tokens, past the preset's 256.
    trainer = _trainer(tmp_path, tokenizer, (scit_adapter, str(bad)), method="dual", preset="authors",
                       preferred_instruction=None, dispreferred_instruction=None, max_prompt_length=1000)
    assert trainer.stack == ["rahf_good"] and trainer.negative.adapters == ["rahf_bad"]
    batch = _batch(trainer)
    # authors' Dual: target and good stimulus are the same text, so the good pass is A_base's (skipped)
    assert torch.equal(batch["positive_input_ids"], batch["input_ids"])
    with torch.no_grad():
        lora, base, v = trainer.representations(trainer.model, batch)
        good = trainer._patterns(trainer.positive, batch["positive_input_ids"], batch["positive_attention_mask"])
        bad_states = trainer._patterns(trainer.negative, batch["negative_input_ids"],
                                       batch["negative_attention_mask"])
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(v[:, mask], (good - bad_states)[:, mask])
    assert v[:, mask].abs().sum() > 0


# ---- presets ----

def test_authors_presets_set_the_scripts_values_and_keep_explicit_ones():
    scit = RAHFConfig(output_dir="x", report_to="none", method="scit", preset="authors")
    assert (scit.learning_rate, str(scit.lr_scheduler_type.value), scit.max_response_tokens) == (3e-4, "constant", 512)
    assert scit.lora_target_modules == ["q_proj", "v_proj"] and scit.layer_band == [10, 12, 14, 16, 18]
    assert scit.stimulus_response == "random" and scit.lora_on == "instructed" and scit.alpha == 5.0
    assert scit.preferred_instruction == PREFERRED_INSTRUCTION
    assert scit.dispreferred_instruction == DISPREFERRED_INSTRUCTION and scit.target_instruction == ""
    dual = RAHFConfig(output_dir="x", report_to="none", method="dual", preset="authors", learning_rate=1e-4)
    assert dual.learning_rate == 1e-4  # explicit value kept
    assert (dual.max_response_tokens, dual.stimulus_response, dual.layer_band) == (64, "both", [10, 12, 14, 16, 18, 20])
    assert dual.target_instruction == dual.preferred_instruction == dual.dispreferred_instruction == \
        PREFERRED_INSTRUCTION  # compute_loss_DUAL feeds input_ids[:, 0] to target, good and bad model
    plain = RAHFConfig(output_dir="x", report_to="none")
    assert plain.learning_rate == 5e-5 and plain.lora_target_modules is None and plain.stimulus_response == "chosen"
    with pytest.raises(ValueError, match="preset"):
        RAHFConfig(output_dir="x", report_to="none", preset="paper")


def test_random_stimulus_response_is_seeded_per_row():
    draws = [stimulus_sides("random", i, seed=0) for i in range(200)]
    assert {d[0] for d in draws} == {"chosen", "rejected"} and all(len(d) == 1 for d in draws)
    assert draws == [stimulus_sides("random", i, seed=0) for i in range(200)]
    assert draws != [stimulus_sides("random", i, seed=1) for i in range(200)]
    assert stimulus_sides("both", 3, 0) == ["chosen", "rejected"]


def test_random_stimuli_do_not_depend_on_batching(tmp_path, tokenizer, scit_adapter):
    from hf_repalign.rahf.trainer import build_rahf_examples

    rows = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}!"} for i in range(12)]
    args = _args(tmp_path, stimulus_response="random")
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    whole = build_rahf_examples(columns, list(range(12)), tokenizer, args)
    parts = [build_rahf_examples({k: v[i:i + 5] for k, v in columns.items()}, list(range(i, min(i + 5, 12))),
                                 tokenizer, args) for i in range(0, 12, 5)]
    assert whole["response_ids"] == [r for part in parts for r in part["response_ids"]]
    assert whole["example_index"] == list(range(12))


# ---- mixed precision ----

@pytest.mark.parametrize("lora_on", ["instructed", "base"])
def test_alpha_zero_fresh_lora_gives_exactly_zero_loss_under_bf16(tmp_path, tokenizer, scit_adapter, lora_on,
                                                                  monkeypatch):
    def run(path):
        trainer = _trainer(path, tokenizer, scit_adapter, alpha=0.0, bf16=True, max_steps=1, logging_steps=1,
                           lora_on=lora_on, lora_dropout=0.1)
        trainer.train()
        return trainer.state.log_history[0]

    log = run(tmp_path / "a")
    # Exact: a fresh LoRA adds exact zeros, and A_base and A_lora then run the same bf16 kernels on the same input.
    assert log["loss"] == 0.0 and log["lora_shift"] == 0.0
    # The check can fail: with the no-grad forwards outside the autocast, the bf16 LoRA pass differs from them.
    import contextlib

    monkeypatch.setattr("accelerate.Accelerator.autocast", lambda self, *a, **k: contextlib.nullcontext())
    assert run(tmp_path / "b")["lora_shift"] > 0.0


# ---- non-finite settings and losses ----

@pytest.mark.parametrize("kw, match", [
    (dict(alpha=float("nan")), "alpha must be a finite"), (dict(alpha=float("inf")), "alpha must be a finite"),
    (dict(alpha=-1.0), "alpha must be >= 0"), (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(target_layers=[]), "non-empty"), (dict(target_layers=[1, 1]), "without repeats"),
    (dict(target_layers=[0, 2]), "embedding"), (dict(target_layers=[1.5]), "integer"),
    (dict(layer_band=[40]), "<= 32"), (dict(max_response_tokens=0), "max_response_tokens"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_r=0), "lora_r"), (dict(stimulus_response="x"), "one of"),
    (dict(lora_on="merged"), "lora_on"),
])
def test_rahf_config_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        RAHFConfig(output_dir="x", report_to="none", **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(sft_weight=float("nan")), "sft_weight"), (dict(sft_weight=-1.0), "sft_weight"),
    (dict(label_smoothing=float("nan")), "label_smoothing"), (dict(label_smoothing=0.7), "label_smoothing"),
    (dict(max_length=0), "max_length"),
])
def test_scit_config_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SCITConfig(output_dir="x", report_to="none", **kw)


def test_dual_config_refuses_a_nan_learning_rate():
    from hf_repalign.rahf.dual import DualConfig

    with pytest.raises(ValueError, match="learning_rate"):
        DualConfig(output_dir="x", report_to="none", use_cpu=True, learning_rate=float("nan"))


def _poison_second_call(trainer, monkeypatch):
    original, calls = trainer.compute_loss, []

    def compute_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)


def test_a_nan_loss_stops_rahf_training_naming_the_step_and_nothing_nan_is_saved(tmp_path, tokenizer,
                                                                                 scit_adapter, monkeypatch):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, max_steps=3, save_strategy="steps", save_steps=1,
                       learning_rate=1e-2, logging_steps=1)
    _poison_second_call(trainer, monkeypatch)
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    assert all(torch.isfinite(p).all() for n, p in trainer.model.named_parameters() if ".default." in n)
    # saving refuses non-finite weights outright, and leaves no folder behind
    name, weight = next((n, p) for n, p in trainer.model.named_parameters() if ".default." in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        trainer.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_nan_loss_stops_scit_training(tmp_path, tokenizer, monkeypatch):
    args = SCITConfig(output_dir=str(tmp_path / "scit"), per_device_train_batch_size=2, report_to="none",
                      use_cpu=True, save_strategy="no", max_steps=3)
    trainer = SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                          processing_class=tokenizer, peft_config=_lora())
    _poison_second_call(trainer, monkeypatch)
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.train()


# ---- seeds ----

def test_identical_runs_give_bit_identical_adapters_and_the_seed_matters(tmp_path, tokenizer, scit_adapter):
    def run(path, seed):
        trainer = _trainer(path, tokenizer, scit_adapter, max_steps=2, learning_rate=1e-2, seed=seed,
                           lora_dropout=0.1, stimulus_response="random")
        init = {k: v.clone() for k, v in trainer.model.state_dict().items() if ".default." in k}
        trainer.train()
        return init, {k: v.clone() for k, v in trainer.model.state_dict().items() if ".default." in k}

    (init_a, a), (init_b, b), (init_c, _) = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 1)
    # Bit-exact on purpose: the claim is that `seed` fixes everything (LoRA init, dropout, data order) in one process.
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(init_a[k], init_c[k]) for k in init_a)


def test_scit_lora_init_follows_the_seed(tmp_path, tokenizer):
    def init(seed):
        args = SCITConfig(output_dir=str(tmp_path / "s"), report_to="none", use_cpu=True, seed=seed)
        trainer = SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                              processing_class=tokenizer, peft_config=_lora())
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_A" in k}

    a, b, c = init(0), init(0), init(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)


# ---- instructed adapters and targets made for another base ----

def test_adapter_for_a_shallower_base_is_refused(tmp_path, tokenizer):
    four = tmp_path / "four"
    get_peft_model(tiny_model("llama", vocab_size=len(tokenizer), num_layers=4), _lora()).save_pretrained(str(four))
    eight = tiny_model("llama", vocab_size=len(tokenizer), num_layers=8)
    with pytest.raises(ValueError, match="4-layer base; this base has 8 layers"):
        _trainer(tmp_path, tokenizer, str(four), model=eight)
    # with the signature that our trainers record at save time
    (four / "hf_repalign_base.json").write_text(json.dumps({"base_model": "tiny", "num_hidden_layers": 4,
                                                            "hidden_size": 32, "vocab_size": len(tokenizer)}))
    with pytest.raises(ValueError, match="num_hidden_layers=4"):
        _trainer(tmp_path, tokenizer, str(four), model=tiny_model("llama", vocab_size=len(tokenizer), num_layers=8))


def test_saved_adapters_record_their_base(tmp_path, tokenizer, scit_adapter):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter)
    out = trainer.save_pretrained(tmp_path / "rahf")
    signature = json.loads((out / "hf_repalign_base.json").read_text())
    assert signature["num_hidden_layers"] == 4 and signature["hidden_size"] == 32
    args = SCITConfig(output_dir=str(tmp_path / "scit"), report_to="none", use_cpu=True, max_steps=1,
                      per_device_train_batch_size=2, save_strategy="no")
    scit = SCITTrainer(tiny_model("llama", vocab_size=len(tokenizer)), args, train_dataset=ROWS,
                       processing_class=tokenizer, peft_config=_lora())
    scit.train()
    scit.save_model(str(tmp_path / "scit"))
    assert json.loads((tmp_path / "scit" / "hf_repalign_base.json").read_text())["num_hidden_layers"] == 4


def test_precomputed_targets_for_another_base_are_refused(tmp_path, tokenizer, scit_adapter):
    live = _trainer(tmp_path, tokenizer, scit_adapter, lora_on="base")
    directory = live.precompute_targets(tmp_path / "targets")
    assert json.loads((directory / "targets.json").read_text())["base"]["hidden_size"] == 32
    wide = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size=32"):
        _trainer(tmp_path, tokenizer, None, model=wide, precomputed_targets=str(directory))
    ok = _trainer(tmp_path, tokenizer, None, precomputed_targets=str(directory), lora_on="base")
    assert math.isfinite(ok.compute_loss(ok.model.eval(), _batch(ok)).item())


def test_stacked_reload_of_the_authors_arrangement_matches_the_trained_model(tmp_path, tokenizer, scit_adapter):
    from hf_repalign.rahf import stack_adapters

    trainer = _trainer(tmp_path, tokenizer, scit_adapter, max_steps=2, learning_rate=1e-2)
    trainer.train()
    out = trainer.save_pretrained(tmp_path / "rahf", save_as="stacked")
    signature = json.loads((out / "hf_repalign_base.json").read_text())
    assert signature["lora_on"] == "instructed" and signature["stacked_on"] == [scit_adapter]
    reloaded = stack_adapters(tiny_model("llama", vocab_size=len(tokenizer)), [scit_adapter, out])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(reloaded.merge_and_unload()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        alone = PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tokenizer)), str(out)).eval()
        assert not torch.allclose(alone(input_ids=ids).logits, expected)  # the RAHF LoRA alone is not the model


def test_a_nan_loss_stops_dual_training_and_saves_no_folder(tmp_path, tokenizer, monkeypatch):
    from hf_repalign.rahf import dual

    original, calls = dual.SFTTrainer.compute_loss, []

    def compute_loss(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(dual.SFTTrainer, "compute_loss", compute_loss)
    args = dual.DualConfig(output_dir=str(tmp_path / "dual"), per_device_train_batch_size=2, max_steps=3,
                           report_to="none", use_cpu=True, save_strategy="no", max_length=None)
    with pytest.raises(FloatingPointError, match="step 2"):
        dual.train_dual(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ROWS, args, peft_config=_lora())
    assert not (tmp_path / "dual" / "good").exists()
