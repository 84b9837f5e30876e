"""RAHFTrainer with the LoRA on the base (lora_on="base"): loss by hand, zero loss, save/reload, resume, precomputed
targets, Dual sources, errors. The authors' arrangement (LoRA on the step-1 model) is in test_rahf_fidelity.py."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from hf_repalign.formats import PreferenceFormatError
from hf_repalign.rahf.trainer import RAHFConfig, rahf_loss
from hf_repalign.testing import tiny_model

from rahf_helpers import LAYERS, P_NEG, P_POS, ROWS, make_args, make_trainer, scit_adapter  # noqa: F401
from rahf_helpers import first_batch as _batch
from rahf_helpers import lora as _lora
from rahf_helpers import states as _states


def _args(tmp_path, **kw):
    return make_args(tmp_path, **{"lora_on": "base", **kw})


def _trainer(tmp_path, tokenizer, instructed, peft_config=None, rows=ROWS, **kw):
    return make_trainer(tmp_path, tokenizer, instructed, peft_config, rows=rows, **{"lora_on": "base", **kw})


@pytest.mark.parametrize("loss_type", ["l2", "mse"])
def test_loss_matches_hand_computation(tmp_path, tokenizer, scit_adapter, loss_type):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, _lora(init_lora_weights=False), alpha=3.0,
                       loss_type=loss_type)
    batch = _batch(trainer)
    got = trainer.compute_loss(trainer.model.eval(), batch).item()

    fresh = tiny_model("llama", vocab_size=len(tokenizer))
    base = _states(fresh, batch["input_ids"], batch["attention_mask"])
    scit = PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tokenizer)), scit_adapter).eval()
    pos = _states(scit, batch["positive_input_ids"], batch["positive_attention_mask"])
    neg = _states(scit, batch["negative_input_ids"], batch["negative_attention_mask"])
    lora_model = trainer.model
    lora_model.set_adapter("default")
    lora = _states(lora_model, batch["input_ids"], batch["attention_mask"])
    terms = []
    for layer in range(len(LAYERS)):
        for b in range(batch["input_ids"].shape[0]):
            for t in range(batch["input_ids"].shape[1]):
                if batch["response_mask"][b, t]:
                    target = base[layer][b, t] + 3.0 * (pos[layer][b, t] - neg[layer][b, t])
                    diff = (lora[layer][b, t] - target).double()
                    terms.append(diff.norm().item() if loss_type == "l2" else diff.pow(2).mean().item())
    assert len(terms) == len(LAYERS) * batch["response_mask"].sum().item()
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_loss_is_zero_with_alpha_zero_and_zero_initialised_adapter(tmp_path, tokenizer, scit_adapter):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, alpha=0.0)
    loss = trainer.compute_loss(trainer.model.train(), _batch(trainer, 4))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, alpha=5.0)
    assert trainer.compute_loss(trainer.model.train(), _batch(trainer, 4)).item() > 1e-4


def test_rahf_loss_ignores_masked_positions():
    lora, base, v = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2)
    lora[0, 0, 0] = torch.tensor([3.0, 4.0])  # masked: would add 5
    lora[0, 0, 1] = torch.tensor([0.0, 2.0])
    mask = torch.tensor([[0, 1, 1]])
    assert rahf_loss(lora, base, v, mask).item() == pytest.approx(1.0)
    assert rahf_loss(lora, base, v, mask, loss_type="mse").item() == pytest.approx(1.0)
    lora[0, 0, 0] = float("nan")  # NaNs at masked positions must not leak either
    assert rahf_loss(lora, base, v, mask).item() == pytest.approx(1.0)
    assert rahf_loss(lora, base, v, torch.zeros_like(mask)).item() == 0.0


def test_training_moves_towards_target_and_saved_adapter_reloads(tmp_path, tokenizer, scit_adapter):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, max_steps=6, learning_rate=5e-3, logging_steps=1,
                       dataset_name="toy-prefs")
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    out = trainer.save_pretrained(tmp_path / "adapter")
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and not any("rahf_scit" in k for k in weights)
    card = (out / "README.md").read_text()
    assert "RAHF-SCIT" in card and "1, 3" in card and "toy-prefs" in card and "PeftModel.from_pretrained" in card

    reloaded = PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tokenizer)), str(out)).eval()
    trained = trainer.model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
        base_logits = tiny_model("llama", vocab_size=len(tokenizer))(input_ids=ids).logits
    assert not torch.allclose(base_logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize("lora_on", ["base", "instructed"])  # instructed: the LoRA stacked on the SCIT adapter
def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path, tokenizer, scit_adapter, lora_on):
    common = dict(max_steps=4, learning_rate=5e-3, save_strategy="steps", save_steps=2, lora_on=lora_on)
    full = make_trainer(tmp_path / "a", tokenizer, scit_adapter, **common)
    full.train()
    expected = {k: v.clone() for k, v in full.model.state_dict().items() if ".default." in k}
    resumed = make_trainer(tmp_path / "b", tokenizer, scit_adapter, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    got = {k: v for k, v in resumed.model.state_dict().items() if ".default." in k}
    assert resumed.state.global_step == 4 and expected.keys() == got.keys()
    assert resumed.stack == ([] if lora_on == "base" else ["rahf_scit"])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_precomputed_targets_give_the_same_loss(tmp_path, tokenizer, scit_adapter):
    live = _trainer(tmp_path, tokenizer, scit_adapter, alpha=2.0)
    directory = live.precompute_targets(tmp_path / "targets", shard_size=3)
    assert len(list(directory.glob("targets-*.safetensors"))) == 2
    stored = _trainer(tmp_path, tokenizer, None, alpha=2.0, precomputed_targets=str(directory))
    batch = _batch(live, 4)
    torch.testing.assert_close(stored.compute_loss(stored.model.eval(), batch),
                               live.compute_loss(live.model.eval(), batch))


def test_dual_with_separate_models_and_with_adapters(tmp_path, tokenizer, scit_adapter):
    good = tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    bad = tiny_model("llama", vocab_size=len(tokenizer), seed=2)
    trainer = _trainer(tmp_path, tokenizer, (good, bad), method="dual", max_steps=1)
    assert trainer.args.preferred_instruction == P_POS  # explicit instructions are kept
    trainer.train()
    batch = _batch(trainer)
    v = trainer._difference(batch, batch["input_ids"])
    assert v.abs().sum() > 0
    # adapters on the same base: same adapter twice gives v = 0 on identical stimuli
    same = _trainer(tmp_path, tokenizer, (scit_adapter, scit_adapter), method="dual", preferred_instruction="",
                    dispreferred_instruction="", alpha=1.0)
    assert same._difference(_batch(same), batch["input_ids"]).abs().max().item() == 0.0


def test_dual_default_instructions_are_empty():
    args = RAHFConfig(output_dir="x", method="dual", report_to="none")
    assert args.preferred_instruction == "" and args.dispreferred_instruction == ""


def test_lora_covers_only_layers_below_the_top_target(tmp_path, tokenizer, scit_adapter):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, target_layers=[1, 2])
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all(".layers.0." in n or ".layers.1." in n for n in names)


def test_clear_errors(tmp_path, tokenizer, scit_adapter):
    with pytest.raises(ValueError, match="out of range"):
        _trainer(tmp_path, tokenizer, scit_adapter, target_layers=[1, 7])
    with pytest.raises(ValueError, match="embedding"):
        _trainer(tmp_path, tokenizer, scit_adapter, target_layers=[0, 1])
    with pytest.raises(PreferenceFormatError, match="row 1.*rejected"):
        _trainer(tmp_path, tokenizer, scit_adapter, rows=[ROWS[0], {"prompt": "a", "chosen": "b"}])
    other = tmp_path / "other_adapter"
    get_peft_model(tiny_model("llama", vocab_size=len(tokenizer), hidden_size=48), _lora()).save_pretrained(str(other))
    with pytest.raises(ValueError, match="does not fit the base model"):
        _trainer(tmp_path, tokenizer, str(other))
    with pytest.raises(ValueError, match="layers"):
        _trainer(tmp_path, tokenizer, tiny_model("llama", vocab_size=len(tokenizer), num_layers=6))
    with pytest.raises(ValueError, match="needs 2 instructed"):
        _trainer(tmp_path, tokenizer, scit_adapter, method="dual")
    with pytest.raises(ValueError, match="instructed"):
        _trainer(tmp_path, tokenizer, None)
    with pytest.raises(ValueError, match="neither"):
        _trainer(tmp_path, tokenizer, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="loss_type"):
        _args(tmp_path, loss_type="l1")


def test_interrupted_precompute_leaves_the_previous_targets_intact(tmp_path):
    from hf_repalign.rahf.store import TargetStore, write_targets

    old = [(i, torch.full((2, 3, 4), float(i))) for i in range(4)]
    write_targets(tmp_path / "targets", old, LAYERS, shard_size=2)

    def interrupted():
        yield from [(i, torch.full((2, 3, 4), -1.0)) for i in range(3)]  # one full shard is flushed first
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_targets(tmp_path / "targets", interrupted(), LAYERS, shard_size=2)
    store = TargetStore(tmp_path / "targets")
    for i, tensor in old:
        torch.testing.assert_close(store.get(i), tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["targets"]  # no temp folder left behind
    with pytest.raises(KeyboardInterrupt):
        write_targets(tmp_path / "fresh", interrupted(), LAYERS, shard_size=2)
    assert not (tmp_path / "fresh").exists()


def test_gradient_accumulation_weighs_every_valid_position_equally(tmp_path, tokenizer, scit_adapter):
    """One step on 4 rows == 2 accumulated micro-batches of 2 whose valid-position counts differ (2+2 vs 6+6)."""
    rows = [{"prompt": "Hi?", "chosen": "Y", "rejected": "N"}, {"prompt": "Ok?", "chosen": "N", "rejected": "Y"},
            {"prompt": "Why?", "chosen": "Because it is.", "rejected": "No."},
            {"prompt": "How?", "chosen": "Slowly and well.", "rejected": "Eh."}]
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = _trainer(tmp_path / f"{batch}", tokenizer, scit_adapter, rows=rows, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                           lr_scheduler_type="constant", max_grad_norm=1e9, logging_steps=1)
        counts = [trainer._count_items(trainer.data_collator([trainer.train_dataset[i]])).item() for i in range(4)]
        assert counts[0] < counts[2]  # short and long responses: unequal micro-batches
        trainer.train()
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k})
        assert isinstance(trainer.state.log_history[0]["lora_shift"], float)
    assert any(v.abs().sum() > 0 for v in weights[0].values())
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6)


def test_metrics_stay_on_device_until_logged(tmp_path, tokenizer, scit_adapter):
    trainer = _trainer(tmp_path, tokenizer, scit_adapter)
    trainer.compute_loss(trainer.model.train(), _batch(trainer))
    assert all(isinstance(v, torch.Tensor) for values in trainer._metrics["train"].values() for v in values)
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert isinstance(logs["target_shift"], float) and not trainer._metrics["train"]


def test_scit_stimuli_share_one_no_grad_forward(tmp_path, tokenizer, scit_adapter, monkeypatch):
    """Per step: base, p+ and p- together (one SCIT model), then the LoRA forward; Dual needs one more."""
    from hf_repalign.rahf import trainer as rahf_trainer

    calls, original = [], rahf_trainer.activity_patterns

    def counted(model, input_ids, *args):
        calls.append(input_ids.shape[0])
        return original(model, input_ids, *args)

    monkeypatch.setattr(rahf_trainer, "activity_patterns", counted)
    trainer = _trainer(tmp_path, tokenizer, scit_adapter)
    trainer.compute_loss(trainer.model.train(), _batch(trainer))
    assert calls == [2, 4, 2]
    calls.clear()
    dual = _trainer(tmp_path, tokenizer, (scit_adapter, scit_adapter), method="dual")
    dual.compute_loss(dual.model.train(), _batch(dual))
    assert calls == [2, 2, 2, 2]


def test_prompts_longer_than_max_prompt_length_are_skipped_never_cut(tmp_path, tokenizer, scit_adapter, monkeypatch):
    # A left cut would drop the instruction at the start of the p+ / p- prompts: v would then be ~0 for that row.
    from hf_repalign.rahf import scit

    warnings = []
    monkeypatch.setattr(scit.logger, "warning", warnings.append)
    rows = [*ROWS[:2], {"prompt": "Tell me a story about a dragon. " * 4, "chosen": "Once.", "rejected": "No."}]
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, rows=rows, max_prompt_length=100)
    assert sorted(trainer.train_dataset["example_index"]) == [0, 1]
    assert any("RAHF: skipped 1 row(s)" in w and "(rows 2)" in w and "max_prompt_length=100" in w for w in warnings)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for key in ("positive_input_ids", "negative_input_ids"):
        texts = tokenizer.batch_decode(batch[key])
        assert all(P_POS in t or P_NEG in t for t in texts)
    with pytest.raises(ValueError, match="no training example left"):
        _trainer(tmp_path, tokenizer, scit_adapter, rows=rows[2:], max_prompt_length=100)
    with pytest.raises(ValueError, match=r"example\(s\) \[7\] have a prompt longer"):  # pre-tokenized rows
        trainer.data_collator([{**trainer.train_dataset[0], "positive_prompt_ids": [5] * 101, "example_index": 7}])


def test_saving_an_adapter_asks_the_hub_nothing(tmp_path, tokenizer, scit_adapter, monkeypatch):
    # peft's save_embedding_layers="auto" looks the base config up on the Hub; RAHF never resizes the vocabulary.
    from peft.utils import save_and_load

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked during an adapter save")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_hub)
    trainer = _trainer(tmp_path, tokenizer, scit_adapter, max_steps=1, base_model="org/tiny-llama")
    trainer.train()
    trainer.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
