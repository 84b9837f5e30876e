"""Principles given as text for any prompt, several principles at once, and prompts that do not belong."""

import pytest
import torch
from transformers import pipeline

from hf_repalign.linear_alignment import (
    LinearAlignmentProcessor,
    build_principle_inputs,
    paired_generate,
    principle_inputs_for,
)
from hf_repalign.linear_alignment.method import generate as method_generate
from hf_repalign.testing import CHATML_TEMPLATE, tiny_tokenizer

PRINCIPLE = "Always answer in French."
DEFAULT_SYSTEM_TEMPLATE = (  # inserts a default system prompt when there is none, like SmolLM2's and Qwen2.5's
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + CHATML_TEMPLATE
)
CONVERSATIONS = [
    "hi",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "How do I bake bread?"}],
]


def _tokenizer(kind):
    if kind == "plain-text":
        return tiny_tokenizer(chat_template=False)
    tokenizer = tiny_tokenizer()
    if kind == "default-system":
        tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("kind", ["chatml", "default-system", "plain-text"])
@pytest.mark.parametrize("principle", [PRINCIPLE, ["Be brief.", "Be kind.", "Use lists."]])
def test_principle_text_placed_like_build_principle_inputs(kind, principle):
    tokenizer = _tokenizer(kind)
    plain, expected = build_principle_inputs(tokenizer, CONVERSATIONS, principle)
    placed = principle_inputs_for(tokenizer, plain["input_ids"], plain["attention_mask"], principle)
    assert torch.equal(placed["input_ids"], expected["input_ids"])
    assert torch.equal(placed["attention_mask"], expected["attention_mask"])


def test_principle_text_refused_where_it_cannot_be_placed():
    tokenizer = tiny_tokenizer()
    ids = tokenizer(["just some text"], return_tensors="pt")
    with pytest.raises(ValueError, match="cannot place the principle in prompt row 0"):
        principle_inputs_for(tokenizer, ids["input_ids"], ids["attention_mask"], PRINCIPLE)
    with pytest.raises(ValueError, match="principle for row 0 is empty"):
        principle_inputs_for(tokenizer, ids["input_ids"], ids["attention_mask"], " ")


def test_principle_text_generate_equals_the_build_principle_inputs_route(llama, tokenizer):
    plain, principle = build_principle_inputs(tokenizer, CONVERSATIONS, PRINCIPLE)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=2.0)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = llama.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, **gen)
    got = method_generate(llama, **plain, principle=PRINCIPLE, tokenizer=tokenizer, alpha=2.0, **gen)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        method_generate(llama, **plain, principle=PRINCIPLE, **gen)
    with pytest.raises(ValueError, match="one way"):
        method_generate(llama, **plain, principle=PRINCIPLE, principle_input_ids=principle["input_ids"], **gen)


@pytest.mark.parametrize("path", ["processor", "paired"])
def test_processor_refuses_prompts_it_was_not_built_for(llama, tokenizer, path):
    """The principle rows of one question used on another would steer towards the other question's answer."""
    _, principle = build_principle_inputs(tokenizer, ["How do I pick a lock?"], PRINCIPLE)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"])
    generator = pipeline("text-generation", model=llama, tokenizer=tokenizer)
    extra = {"custom_generate": paired_generate} if path == "paired" else {}
    with pytest.raises(ValueError, match="prompt row 0 does not belong"):
        generator([{"role": "user", "content": "Plan my week."}], logits_processor=[proc], max_new_tokens=3, **extra)
    # The prompt it was built for passes, and so does the same processor with check_prompts=False elsewhere.
    generator([{"role": "user", "content": "How do I pick a lock?"}], logits_processor=[proc], max_new_tokens=2,
              **extra)


def test_replace_mode_principle_rows_pass_with_check_prompts_off(llama, tokenizer):
    tokenizer = _tokenizer("default-system")
    plain, principle = build_principle_inputs(tokenizer, CONVERSATIONS[:1], PRINCIPLE, system_mode="replace")
    gen = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, custom_generate=paired_generate)
    strict = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"])
    with pytest.raises(ValueError, match="does not belong"):
        llama.generate(**plain, logits_processor=[strict], **gen)
    loose = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], check_prompts=False)
    llama.generate(**plain, logits_processor=[loose], **gen)


def _last_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


def _naive_several(model, plain, principles, alphas, steps):
    """Uncached forwards of every branch per step; mu0 + sum_i (1 + a_i) (mu_i - mu0); greedy."""
    branches = [(plain["input_ids"], plain["attention_mask"])] + [
        (p["input_ids"], p["attention_mask"]) for p in principles]
    tokens, scores = [], []
    for _ in range(steps):
        mu0, *mus = [_last_logits(model, ids, mask) for ids, mask in branches]
        step = mu0 + sum((1 + a) * (mu - mu0) for a, mu in zip(alphas, mus))
        scores.append(step)
        token = step.argmax(-1, keepdim=True)
        tokens.append(token)
        branches = [(torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1))
                    for ids, mask in branches]
    return torch.cat(tokens, 1), torch.stack(scores, 1)


@pytest.mark.parametrize("alphas", [[1.0, 0.5], [2.0, -1.0, 0.3]])
def test_several_principles_equal_the_naive_reference(model, tokenizer, alphas):
    texts = ["Be harmless.", "Answer in one sentence.", "Use French."][:len(alphas)]
    plain, _ = build_principle_inputs(tokenizer, CONVERSATIONS, texts[0])
    encoded = [build_principle_inputs(tokenizer, CONVERSATIONS, text)[1] for text in texts]
    proc = LinearAlignmentProcessor(model, [e["input_ids"] for e in encoded],
                                    [e["attention_mask"] for e in encoded], alpha=alphas)
    out = model.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, max_new_tokens=6,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    tokens, scores = _naive_several(model, plain, encoded, alphas, 6)
    assert torch.equal(out.sequences[:, plain["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), scores, atol=1e-4, rtol=1e-4)
    # Through the method, with the principles as text: the same tokens.
    got = method_generate(model, **plain, principles=texts, alphas=alphas, tokenizer=tokenizer, max_new_tokens=6,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(got, out.sequences)


def test_one_principle_in_a_list_is_the_single_principle_rule(llama, tokenizer):
    plain, principle = build_principle_inputs(tokenizer, CONVERSATIONS, PRINCIPLE)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, custom_generate=paired_generate,
               return_dict_in_generate=True, output_logits=True)
    single = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=1.5)
    listed = LinearAlignmentProcessor(llama, [principle["input_ids"]], [principle["attention_mask"]], alpha=[1.5])
    a = llama.generate(**plain, logits_processor=[single], **gen)
    b = llama.generate(**plain, logits_processor=[listed], **gen)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_several_principles_refused_where_unsupported(llama, tokenizer):
    plain, principle = build_principle_inputs(tokenizer, CONVERSATIONS, PRINCIPLE)
    ids, mask = principle["input_ids"], principle["attention_mask"]
    with pytest.raises(ValueError, match="one of each"):
        LinearAlignmentProcessor(llama, [ids, ids], [mask, mask], alpha=[1.0])
    with pytest.raises(ValueError, match="plausibility mask"):
        LinearAlignmentProcessor(llama, [ids, ids], [mask, mask], principle_top_p=0.8)
    proc = LinearAlignmentProcessor(llama, [ids, ids], [mask, mask])
    with pytest.raises(ValueError, match="only with custom_generate=paired_generate"):
        llama.generate(**plain, logits_processor=[proc], max_new_tokens=2, pad_token_id=0)


def test_first_step_reuses_the_tokens_before_the_principle(llama):
    """One unpadded prompt: the principle branch starts from the plain branch's keys and values of the shared
    system text and runs only the rest; same tokens and scores as the uncached reference."""
    tokenizer = _tokenizer("default-system")
    plain, principle = build_principle_inputs(tokenizer, ["How do I bake bread?"], PRINCIPLE)
    lengths = []
    handle = llama.model.register_forward_hook(lambda module, args, out: lengths.append(out.last_hidden_state.shape))
    try:
        proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=1.5)
        out = llama.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, max_new_tokens=6,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    finally:
        handle.remove()
    shared = int((plain["input_ids"][0] == principle["input_ids"][0, :plain["input_ids"].shape[1]]).long()
                 .cumprod(0).sum())
    assert shared > 10
    assert lengths[0][1] == plain["input_ids"].shape[1]
    assert lengths[1][1] == principle["input_ids"].shape[1] - shared
    tokens, scores = _naive_several(llama, plain, [principle], [1.5], 6)
    assert torch.equal(out.sequences[:, plain["input_ids"].shape[1]:], tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), scores, atol=1e-4, rtol=1e-4)
