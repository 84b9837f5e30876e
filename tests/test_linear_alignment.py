"""Linear Alignment: equivalence with a naive uncached two-pass reference, identities, composition, errors."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, LogitsProcessorList, pipeline

from hf_repalign import (
    LinearAlignmentProcessor,
    align_scores,
    build_principle_inputs,
    paired_generate,
    personal_preference_principle,
)
from hf_repalign.linear_alignment import with_principle
from hf_repalign.testing import tiny_model

QUESTIONS = ["hi", "How do I open a locked door quickly?", "Tell me a story about a cat."]
PRINCIPLE = "Be harmless and kind."
PATHS = {"processor": {}, "paired": {"custom_generate": paired_generate}}


def _inputs(tokenizer, questions=QUESTIONS, principle=PRINCIPLE):
    return build_principle_inputs(tokenizer, questions, principle)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _last_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1].float()


def naive_reference(model, plain, principle, steps, alpha, normalize=False, top_p=None, temperature=None, seed=None,
                    eos=2, pad=0):
    """Uncached two-pass Linear Alignment, written independently of the package."""
    ids0, m0 = plain["input_ids"], plain["attention_mask"]
    idsp, mp = principle["input_ids"], principle["attention_mask"]
    finished = torch.zeros(ids0.shape[0], dtype=torch.bool)
    generator = None
    if seed is not None:
        torch.manual_seed(seed)
    out = []
    for _ in range(steps):
        mu0 = _last_logits(model, ids0, m0)
        mup = _last_logits(model, idsp, mp)
        diff = mup - mu0
        if normalize:
            diff = diff / diff.norm(dim=-1, keepdim=True)
        scores = (mu0 if normalize else mup) + alpha * diff
        if top_p is not None:
            probs = mup.softmax(-1)
            for row in range(probs.shape[0]):
                order = probs[row].argsort(descending=True)
                mass, keep = 0.0, []
                for token in order.tolist():
                    keep.append(token)
                    mass += probs[row, token].item()
                    if mass >= top_p:
                        break
                drop = torch.ones_like(scores[row], dtype=torch.bool)
                drop[keep] = False
                scores[row, drop] = -math.inf
        if temperature is None:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial((scores / temperature).softmax(-1), 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        finished |= token == eos
        out.append(token)
        ids0 = torch.cat([ids0, token[:, None]], 1)
        idsp = torch.cat([idsp, token[:, None]], 1)
        m0 = torch.cat([m0, torch.ones_like(m0[:, :1])], 1)
        mp = torch.cat([mp, torch.ones_like(mp[:, :1])], 1)
        if finished.all():
            break
    return torch.stack(out, 1)


def _generate(model, plain, proc, path, **kwargs):
    out = model.generate(**plain, logits_processor=LogitsProcessorList([proc]), **PATHS[path], **kwargs)
    return out[:, plain["input_ids"].shape[1]:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_greedy_matches_naive_reference(model, tokenizer, path, alpha):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=alpha)
    got = _generate(model, plain, proc, path, max_new_tokens=8, do_sample=False)
    want = naive_reference(model, plain, principle, 8, alpha)
    assert torch.equal(got, want[:, : got.shape[1]])
    assert got.shape[1] == want.shape[1]


@pytest.mark.parametrize("path", PATHS)
def test_seeded_sampling_matches_naive_reference(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=1.5)
    torch.manual_seed(123)
    got = _generate(llama, plain, proc, path, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)
    want = naive_reference(llama, plain, principle, 8, 1.5, temperature=0.7, seed=123)
    assert torch.equal(got, want[:, : got.shape[1]])


@pytest.mark.parametrize("path", PATHS)
def test_normalize_matches_naive_reference(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=40.0,
                                    normalize=True)
    got = _generate(llama, plain, proc, path, max_new_tokens=8, do_sample=False)
    want = naive_reference(llama, plain, principle, 8, 40.0, normalize=True)
    assert torch.equal(got, want[:, : got.shape[1]])
    plain_proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=40.0)
    assert not torch.equal(got, _generate(llama, plain, plain_proc, path, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("path", PATHS)
def test_principle_top_p_matches_naive_reference(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=3.0,
                                    principle_top_p=0.05)
    got = _generate(llama, plain, proc, path, max_new_tokens=8, do_sample=False)
    want = naive_reference(llama, plain, principle, 8, 3.0, top_p=0.05)
    assert torch.equal(got, want[:, : got.shape[1]])


def test_rule_identities_are_exact():
    torch.manual_seed(0)
    mu0, mup = torch.randn(3, 50), torch.randn(3, 50)
    assert torch.equal(align_scores(mu0, mup, 0.0), mup)
    assert torch.equal(align_scores(mu0, mup, -1.0), mu0)
    assert torch.allclose(align_scores(mu0, mup, 2.0), mup + 2.0 * (mup - mu0))


@pytest.mark.parametrize("path", PATHS)
def test_alpha_identities_reproduce_plain_and_principle_decoding(model, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    n = 8
    for alpha, reference_inputs in ((0.0, principle), (-1.0, plain)):
        proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=alpha)
        got = _generate(model, plain, proc, path, max_new_tokens=n, do_sample=False)
        ref = model.generate(**reference_inputs, max_new_tokens=n, do_sample=False)
        assert torch.equal(got, ref[:, reference_inputs["input_ids"].shape[1]:]), alpha


@pytest.mark.parametrize("path", PATHS)
def test_batch_equals_row_by_row_with_left_padding(model, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    assert (plain["attention_mask"] == 0).any() and (principle["attention_mask"] == 0).any()
    proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=2.0)
    batch = _generate(model, plain, proc, path, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for row, question in enumerate(QUESTIONS):
        p1, q1 = _inputs(tokenizer, [question])
        single = _generate(model, p1, LinearAlignmentProcessor(model, q1["input_ids"], alpha=2.0), path,
                           max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(batch[row], single[0]), row


@pytest.mark.parametrize("path", PATHS)
def test_minus_inf_from_other_processors_is_kept(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    banned = [[ord("e") + 0], [5]]
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=3.0,
                                    principle_top_p=0.9)
    out = llama.generate(**plain, logits_processor=LogitsProcessorList([proc]), max_new_tokens=10, min_new_tokens=10,
                         bad_words_ids=banned, suppress_tokens=[7], do_sample=True, output_scores=True,
                         return_dict_in_generate=True, **PATHS[path])
    new = out.sequences[:, plain["input_ids"].shape[1]:]
    assert new.shape[1] == 10
    for token in (banned[0][0], 5, 7, 2):
        assert not (new == token).any(), token
    for step_scores in out.scores:
        assert not torch.isnan(step_scores).any()
        assert not torch.isposinf(step_scores).any()
        assert torch.isneginf(step_scores[:, 7]).all() and torch.isneginf(step_scores[:, 2]).all()


def test_align_scores_never_emits_nan_when_nucleus_is_banned():
    mu0 = torch.tensor([[0.0, -math.inf, 0.0]])
    mup = torch.tensor([[0.0, 50.0, 0.0]])  # the principle's whole nucleus is a banned token
    out = align_scores(mu0, mup, 1.0, normalize=True, principle_top_p=0.5)
    assert not torch.isnan(out).any() and torch.isneginf(out[0, 1]) and torch.isfinite(out[0]).sum() >= 1


@pytest.mark.parametrize("path", PATHS)
def test_num_return_sequences(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=1.0)
    torch.manual_seed(0)
    out = _generate(llama, plain, proc, path, max_new_tokens=5, do_sample=True, num_return_sequences=2)
    assert out.shape[0] == 2 * len(QUESTIONS)
    greedy = _generate(llama, plain, proc, path, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(greedy[0::2], greedy[1::2])
    assert torch.equal(greedy[0::2], _generate(llama, plain, proc, path, max_new_tokens=5, do_sample=False))


def test_gpt2_family(gpt2, tokenizer):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(gpt2, principle["input_ids"], principle["attention_mask"], alpha=1.0)
    a = _generate(gpt2, plain, proc, "processor", max_new_tokens=6, min_new_tokens=6, do_sample=False)
    b = _generate(gpt2, plain, proc, "paired", max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_text_generation_pipeline(llama, tokenizer):
    plain, principle = _inputs(tokenizer, [QUESTIONS[1]])
    prompt = tokenizer.decode(plain["input_ids"][0], skip_special_tokens=False)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], alpha=2.0)
    pipe = pipeline("text-generation", model=llama, tokenizer=tokenizer)
    for extra in PATHS.values():
        text = pipe(prompt, logits_processor=LogitsProcessorList([proc]), max_new_tokens=6, min_new_tokens=6,
                    do_sample=False, return_full_text=False, add_special_tokens=False, **extra)[0]["generated_text"]
        direct = _generate(llama, plain, proc, "processor", max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert text == tokenizer.decode(direct[0], skip_special_tokens=True)


def test_processor_instance_is_reusable_across_calls(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    plain1, principle1 = _inputs(tokenizer, QUESTIONS[:1])
    shared = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=2.0)
    first = _generate(llama, plain, shared, "processor", max_new_tokens=6, do_sample=False)
    again = _generate(llama, plain, shared, "processor", max_new_tokens=6, do_sample=False)
    fresh = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=2.0)
    assert torch.equal(first, again)
    assert torch.equal(first, _generate(llama, plain, fresh, "processor", max_new_tokens=6, do_sample=False))
    other = LinearAlignmentProcessor(llama, principle1["input_ids"], alpha=2.0)
    single = _generate(llama, plain1, other, "processor", max_new_tokens=6, do_sample=False)
    assert torch.equal(_generate(llama, plain1, other, "processor", max_new_tokens=6, do_sample=False), single)


@pytest.mark.parametrize("path", PATHS)
def test_beam_search_is_refused(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"])
    with pytest.raises(ValueError, match="beam search"):
        _generate(llama, plain, proc, path, max_new_tokens=4, num_beams=2, do_sample=False)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_error_batch_size_mismatch(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"][:2], principle["attention_mask"][:2])
    for path in PATHS:
        with pytest.raises(ValueError, match="principle batch size 2 does not match the plain batch size 3"):
            _generate(llama, plain, proc, path, max_new_tokens=2)


def test_error_empty_principle(llama, tokenizer):
    with pytest.raises(ValueError, match="principle for row 1 is empty"):
        build_principle_inputs(tokenizer, ["a", "b"], ["fine", "  "])
    ids = torch.tensor([[5, 6], [0, 0]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are empty"):
        LinearAlignmentProcessor(llama, ids, torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="non-empty string"):
        personal_preference_principle("")


def test_error_non_causal_model(tokenizer):
    encoder_only = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="causal LM"):
        LinearAlignmentProcessor(encoder_only, torch.tensor([[5, 6]]))


def test_error_vocab_mismatch(llama, tokenizer):
    with pytest.raises(ValueError, match="vocabulary"):
        LinearAlignmentProcessor(llama, torch.tensor([[5, len(tokenizer) + 10]]))
    plain, principle = _inputs(tokenizer)
    bigger = tiny_model("llama", vocab_size=len(tokenizer) + 7)
    proc = LinearAlignmentProcessor(bigger, principle["input_ids"], principle["attention_mask"])
    with pytest.raises(ValueError, match="built on another model"):
        _generate(llama, plain, proc, "processor", max_new_tokens=2)


@pytest.mark.parametrize("path", ["processor", "paired"])
def test_error_processor_built_on_another_model_with_the_same_vocabulary(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    twin = tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    proc = LinearAlignmentProcessor(twin, principle["input_ids"], principle["attention_mask"])
    with pytest.raises(ValueError, match="built on another model"):
        _generate(llama, plain, proc, path, max_new_tokens=2)


@pytest.mark.parametrize("path", ["processor", "paired"])
def test_huge_alpha_refused_instead_of_garbage_tokens(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=1e300)
    with pytest.raises(ValueError, match="alpha.*overflow"):
        _generate(llama, plain, proc, path, max_new_tokens=2)


@pytest.mark.parametrize("conversation", [
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "system", "content": "x"}, {"content": "hi"}],
])
def test_message_without_content_refused(tokenizer, conversation):
    with pytest.raises(ValueError, match="conversation 1, message"):
        build_principle_inputs(tokenizer, [[{"role": "user", "content": "ok"}], conversation], "Be kind.")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "2"])
def test_error_bad_alpha(llama, alpha):
    with pytest.raises(ValueError, match="alpha"):
        LinearAlignmentProcessor(llama, torch.tensor([[5, 6]]), alpha=alpha)


def test_error_principle_top_p_range(llama):
    with pytest.raises(ValueError, match="principle_top_p"):
        LinearAlignmentProcessor(llama, torch.tensor([[5, 6]]), principle_top_p=0.0)


def test_paired_generate_needs_the_processor(llama, tokenizer):
    plain, _ = _inputs(tokenizer)
    with pytest.raises(ValueError, match="exactly one LinearAlignmentProcessor"):
        llama.generate(**plain, custom_generate=paired_generate, max_new_tokens=2)


# --- principle helpers -------------------------------------------------------------------------------------------


def test_principle_goes_into_the_system_message(tokenizer):
    assert with_principle([{"role": "user", "content": "q"}], "P")[0] == {"role": "system", "content": "P"}
    merged = with_principle([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], "P")
    assert merged[0]["content"] == "S\n\nP" and len(merged) == 2
    replaced = with_principle([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], "P",
                              system_mode="replace")
    assert replaced[0]["content"] == "P"
    plain, principle = build_principle_inputs(tokenizer, "q", personal_preference_principle("a retired teacher"))
    text = tokenizer.decode(principle["input_ids"][0])
    assert "a retired teacher, your answer needs to take his(her) needs into account" in text
    assert text.startswith("<|im_start|>system\n")
    assert tokenizer.decode(plain["input_ids"][0]) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_per_row_principles_and_plain_tokenizer(plain_tokenizer):
    plain, principle = build_principle_inputs(plain_tokenizer, ["q1", "q2"], ["P1", "P2"])
    texts = plain_tokenizer.batch_decode(principle["input_ids"], skip_special_tokens=True)
    assert texts[0].endswith("System: P1\n\nHuman: q1\n\nAssistant:")
    assert texts[1].endswith("System: P2\n\nHuman: q2\n\nAssistant:")
    assert plain["input_ids"].shape[0] == 2


def test_paired_generate_runs_one_forward_of_2b_rows_per_step(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    calls = []
    handle = llama.model.register_forward_hook(lambda module, args, out: calls.append(out.last_hidden_state.shape[0]))
    try:
        # paired: the prompts of each branch on their own (no padding to the longer branch), then 2B rows a step.
        for path, expected in (("paired", [3, 3] + [6] * 4), ("processor", [3, 3] * 5)):
            calls.clear()
            proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"])
            _generate(llama, plain, proc, path, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert calls == expected, path
    finally:
        handle.remove()


def test_cli_generate_prints_three_answers_side_by_side(llama, tokenizer, tmp_path, capsys):
    from hf_repalign.cli import main

    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # A short principle: the byte-level tiny tokenizer makes the default HH principle longer than the 512 context.
    assert main(["generate", "How are you?", "--model", str(tmp_path), "--alpha", "2", "--max_new_tokens", "4",
                 "--principle", PRINCIPLE]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("plain"))
    assert "principle prompt" in header and "linear alignment (alpha=2)" in header
    assert "Q: How are you?" in out


def test_cli_generate_loads_the_requested_dtype(llama, tokenizer, tmp_path, monkeypatch):
    from hf_repalign import cli, models

    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen = []
    real = models.load_model_and_tokenizer

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        seen.append(model.dtype)
        return model, tok

    monkeypatch.setattr(models, "load_model_and_tokenizer", spy)  # the command imports it when it runs
    assert cli.main(["generate", "Hi", "--model", str(tmp_path), "--max_new_tokens", "2", "--dtype", "bfloat16",
                     "--principle", PRINCIPLE]) == 0
    assert seen == [torch.bfloat16]
