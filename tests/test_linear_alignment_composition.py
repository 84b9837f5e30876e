"""Linear Alignment composes with everything ``generate`` does.

Semantics under test: the aligned scores ``mup + a (mup - mu0)`` come from the RAW logits of both branches, then every
processor / warper acts on them as on a plain model's logits. The reference below is written independently of the
package: uncached two-pass LA on raw logits, then the transformers processor objects, then greedy / multinomial.
"""

import threading

import pytest
import torch
from transformers import (
    ExponentialDecayLengthPenalty,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_repalign import LinearAlignmentProcessor, build_principle_inputs, paired_generate
from hf_repalign.linear_alignment import AUTHORS_PRESET, default_system_prompt
from hf_repalign.linear_alignment.forward import cache_argument
from hf_repalign.linear_alignment.paired import OUTPUT_CACHE_FIELD
from hf_repalign.testing import tiny_model, tiny_tokenizer

QUESTIONS = ["hi", "How do I open a locked door quickly?", "Tell me a story about a cat."]
PRINCIPLE = "Be harmless and kind."
PATHS = {"processor": {}, "paired": {"custom_generate": paired_generate}}
EOS, PAD = 2, 0


def _last_logits(model, ids, mask):
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()


def reference(model, plain, principle, steps, alpha, before=(), after=(), sample=False, seed=None, eos=EOS,
              normalize=False, top_p=None, top_p_temperature=1.0, processors_first=False):
    """LA on raw logits, then ``before`` (generate's processors), the plausibility mask, ``after`` (warpers).

    ``processors_first=True`` is the old, wrong order (``before`` on the plain logits, then LA), to show the tests
    tell the two apart.
    """
    ids0, m0 = plain["input_ids"], plain["attention_mask"]
    idsp, mp = principle["input_ids"], principle["attention_mask"]
    finished = torch.zeros(ids0.shape[0], dtype=torch.bool)
    if seed is not None:
        torch.manual_seed(seed)
    out = []
    for _ in range(steps):
        mu0, mup = _last_logits(model, ids0, m0), _last_logits(model, idsp, mp)
        if processors_first:
            mu0 = LogitsProcessorList(before)(ids0, mu0)
        diff = mup - mu0
        scores = mu0 + alpha * diff / diff.norm(dim=-1, keepdim=True) if normalize else mup + alpha * diff
        if not processors_first:
            scores = LogitsProcessorList(before)(ids0, scores)
        if top_p is not None:
            probs = (mup / top_p_temperature).masked_fill(torch.isneginf(scores), float("-inf")).softmax(-1)
            order = probs.argsort(-1, descending=True)
            sorted_probs = probs.gather(-1, order)
            drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        scores = LogitsProcessorList(after)(ids0, scores)
        token = torch.multinomial(scores.softmax(-1), 1).squeeze(1) if sample else scores.argmax(-1)
        token = torch.where(finished, torch.full_like(token, PAD), token)
        finished |= token == eos
        out.append(token)
        ids0, idsp = torch.cat([ids0, token[:, None]], 1), torch.cat([idsp, token[:, None]], 1)
        m0, mp = torch.cat([m0, torch.ones_like(m0[:, :1])], 1), torch.cat([mp, torch.ones_like(mp[:, :1])], 1)
        if finished.all():
            break
    return torch.stack(out, 1)


def _inputs(tokenizer, questions=QUESTIONS, principle=PRINCIPLE):
    return build_principle_inputs(tokenizer, questions, principle)


def _generate(model, plain, proc, path, **kwargs):
    out = model.generate(**plain, logits_processor=LogitsProcessorList([proc]), **PATHS[path], **kwargs)
    return out[:, plain["input_ids"].shape[1]:]


def _assert_same(got, want):
    assert got.shape[1] == want.shape[1], (got.shape, want.shape)
    assert torch.equal(got, want)


def _pads(plain):
    return (plain["attention_mask"] != 0).int().argmax(dim=1)


def _repetition_penalty(penalty, plain):
    """The processor ``generate`` builds for ``repetition_penalty``: newer transformers skip each row's left
    padding (a per-row ``prompt_ignore_length``); older ones (5.17) take an int only and count the padding."""
    try:
        return RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=_pads(plain))
    except ValueError:
        return RepetitionPenaltyLogitsProcessor(penalty)


ALPHA, STEPS = 2.0, 10


def _cases(plain, first_token):
    """generate kwargs -> (processors generate runs before user processors, warpers, exact on the bare path)."""
    prompt_len = plain["input_ids"].shape[1]
    return {
        "repetition_penalty": ({"repetition_penalty": 1.3},
                               [_repetition_penalty(1.3, plain)], [], False),
        "sequence_bias": ({"sequence_bias": {(first_token,): -4.0}},
                          [SequenceBiasLogitsProcessor({(first_token,): -4.0})], [], False),
        "exponential_decay_length_penalty": (
            {"exponential_decay_length_penalty": (2, 1.6), "eos_token_id": first_token},
            [ExponentialDecayLengthPenalty((2, 1.6), first_token, prompt_len)], [], False),
        "no_repeat_ngram_size": ({"no_repeat_ngram_size": 1}, [NoRepeatNGramLogitsProcessor(1)], [], True),
        "bad_words_ids": ({"bad_words_ids": [[first_token]]},
                          [NoBadWordsLogitsProcessor([[first_token]], torch.tensor([EOS]))], [], True),
        "min_new_tokens": ({"min_new_tokens": 5, "eos_token_id": first_token},
                           [MinNewTokensLengthLogitsProcessor(prompt_len, 5, torch.tensor([first_token]))], [], True),
    }


@pytest.fixture(scope="module")
def setup(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    unprocessed = reference(llama, plain, principle, STEPS, ALPHA)
    return plain, principle, unprocessed


@pytest.mark.parametrize("name", ["repetition_penalty", "sequence_bias", "exponential_decay_length_penalty",
                                  "no_repeat_ngram_size", "bad_words_ids", "min_new_tokens"])
@pytest.mark.parametrize("path", PATHS)
def test_every_processor_acts_on_the_aligned_scores(llama, setup, name, path):
    plain, principle, unprocessed = setup
    first_token = int(unprocessed[0, 0])  # the token the unprocessed rule picks first: every case touches it
    kwargs, before, after, bare_exact = _cases(plain, first_token)[name]
    eos = kwargs.get("eos_token_id", EOS)
    want = reference(llama, plain, principle, STEPS, ALPHA, before=before, eos=eos)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    if path == "processor" and not bare_exact:
        with pytest.raises(ValueError, match="paired_generate"):
            _generate(llama, plain, proc, path, max_new_tokens=STEPS, do_sample=False, **kwargs)
        return
    got = _generate(llama, plain, proc, path, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD, **kwargs)
    _assert_same(got, want)
    # The processor matters here, and "processor first, then LA" (the old behaviour) would be caught.
    assert not torch.equal(want, reference(llama, plain, principle, STEPS, ALPHA, eos=eos)), name
    if not bare_exact:
        old = reference(llama, plain, principle, STEPS, ALPHA, before=before, eos=eos, processors_first=True)
        assert not torch.equal(want, old), name


@pytest.mark.parametrize("path", PATHS)
def test_sampling_warpers_act_on_the_aligned_scores(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)]
    want = reference(llama, plain, principle, STEPS, ALPHA, after=warpers, sample=True, seed=7)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    torch.manual_seed(7)
    got = _generate(llama, plain, proc, path, max_new_tokens=STEPS, do_sample=True, temperature=0.7, top_k=20,
                    top_p=0.9)
    _assert_same(got, want)


def test_paired_penalty_and_sampling_together(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    before = [_repetition_penalty(1.2, plain)]
    warpers = [TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.95)]
    want = reference(llama, plain, principle, STEPS, ALPHA, before=before, after=warpers, sample=True, seed=3,
                     top_p=0.9)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA,
                                    principle_top_p=0.9, principle_temperature=1.0)
    torch.manual_seed(3)
    got = _generate(llama, plain, proc, "paired", max_new_tokens=STEPS, do_sample=True, temperature=0.8, top_k=0,
                    top_p=0.95, repetition_penalty=1.2)
    _assert_same(got, want)


def test_generation_config_defaults_count(tokenizer):
    """A model shipping ``repetition_penalty: 1.05`` in generation_config.json (Qwen2-style)."""
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    model.generation_config.repetition_penalty = 1.05
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    before = [_repetition_penalty(1.05, plain)]
    want = reference(model, plain, principle, STEPS, ALPHA, before=before)
    _assert_same(_generate(model, plain, proc, "paired", max_new_tokens=STEPS, do_sample=False), want)
    with pytest.raises(ValueError, match="RepetitionPenaltyLogitsProcessor.*paired_generate"):
        _generate(model, plain, proc, "processor", max_new_tokens=STEPS, do_sample=False)


class _AddOne(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores + torch.arange(scores.shape[-1], device=scores.device) * 1e-2


def test_bare_processor_checks_user_processors_listed_before_it(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    with pytest.raises(ValueError, match=r"\['_AddOne'\].*list\s+LinearAlignmentProcessor first"):
        llama.generate(**plain, logits_processor=LogitsProcessorList([_AddOne(), proc]), max_new_tokens=2)
    # Listed after the processor it sees aligned scores, like every processor on the paired path.
    bare = llama.generate(**plain, logits_processor=LogitsProcessorList([proc, _AddOne()]), max_new_tokens=STEPS,
                          do_sample=False)
    paired = llama.generate(**plain, logits_processor=LogitsProcessorList([proc, _AddOne()]), max_new_tokens=STEPS,
                            do_sample=False, custom_generate=paired_generate)
    _assert_same(bare, paired)
    want = reference(llama, plain, principle, STEPS, ALPHA, before=[_AddOne()])
    _assert_same(bare[:, plain["input_ids"].shape[1]:], want)


def test_bare_processor_called_outside_a_list_says_it_cannot_check(llama, tokenizer, monkeypatch):
    from hf_repalign.linear_alignment import processor as module

    warnings = []
    monkeypatch.setattr(module.logger, "warning_once", warnings.append)
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    proc(plain["input_ids"], _last_logits(llama, plain["input_ids"], plain["attention_mask"]))
    assert len(warnings) == 1 and "cannot check" in warnings[0]
    warnings.clear()
    llama.generate(**plain, logits_processor=LogitsProcessorList([proc]), max_new_tokens=2, do_sample=False)
    assert not warnings  # inside generate's list the upstream processors are checked instead


def test_bare_normalize_refuses_upstream_bans(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=5.0,
                                    normalize=True)
    with pytest.raises(ValueError, match="normalize=True.*paired_generate"):
        _generate(llama, plain, proc, "processor", max_new_tokens=3, no_repeat_ngram_size=2)
    got = _generate(llama, plain, proc, "paired", max_new_tokens=STEPS, do_sample=False, no_repeat_ngram_size=2)
    want = reference(llama, plain, principle, STEPS, 5.0, normalize=True, before=[NoRepeatNGramLogitsProcessor(2)])
    _assert_same(got, want)


# --- plausibility mask, authors' preset, normalize -------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_mask_temperature_defaults_to_the_generation_temperature(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer)
    warpers = [TemperatureLogitsWarper(0.5)]
    want = reference(llama, plain, principle, STEPS, ALPHA, after=warpers, sample=True, seed=11, top_p=0.3,
                     top_p_temperature=0.5)
    for temperature in (None, 0.5):
        proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA,
                                        principle_top_p=0.3, principle_temperature=temperature)
        torch.manual_seed(11)
        got = _generate(llama, plain, proc, path, max_new_tokens=STEPS, do_sample=True, temperature=0.5, top_k=0)
        _assert_same(got, want)
    # Greedy: no generation temperature, the mask is taken at temperature 1.
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA,
                                    principle_top_p=0.3)
    _assert_same(_generate(llama, plain, proc, path, max_new_tokens=STEPS, do_sample=False),
                 reference(llama, plain, principle, STEPS, ALPHA, top_p=0.3))


def authors_greedy(model, ids_in, att_in, ids_out, att_out, steps, ratio, temperature=0.5, topp=0.8):
    """The authors' ``contra_generate`` (greedy) restated from their model.py / utils.py, uncached, batch of one.

    aligned = within * (ratio + 1) - without * ratio; probs = softmax(aligned / T) * (top-p mask of
    softmax(within / T), mass strictly above a token >= topp is dropped, the top token always kept); argmax.
    """
    out = []
    for _ in range(steps):
        within, without = _last_logits(model, ids_in, att_in), _last_logits(model, ids_out, att_out)
        aligned = within * (ratio + 1) - without * ratio
        probs = torch.softmax(aligned / temperature, -1)
        sys_probs = torch.softmax(within / temperature, -1)
        sorted_probs, order = sys_probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= topp
        drop[:, :1] = False
        keep = ~torch.zeros_like(drop).scatter(-1, order, drop)
        token = (probs * keep).argmax(-1)
        out.append(token)
        if int(token) == EOS:
            break
        ids_in, ids_out = torch.cat([ids_in, token[:, None]], 1), torch.cat([ids_out, token[:, None]], 1)
        att_in, att_out = torch.cat([att_in, att_in[:, :1]], 1), torch.cat([att_out, att_out[:, :1]], 1)
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def peaked(tokenizer):
    """A tiny Llama with peaked next-token distributions (a random one is too flat for a top-0.8 mask to bite)."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.lm_head.weight.data *= 4
    return model


RATIO = 30.0


@pytest.mark.parametrize("path", PATHS)
def test_authors_preset_matches_their_decoding(peaked, tokenizer, path):
    llama = peaked
    assert AUTHORS_PRESET == {"principle_top_p": 0.8, "principle_temperature": 0.5}
    plain, principle = _inputs(tokenizer, [QUESTIONS[1]])
    default = LinearAlignmentProcessor.authors_defaults(llama, principle["input_ids"], principle["attention_mask"])
    assert (default.alpha, default.principle_top_p, default.principle_temperature) == (3.0, 0.8, 0.5)
    # A large ratio: on a tiny random model the two prompts barely differ, so only then does the mask bite.
    proc = LinearAlignmentProcessor.authors_defaults(llama, principle["input_ids"], principle["attention_mask"],
                                                     alpha=RATIO)
    want = authors_greedy(llama, principle["input_ids"], principle["attention_mask"], plain["input_ids"],
                          plain["attention_mask"], STEPS, ratio=RATIO)
    _assert_same(_generate(llama, plain, proc, path, max_new_tokens=STEPS, do_sample=False), want)
    # The mask matters here (else the test could not tell the preset from the bare rule).
    bare = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=RATIO)
    assert not torch.equal(_generate(llama, plain, bare, path, max_new_tokens=STEPS, do_sample=False), want)


def test_normalize_is_the_papers_eq10():
    from hf_repalign import align_scores

    torch.manual_seed(0)
    mu0, mup = torch.randn(3, 50) * 3, torch.randn(3, 50) * 3
    assert torch.equal(align_scores(mu0, mup, 0.0, normalize=True), mu0)  # alpha=0: the plain policy
    norm = (mup - mu0).norm(dim=-1, keepdim=True)
    step = (mup - mu0) / norm
    assert torch.allclose(align_scores(mu0, mup, 7.0, normalize=True), mu0 + 7.0 * step)
    # alpha = ||mup - mu0|| lands on the principle branch, row by row.
    for row in range(3):
        got = align_scores(mu0[row:row + 1], mup[row:row + 1], float(norm[row]), normalize=True)
        assert torch.allclose(got, mup[row:row + 1], atol=1e-4)


# --- assisted decoding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
def test_bare_processor_is_exact_under_assisted_decoding(llama, tokenizer, assist):
    plain, principle = _inputs(tokenizer, ["abc abc abc abc abc abc"])
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    want = reference(llama, plain, principle, 16, ALPHA)
    extra = ({"prompt_lookup_num_tokens": 3} if assist == "prompt_lookup"
             else {"assistant_model": tiny_model("llama", vocab_size=len(tokenizer), seed=1)})
    crops = []
    real_crop = proc._principle_logits

    def spy(input_ids, scores):  # count the calls that roll the principle cache back
        before = None if proc._generated is None else proc._generated.shape[1]
        out = real_crop(input_ids, scores)
        if before is not None and proc._prompt is not None and input_ids.shape[1] - proc._prompt.shape[1] <= before:
            crops.append(input_ids.shape[1])
        return out

    proc._principle_logits = spy
    got = _generate(llama, plain, proc, "processor", max_new_tokens=16, do_sample=False, **extra)
    _assert_same(got, want)
    assert crops, "no candidate was rejected: the test did not exercise the roll-back"


@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
def test_paired_refuses_assisted_decoding(llama, tokenizer, assist):
    plain, principle = _inputs(tokenizer, [QUESTIONS[0]])
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"])
    extra = {"prompt_lookup_num_tokens": 3} if assist == "prompt_lookup" else {"assistant_model": llama}
    with pytest.raises(ValueError, match="assisted decoding"):
        _generate(llama, plain, proc, "paired", max_new_tokens=4, do_sample=False, **extra)


# --- chat templates with a default system prompt ------------------------------------------------------------

# SmolLM2-135M-Instruct's template (Qwen2.5's has the same shape): a default system prompt when there is none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_default_system_prompt_is_kept_and_the_principle_added():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = SMOLLM_TEMPLATE
    assert default_system_prompt(tokenizer, [{"role": "user", "content": "q"}]) == DEFAULT_SYSTEM
    plain, principle = build_principle_inputs(tokenizer, "q", "P!")
    texts = [tokenizer.decode(x["input_ids"][0]) for x in (plain, principle)]
    assert texts[0] == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nq<|im_end|>\n" \
                       "<|im_start|>assistant\n"
    assert texts[1] == texts[0].replace(DEFAULT_SYSTEM, f"{DEFAULT_SYSTEM}\n\nP!")
    _, replaced = build_principle_inputs(tokenizer, "q", "P!", system_mode="replace")
    assert tokenizer.decode(replaced["input_ids"][0]) == texts[0].replace(DEFAULT_SYSTEM, "P!")
    # No default system prompt (plain ChatML): the principle is the system message.
    assert default_system_prompt(tiny_tokenizer(), [{"role": "user", "content": "q"}]) is None
    with pytest.raises(ValueError, match="system_mode"):
        build_principle_inputs(tokenizer, "q", "P!", system_mode="prepend")


# --- streaming, context, cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_streaming_works_on_both_paths(llama, tokenizer, path):
    plain, principle = _inputs(tokenizer, [QUESTIONS[2]])
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=_generate(
        llama, plain, proc, path, max_new_tokens=8, min_new_tokens=8, do_sample=False, streamer=streamer)))
    thread.start()
    text = "".join(streamer)  # raises queue.Empty after 60 s instead of hanging if end() never comes
    thread.join()
    assert text == tokenizer.decode(result["out"][0], skip_special_tokens=True)


def test_paired_streaming_ends_when_generation_fails(llama, tokenizer):
    plain, principle = _inputs(tokenizer, [QUESTIONS[0]])
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"])
    streamer = TextIteratorStreamer(tokenizer, timeout=60)
    errors = []

    def run():
        try:
            _generate(llama, plain, proc, "paired", max_new_tokens=4, prompt_lookup_num_tokens=2, streamer=streamer)
        except ValueError as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    list(streamer)
    thread.join()
    assert errors and "assisted decoding" in str(errors[0])


def test_principle_longer_than_the_context(gpt2, tokenizer):
    context = gpt2.config.n_positions
    with pytest.raises(ValueError, match=rf"has {context + 8} tokens but the model's context is {context}"):
        LinearAlignmentProcessor(gpt2, torch.full((1, context + 8), 7))
    # Fits at construction, runs out while generating: a clear error on both paths, not an IndexError.
    plain, principle = _inputs(tokenizer, ["hi"], "x" * (context - 40))
    for path in PATHS:
        proc = LinearAlignmentProcessor(gpt2, principle["input_ids"], principle["attention_mask"])
        with pytest.raises(ValueError, match="principle branch reached .* context is 512"):
            _generate(gpt2, plain, proc, path, max_new_tokens=60, min_new_tokens=60, do_sample=False)


def test_paired_returns_the_plain_rows_cache(llama, tokenizer):
    plain, principle = _inputs(tokenizer)
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=ALPHA)
    out = llama.generate(**plain, logits_processor=[proc], custom_generate=paired_generate, max_new_tokens=5,
                         min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    sequences, cache = out.sequences, getattr(out, OUTPUT_CACHE_FIELD)
    assert cache.get_seq_length() == sequences.shape[1] - 1
    mask = torch.cat([plain["attention_mask"], torch.ones(len(QUESTIONS), 5, dtype=torch.long)], 1)
    # Continue plainly from the returned cache; it must equal continuing without any cache.
    cont = llama.generate(input_ids=sequences, attention_mask=mask, **{cache_argument(llama): cache},
                          max_new_tokens=4, min_new_tokens=4, do_sample=False)
    fresh = llama.generate(input_ids=sequences, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                           do_sample=False)
    _assert_same(cont, fresh)


def test_cli_preset_and_penalty_flags(llama, tokenizer, tmp_path, monkeypatch, capsys):
    from hf_repalign.cli import main

    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    built, calls = [], []
    real_init, real_generate = LinearAlignmentProcessor.__init__, type(llama).generate

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)

    def spy_generate(self, *args, **kwargs):
        calls.append(kwargs)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(LinearAlignmentProcessor, "__init__", spy_init)
    monkeypatch.setattr(type(llama), "generate", spy_generate)
    assert main(["generate", "Hi", "--model", str(tmp_path), "--max_new_tokens", "3", "--principle", PRINCIPLE,
                 "--preset", "authors", "--do_sample", "--repetition_penalty", "1.1", "--alpha", "3"]) == 0
    assert (built[0].principle_top_p, built[0].principle_temperature, built[0].alpha) == (0.8, 0.5, 3.0)
    la_call = calls[-1]
    assert la_call["custom_generate"] is paired_generate and la_call["repetition_penalty"] == 1.1
    assert (la_call["temperature"], la_call["top_p"], la_call["top_k"]) == (0.5, 1.0, 0)
