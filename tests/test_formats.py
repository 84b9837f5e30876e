import pytest

from hf_repalign.formats import (
    PreferenceFormatError,
    encode_pair,
    hh_to_messages,
    render,
    render_split,
    to_triplet,
    triplets,
)

HH = {
    "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.\n\nHuman: Then?\n\nAssistant: Knead it.",
    "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.\n\nHuman: Then?\n\nAssistant: No idea.",
}


def test_implicit_string_prompt_is_the_shared_dialogue():
    t = to_triplet(HH)
    assert t.prompt == "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.\n\nHuman: Then?\n\nAssistant:"
    assert (t.chosen, t.rejected) == (" Knead it.", " No idea.")


def test_implicit_and_explicit_conversational_agree():
    prompt = [{"role": "user", "content": "Hi"}]
    implicit = {"chosen": prompt + [{"role": "assistant", "content": "Hello"}],
                "rejected": prompt + [{"role": "assistant", "content": "Go away"}]}
    explicit = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Go away"}]}
    assert to_triplet(implicit) == to_triplet(explicit)
    assert to_triplet({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}).chosen == "Hello"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": "a"}, r"row 3: missing column\(s\) \['rejected'\]"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "row 3, field `chosen`: the text is empty"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "row 3, field `chosen`: value is None"),
        ({"prompt": "p", "chosen": 5, "rejected": "r"}, "row 3, field `chosen`: expected a string, got int"),
        ({"chosen": "Human: a", "rejected": "Totally different"}, "row 3: `chosen` and `rejected` share no prompt"),
        ({"prompt": [{"role": "user", "content": 3}], "chosen": "c", "rejected": "r"}, "content must be a string"),
    ],
)
def test_bad_rows_name_row_and_field(row, message):
    with pytest.raises(PreferenceFormatError, match=message):
        to_triplet(row, 3)


def test_none_prompt_means_implicit():
    assert to_triplet({**HH, "prompt": None}) == to_triplet(HH)


def test_triplets_number_rows():
    with pytest.raises(PreferenceFormatError, match="row 1"):
        triplets([HH, {"chosen": "x"}])


def test_hh_to_messages():
    assert hh_to_messages(to_triplet(HH).prompt) == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour."},
        {"role": "user", "content": "Then?"},
    ]


@pytest.mark.parametrize("template", [None, "Q: {prompt}\nA: {response}</s>", lambda p, r: f"<{p}|{r}>"])
def test_render_split_and_encode_pair(tokenizer, template):
    prompt_part, response_part = render_split(tokenizer, "Hi", "Hello there", template)
    assert prompt_part + response_part == render(tokenizer, "Hi", "Hello there", template)
    assert response_part.startswith("Hello there")
    ids, n_prompt = encode_pair(tokenizer, "Hi", "Hello there", template)
    assert tokenizer.decode(ids[:n_prompt]) == prompt_part
    assert tokenizer.decode(ids[n_prompt:]) == response_part


def test_render_defaults(tokenizer, plain_tokenizer):
    assert render(tokenizer, "Hi", "Yo") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    assert render(plain_tokenizer, "Hi ", "Yo") == "Hi Yo"
    hh = render(tokenizer, to_triplet(HH).prompt, "Knead it.")
    assert hh.count("<|im_start|>user") == 2 and hh.endswith("<|im_start|>assistant\nKnead it.<|im_end|>\n")
