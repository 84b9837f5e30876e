"""End to end: annotate with the legend-margin pipeline, then train trl.RewardTrainer on the output as is."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, pipeline

import hf_repalign  # noqa: F401
from hf_repalign.legend import MarginVector

trl = pytest.importorskip("trl")


def reward_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                         max_position_embeddings=512)
    return LlamaForSequenceClassification(config)


def train_losses(dataset, tokenizer, tmp_path):
    args = trl.RewardConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                            logging_steps=1, seed=0, data_seed=0, report_to=[], save_strategy="no", use_cpu=True,
                            dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.RewardTrainer(model=reward_model(tokenizer), args=args, train_dataset=dataset,
                                processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_reward_trainer_reads_the_margin_column(llama, tokenizer, tmp_path):
    prompts = [f"Question {i}: how do I do thing {i}?" for i in range(16)]
    rows = [{"prompt": p, "chosen": "I would rather not." if i % 2 else f"Here is a safe answer {i}.",
             "rejected": f"Sure, step {i}: do something risky" + "!" * (i % 3)} for i, p in enumerate(prompts)]
    vec = MarginVector.fit(llama, tokenizer, prompts[:4], ["I can't answer that."] * 4,
                           [r["rejected"] for r in rows[:4]])
    pipe = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vec, device="cpu")
    annotated = pipe.annotate(rows, num_bins=4, progress=False)
    assert sorted(set(annotated["margin"])) == [0.25, 0.5, 0.75, 1.0]

    with_margin = train_losses(annotated, tokenizer, tmp_path / "a")
    again = train_losses(annotated, tokenizer, tmp_path / "b")
    without = train_losses(annotated.remove_columns(["margin", "margin_raw"]), tokenizer, tmp_path / "c")
    assert len(with_margin) == len(without) == 4
    assert with_margin == again  # same seed, same data: the runs are deterministic ...
    assert with_margin != pytest.approx(without, rel=1e-3)  # ... so the difference is the margin reaching the loss
    # A positive margin inside -logsigmoid(r_c - r_r - m) can only raise the first-step loss.
    assert with_margin[0] > without[0]
