"""RAHF end to end on the embedded SmolLM2-135M-Instruct: SCIT (a LoRA) -> RAHF adapter -> plain PEFT inference.

    python examples/rahf_hh_pipeline.py --rows 16 --steps 8 --out outputs/rahf_example [--data PATH]

Uses the first ``--rows`` pairs of HH-RLHF helpful-base: from ``--data PATH`` / ``$HF_REPALIGN_DATA`` (a folder with
``hh-rlhf/helpful-base/test.jsonl.gz``), else the Hub's ``Anthropic/hh-rlhf``, else the small sample shipped with
hf_repalign. The saved adapters are standard PEFT folders; the RAHF adapter has the SCIT adapter it was trained on
folded in, so ``PeftModel.from_pretrained(base, folder)`` alone is the trained model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft import LoraConfig, PeftModel

from hf_repalign.data_files import DataNotFoundError, add_data_argument, load_hh_rlhf
from hf_repalign.models import load_model_and_tokenizer
from hf_repalign.rahf import RAHFConfig, RAHFTrainer, SCITConfig, SCITTrainer


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="outputs/rahf_example")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    add_data_argument(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        rows = load_hh_rlhf("helpful-base", args.data)[: args.rows]
    except DataNotFoundError as err:
        parser.error(str(err))
    common = dict(per_device_train_batch_size=1, max_steps=args.steps, learning_rate=2e-4, report_to="none",
                  save_strategy="no", use_cpu=True, logging_steps=1)

    # Step 1: SCIT teaches one model the contrast between the preferred and dispreferred instructions.
    model, tokenizer = load_model_and_tokenizer()
    scit = SCITTrainer(model.train(), SCITConfig(output_dir=str(out / "scit"), max_length=384, **common),
                       train_dataset=rows, processing_class=tokenizer,
                       peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    scit.train()
    scit.save_model(str(out / "scit"))  # adapter, tokenizer and card

    # Step 2: a fresh LoRA on the SCIT model (the adapter stays active under it, as in the authors' scripts) moves
    # the target layers along A(p+) - A(p-) of the SCIT model.
    base, _ = load_model_and_tokenizer()
    rahf = RAHFTrainer(base.train(), RAHFConfig(output_dir=str(out / "rahf"), alpha=5.0, max_prompt_length=256,
                                                dataset_name="Anthropic/hh-rlhf helpful-base", **common),
                       train_dataset=rows, processing_class=tokenizer, instructed=str(out / "scit"))
    rahf.train()
    folder = rahf.save_pretrained(out / "rahf_adapter")
    print(f"RAHF adapter (standard PEFT, the SCIT adapter folded in) in {folder}; layers {rahf.layers}")

    # Use it with plain transformers + peft: one adapter on the base is the trained model.
    aligned = PeftModel.from_pretrained(load_model_and_tokenizer()[0], str(folder)).eval()
    messages = [{"role": "user", "content": "How can I get better sleep?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = aligned.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(answer)
    print(f"wrote the SCIT adapter to {out / 'scit'} and the RAHF adapter to {folder}")
    return answer


if __name__ == "__main__":
    main()
