"""Personal-preference alignment at decoding time: one question, two users, one batch.

    python examples/linear_alignment_personal_preferences.py [--model PATH_OR_HUB_ID] [--alpha 1.0]

Each row gets its own principle (the authors' personal-preference template, added after the model's default system
prompt). ``custom_generate=paired_generate`` runs plain and principle rows as one forward per step and computes the
aligned scores from the raw logits, so generate's own options (here ``repetition_penalty``) act on the aligned scores
as on a plain model's. Also shows the same call inside a text-generation pipeline.
"""

from __future__ import annotations

import argparse

from transformers import LogitsProcessorList, pipeline

from hf_repalign import (
    LinearAlignmentProcessor,
    build_principle_inputs,
    load_model_and_tokenizer,
    paired_generate,
    personal_preference_principle,
)

USERS = ["a vegetarian who cooks for a family of four", "a competitive bodybuilder who eats a lot of protein"]
QUESTION = "What should I cook for dinner tonight?"


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local path or Hub id; default: embedded SmolLM2-135M")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    args = parser.parse_args(argv)

    model, tokenizer = load_model_and_tokenizer(args.model)
    principles = [personal_preference_principle(user) for user in USERS]
    plain, principle = build_principle_inputs(tokenizer, [QUESTION] * len(USERS), principles)
    proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=args.alpha)
    decoding = dict(custom_generate=paired_generate, max_new_tokens=args.max_new_tokens, do_sample=False,
                    repetition_penalty=args.repetition_penalty)
    out = model.generate(**plain, logits_processor=LogitsProcessorList([proc]), **decoding)
    answers = tokenizer.batch_decode(out[:, plain["input_ids"].shape[1]:], skip_special_tokens=True)
    for user, answer in zip(USERS, answers):
        print(f"--- for {user}:\n{answer.strip()}\n")

    # The same processor in a pipeline (one prompt per call, so its principle row matches).
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    single_plain, single_principle = build_principle_inputs(tokenizer, QUESTION, principles[0])
    single = LinearAlignmentProcessor(model, single_principle["input_ids"], alpha=args.alpha)
    prompt = tokenizer.decode(single_plain["input_ids"][0])
    text = generator(prompt, logits_processor=LogitsProcessorList([single]), return_full_text=False,
                     add_special_tokens=False, **decoding)[0]["generated_text"]
    print(f"--- pipeline, for {USERS[0]}:\n{text.strip()}")
    return answers + [text]


if __name__ == "__main__":
    main()
