"""LEGEND: margin maths against naive recomputations, binning, the pipeline, annotate, saving and errors."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import pipeline

import hf_repalign  # noqa: F401  (registers the pipeline)
from hf_repalign.formats import PreferenceFormatError
from hf_repalign.legend import (
    LegendMarginPipeline,
    MarginVector,
    equal_frequency_bins,
    load_preference_data,
    margin_direction,
    margin_raw,
)
from hf_repalign.legend.embedding import embed_sequences
from hf_repalign.testing import tiny_model

PROMPTS = ["How do I pick a lock?", "Tell me a joke.", "What is 2+2?", "Write a poem about rain.", "Hi"]
GOOD = ["I can't help with that.", "Why did the cat sit on the mat? It was warm.", "4.", "Rain falls soft.", "Hello!"]
BAD = ["Sure, first take a tension wrench", "No.", "5, obviously, or maybe 22 if you count it my way", "rain", "Go."]


def pairs(n=5):
    return [{"prompt": PROMPTS[i % 5] * (1 + i // 5), "chosen": GOOD[i % 5], "rejected": BAD[i % 5]} for i in range(n)]


def naive_embedding(model, tokenizer, prompt, response, layer, pooling):
    """One unpadded forward with output_hidden_states; the chat-template text split into the prompt part, the
    response text and the template's closing tail (``<|im_end|>\\n``)."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(head + response)
    tail = full[len(head) + len(response):]
    assert tail == "<|im_end|>\n"
    head_ids = tokenizer(head)["input_ids"]
    body_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = head_ids + body_ids + tokenizer(tail, add_special_tokens=False)["input_ids"]
    end = len(head_ids) + len(body_ids)
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    return {"last": states[end - 1], "mean": states[len(head_ids):end].mean(dim=0),
            "mean_all": states[:end].mean(dim=0), "last_rendered": states[-1]}[pooling]


@pytest.fixture
def vector(llama, tokenizer):
    return MarginVector.fit(llama, tokenizer, PROMPTS, GOOD, BAD, layer=-1, pooling="last")


@pytest.fixture
def pipe(llama, tokenizer, vector):
    return pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector, device="cpu")


# ------------------------------------------------------------------------------------------------ maths
@pytest.mark.parametrize("pooling", ["last", "mean", "mean_all", "last_rendered"])
@pytest.mark.parametrize("layer", [2, -1])
def test_margin_raw_matches_naive_per_pair_forward(model, tokenizer, pooling, layer):
    vec = MarginVector.fit(model, tokenizer, PROMPTS, GOOD, BAD, layer=layer, pooling=pooling, batch_size=2)
    pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu")
    rows = pairs(7)
    expected = []
    for row in rows:
        chosen = naive_embedding(model, tokenizer, row["prompt"], row["chosen"], layer, pooling)
        rejected = naive_embedding(model, tokenizer, row["prompt"], row["rejected"], layer, pooling)
        expected.append(float((chosen - rejected) @ vec.direction))
    batched = [out["margin_raw"] for out in pipe(rows, batch_size=3)]
    annotated = pipe.annotate(rows, num_bins=None, batch_size=4, progress=False)["margin_raw"]
    assert batched == pytest.approx(expected, abs=1e-5)
    assert annotated == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 6) for x in expected)) > 1  # the check is not vacuous


def test_right_padding_gives_the_same_margins(llama, tokenizer, vector, monkeypatch):
    rows = pairs(7)
    left = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector, device="cpu")
    expected = [out["margin_raw"] for out in left(rows, batch_size=3)]
    monkeypatch.setattr(tokenizer, "padding_side", "right")
    right = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector, device="cpu")
    assert [out["margin_raw"] for out in right(rows, batch_size=3)] == pytest.approx(expected, abs=1e-5)
    assert right.annotate(rows, num_bins=None, batch_size=4, progress=False)["margin_raw"] == pytest.approx(
        expected, abs=1e-5)


@pytest.mark.parametrize("pooling", ["last", "mean", "mean_all"])
def test_direction_is_normalised_naive_mean_difference(llama, tokenizer, pooling):
    vec = MarginVector.fit(llama, tokenizer, PROMPTS, GOOD, BAD, layer=3, pooling=pooling, batch_size=2)
    diffs = torch.stack([
        naive_embedding(llama, tokenizer, p, g, 3, pooling) - naive_embedding(llama, tokenizer, p, b, 3, pooling)
        for p, g, b in zip(PROMPTS, GOOD, BAD)
    ])
    expected = diffs.mean(dim=0) / diffs.mean(dim=0).norm()
    torch.testing.assert_close(vec.direction, expected, atol=1e-5, rtol=1e-4)
    assert vec.n_pairs == 5 and vec.layer == 3 and vec.pooling == pooling


def test_margin_functions_directly():
    d = margin_direction(torch.tensor([[3.0, 0.0], [1.0, 2.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0]) / 2**0.5)
    torch.testing.assert_close(margin_raw(torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, 1.0]]), d),
                               torch.tensor([2 / 2**0.5]))
    with pytest.raises(ValueError, match="same mean"):
        margin_direction(torch.ones(2, 3), torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------ binning
def test_binning_equal_counts_values_and_order():
    values = torch.randn(103, generator=torch.Generator().manual_seed(0)).tolist()
    binned = equal_frequency_bins(values, 10)
    counts = {k: binned.count(k / 10) for k in range(1, 11)}
    assert set(binned) == {k / 10 for k in range(1, 11)}
    assert max(counts.values()) - min(counts.values()) <= 1
    order = sorted(range(103), key=lambda i: values[i])
    assert [binned[i] for i in order] == sorted(binned)  # monotone in the margin, reported in row order
    assert binned[values.index(max(values))] == 1.0 and binned[values.index(min(values))] == 0.1


def test_binning_ties_share_the_bin_of_their_average_rank():
    assert equal_frequency_bins([1.0, 1.0, 1.0, 0.0], 2) == [1.0, 1.0, 1.0, 0.5]
    assert equal_frequency_bins([5.0, 1.0], 1) == [1.0, 1.0]


def test_binning_errors():
    with pytest.raises(ValueError, match="all 4 margins are identical"):
        equal_frequency_bins([0.5] * 4, 2)
    with pytest.raises(ValueError, match="num_bins"):
        equal_frequency_bins([0.1, 0.2], 0)


# ------------------------------------------------------------------------------------------------ pipeline / annotate
def test_pipeline_is_registered_and_is_a_pipeline(pipe):
    assert isinstance(pipe, LegendMarginPipeline)
    out = pipe(pairs(1)[0])
    assert set(out) == {"margin_raw"} and isinstance(out["margin_raw"], float)


def test_vector_given_per_call(llama, tokenizer, vector):
    bare = pipeline("legend-margin", model=llama, tokenizer=tokenizer, device="cpu")
    with pytest.raises(ValueError, match="no `margin_vector`"):
        bare(pairs(1))
    assert bare(pairs(2), margin_vector=vector) == pipeline(
        "legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector, device="cpu")(pairs(2))


def test_annotate_keeps_columns_and_row_order(pipe):
    rows = [dict(row, id=i, source=f"s{i % 3}") for i, row in enumerate(pairs(11))]
    dataset = Dataset.from_list(rows)
    out = pipe.annotate(dataset, num_bins=4, batch_size=3, window=6, progress=False)
    assert out.column_names == dataset.column_names + ["margin_raw", "margin"]
    assert out.select_columns(dataset.column_names).to_list() == rows
    one_by_one = [pipe(row)["margin_raw"] for row in rows]
    assert out["margin_raw"] == pytest.approx(one_by_one, abs=1e-5)
    assert out["margin"] == equal_frequency_bins(out["margin_raw"], 4)


def test_annotate_no_binning_and_path_inputs(pipe, tmp_path):
    rows = pairs(6)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = pipe.annotate(str(path), num_bins=None, progress=False)
    assert out["margin"] == out["margin_raw"]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    assert pipe.annotate(tmp_path / "data.parquet", progress=False)["margin_raw"] == pytest.approx(out["margin_raw"])


def test_explicit_and_implicit_formats_agree(pipe):
    hh_prompt = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I lost my key.\n\nAssistant:"
    implicit = [{"chosen": hh_prompt + " Call a locksmith.", "rejected": hh_prompt + " Use a tension wrench."}]
    explicit = [{"prompt": hh_prompt, "chosen": " Call a locksmith.", "rejected": " Use a tension wrench."}]
    messages = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Why?"},
                {"role": "user", "content": "I lost my key."}]
    conv_implicit = [{"chosen": messages + [{"role": "assistant", "content": "Call a locksmith."}],
                      "rejected": messages + [{"role": "assistant", "content": "Use a tension wrench."}]}]
    conv_explicit = [{"prompt": messages, "chosen": [{"role": "assistant", "content": "Call a locksmith."}],
                      "rejected": [{"role": "assistant", "content": "Use a tension wrench."}]}]
    a, b = pipe(implicit)[0]["margin_raw"], pipe(explicit)[0]["margin_raw"]
    c, d = pipe(conv_implicit)[0]["margin_raw"], pipe(conv_explicit)[0]["margin_raw"]
    assert a == b and c == d  # exact: both formats render the same token ids, run as the same one-row batch
    # A batch of 2 runs other kernels than one row: equal to float32 rounding (see tests/README.md).
    assert pipe.annotate(implicit * 2, num_bins=None, progress=False)["margin_raw"] == pytest.approx([a, a], abs=1e-5)


# ------------------------------------------------------------------------------------------------ saving
def test_save_load_round_trip(vector, tmp_path, llama, tokenizer):
    folder = vector.save_pretrained(tmp_path / "vec")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "LEGEND margin vector" in (folder / "README.md").read_text()
    loaded = MarginVector.from_pretrained(folder)
    torch.testing.assert_close(loaded.direction, vector.direction, atol=0, rtol=0)
    assert loaded.config_dict() == vector.config_dict()
    pipe = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=loaded, device="cpu")
    assert pipe(pairs(2)) == pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector,
                                      device="cpu")(pairs(2))


def test_push_to_hub_uploads_the_saved_folder(vector, monkeypatch):
    seen = {}

    def fake_push(folder, repo_id, **kwargs):
        seen["files"] = sorted(p.name for p in folder.iterdir())
        seen["repo"] = repo_id
        return "url"

    monkeypatch.setattr("hf_repalign.legend.vector.push_folder", fake_push)
    with pytest.raises(ValueError, match="base_model="):  # fitted on an in-memory model: no Hub id known
        vector.push_to_hub("me/vec")
    assert vector.push_to_hub("me/vec", base_model="org/tiny") == "url"
    assert seen == {"files": ["README.md", "config.json", "model.safetensors"], "repo": "me/vec"}


def test_vector_incompatible_models_are_clear_errors(vector, tokenizer):
    wider = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64)
    with pytest.raises(ValueError, match="hidden size 32 .* hidden size 64"):
        pipeline("legend-margin", model=wider, tokenizer=tokenizer, margin_vector=vector, device="cpu")
    deep = MarginVector(vector.direction, layer=6, num_hidden_layers=8)
    with pytest.raises(ValueError, match="uses layer 6"):
        deep.check_compatible(tiny_model("llama", vocab_size=len(tokenizer), num_layers=4))


def test_callable_template_cannot_be_saved(llama, tokenizer, tmp_path):
    vec = MarginVector.fit(llama, tokenizer, PROMPTS[:2], GOOD[:2], BAD[:2], template=lambda p, r: p + " || " + r)
    with pytest.raises(ValueError, match="callable template"):
        vec.save_pretrained(tmp_path / "v")


def test_induce_generates_harmful_side_and_uses_refusal(llama, tokenizer):
    vec = MarginVector.induce(llama, tokenizer, PROMPTS[:2], max_new_tokens=4, generation_batch_size=2)
    assert vec.n_pairs == 2 and vec.direction.norm() == pytest.approx(1.0)
    given = MarginVector.induce(llama, tokenizer, PROMPTS[:2], harmful_responses=BAD[:2])
    fitted = MarginVector.fit(llama, tokenizer, PROMPTS[:2], ["I can't answer that."] * 2, BAD[:2])
    torch.testing.assert_close(given.direction, fitted.direction)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "a"}, r"row 1: missing column\(s\) \['rejected'\]"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "row 1, field `chosen`: the text is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": None}, "row 1, field `rejected`: value is None"),
        ({"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"},
         "row 1: `chosen` and `rejected` share no prompt"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "row 1, field `chosen`: expected a string, got int"),
        ({"prompt": [{"role": "user", "content": 7}], "chosen": "a", "rejected": "b"},
         "row 1, field `prompt`: message 0 content must be a string"),
    ],
)
def test_bad_rows_name_row_and_field(pipe, row, message):
    good = pairs(1)[0]
    with pytest.raises(PreferenceFormatError, match=message):
        pipe.annotate([good, row], progress=False)
    with pytest.raises(PreferenceFormatError, match=message):
        pipe([good, row])


def test_all_identical_margins_is_an_error_when_binning(pipe):
    with pytest.raises(ValueError, match="margins are identical"):
        pipe.annotate(pairs(1) * 4, num_bins=2, progress=False)
    assert len(set(pipe.annotate(pairs(1) * 4, num_bins=None, progress=False)["margin"])) == 1


def test_too_long_rows_are_refused_or_cut_from_the_left(pipe):
    rows = pairs(3)
    rows[1] = {"prompt": "long " * 60, "chosen": "ok", "rejected": "no"}
    with pytest.raises(PreferenceFormatError, match=r"row 1, field `chosen`: \d+ tokens exceed max_length=120"):
        pipe.annotate(rows, max_length=120, progress=False)
    with pytest.raises(PreferenceFormatError, match=r"row 1, field `chosen`: \d+ tokens exceed max_length=120"):
        pipe(rows, max_length=120)
    assert [r["margin_raw"] for r in pipe(rows, max_length=120, truncation="left")][0] == pytest.approx(
        pipe(rows[0])["margin_raw"])
    assert pipe.last_truncated_rows == []  # each call resets it; the last one above was a single short pair
    pipe(rows, max_length=120, truncation="left")
    assert pipe.last_truncated_rows == [1]
    out = pipe.annotate(rows, num_bins=None, max_length=120, truncation="left", progress=False)
    assert pipe.last_truncated_rows == [1]
    assert len(out) == 3 and out["margin_raw"][0] == pytest.approx(pipe(rows[0])["margin_raw"])
    with pytest.raises(PreferenceFormatError, match="the response alone"):
        pipe.annotate([{"prompt": "q", "chosen": "x" * 100, "rejected": "y"}], max_length=50, truncation="left")
    with pytest.raises(ValueError, match="truncation"):
        pipe.annotate(rows, truncation="right")


def test_argument_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="resume=True needs `output`"):
        pipe.annotate(pairs(2), resume=True)
    with pytest.raises(ValueError, match="unsupported suffix"):
        pipe.annotate(pairs(2), output=tmp_path / "out.csv")
    with pytest.raises(ValueError, match="num_bins"):
        pipe.annotate(pairs(2), num_bins=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_data(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="pooling"):
        MarginVector(torch.ones(3), pooling="max")


# ------------------------------------------------------------------------------------------------ output / resume
def test_output_is_atomic_and_resume_skips_finished_chunks(pipe, tmp_path, interrupt_legend_forward):
    rows = [dict(row, id=i) for i, row in enumerate(pairs(10))]
    output = tmp_path / "annotated.jsonl"
    expected = pipe.annotate(rows, num_bins=5, progress=False)

    calls = interrupt_legend_forward(8)  # chunk 0 (4 pairs, 8 sides) completes, the second chunk is interrupted
    with pytest.raises(KeyboardInterrupt):
        pipe.annotate(rows, num_bins=5, output=output, checkpoint_every=4, batch_size=2, progress=False)
    assert not output.exists() and not list(tmp_path.glob("annotated*"))
    parts = tmp_path / ".annotated.jsonl.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["chunk-000000.json", "manifest.json"]

    calls["sequences"] = -1000
    out = pipe.annotate(rows, num_bins=5, output=output, checkpoint_every=4, batch_size=2, resume=True,
                        progress=False)
    assert calls["sequences"] == -1000 + 12  # chunk 0 is not recomputed: only the 4 + 2 pairs of chunks 1 and 2
    assert out["margin_raw"] == pytest.approx(expected["margin_raw"], abs=1e-6)
    assert out["margin"] == expected["margin"]
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in written] == list(range(10)) and written[3]["margin"] == expected["margin"][3]
    assert not parts.exists()


def test_resume_refuses_checkpoints_of_another_run(pipe, tmp_path, monkeypatch, llama, tokenizer):
    output = tmp_path / "a.parquet"
    monkeypatch.setattr("hf_repalign.legend.pipeline.embed_sequences",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pipe.annotate(pairs(4), output=output, checkpoint_every=2, progress=False)
    monkeypatch.undo()
    other = MarginVector.fit(llama, tokenizer, PROMPTS, BAD, GOOD)
    with pytest.raises(ValueError, match=r"different run \(differs in \['vector'\]\)"):
        pipe.annotate(pairs(4), output=output, checkpoint_every=2, resume=True, margin_vector=other, progress=False)
    out = pipe.annotate(pairs(4), output=output, checkpoint_every=2, resume=True, progress=False)
    assert Dataset.from_parquet(str(output))["margin_raw"] == pytest.approx(out["margin_raw"])


def test_usable_rows_and_gzipped_hh_input(pipe, tmp_path):
    import gzip

    from hf_repalign.text_files import read_jsonl
    from hf_repalign.legend import usable_rows

    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    empty = {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps(good) + "\n" + json.dumps(empty) + "\n")
    with pytest.raises(PreferenceFormatError, match="row 1, field `chosen"):
        pipe.annotate(path, progress=False)
    rows, errors = usable_rows(read_jsonl(path))
    assert rows == [good] and len(errors) == 1 and "row 1" in errors[0]
    assert len(pipe.annotate(rows, num_bins=None, progress=False)) == 1


def test_rows_with_different_columns_keep_every_column():
    from hf_repalign.legend.data import load_preference_data

    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"prompt": "p", "chosen": "x", "rejected": "y", "extra": 7}]
    data = load_preference_data(rows)
    assert data.column_names == ["chosen", "rejected", "prompt", "extra"]
    assert data[1]["prompt"] == "p" and data[1]["extra"] == 7 and data[0]["prompt"] is None


def test_drop_invalid_leaves_out_bad_rows_and_names_them(pipe, tmp_path):
    assert pipe.last_dropped_rows == []
    rows = [dict(row, id=i) for i, row in enumerate(pairs(5))]
    rows[1]["chosen"] = "  "
    rows[3]["rejected"] = None
    with pytest.raises(PreferenceFormatError, match="row 1, field `chosen`"):
        pipe.annotate(rows, progress=False)
    expected = pipe.annotate([rows[i] for i in (0, 2, 4)], num_bins=None, progress=False)
    for data in (rows, Dataset.from_list(rows)):
        out = pipe.annotate(data, num_bins=None, drop_invalid=True, progress=False)
        assert out["id"] == [0, 2, 4] and pipe.last_dropped_rows == [1, 3]
        assert out["margin_raw"] == pytest.approx(expected["margin_raw"])
    pipe.annotate(pairs(2), num_bins=None, progress=False)
    assert pipe.last_dropped_rows == []


def test_non_finite_margins_are_an_error(pipe, monkeypatch):
    def overflowing(*args, **kwargs):
        return {view: states * float("inf") for view, states in embed_sequences(*args, **kwargs).items()}

    monkeypatch.setattr("hf_repalign.legend.pipeline.embed_sequences", overflowing)
    with pytest.raises(ValueError, match=r"NaN or infinite in 3 of 3 rows \(first: \[0, 1, 2\]\)"):
        pipe.annotate(pairs(3), num_bins=None, progress=False)


def test_resume_refuses_a_damaged_checkpoint(pipe, tmp_path, monkeypatch, interrupt_legend_forward):
    output = tmp_path / "out.jsonl"
    interrupt_legend_forward(4)  # chunk 0 (2 pairs, 4 sides) completes
    with pytest.raises(KeyboardInterrupt):
        pipe.annotate(pairs(4), output=output, checkpoint_every=2, batch_size=2, progress=False)
    monkeypatch.undo()
    chunk = tmp_path / ".out.jsonl.parts" / "chunk-000000.json"
    saved = json.loads(chunk.read_text())
    chunk.write_text(json.dumps(dict(saved, margin_raw=saved["margin_raw"][:1])))
    with pytest.raises(ValueError, match="does not hold rows 0-1; it is damaged"):
        pipe.annotate(pairs(4), output=output, checkpoint_every=2, batch_size=2, resume=True, progress=False)
    chunk.unlink()
    out = pipe.annotate(pairs(4), output=output, checkpoint_every=2, batch_size=2, resume=True, progress=False)
    assert len(out) == 4 and output.is_file()


def _template_a(prompt, response):
    return f"Q: {prompt}\nA: {response}"


def _template_b(prompt, response):
    return f"Question: {prompt}\nAnswer: {response}"


def test_resume_matches_a_callable_template_by_name_and_source(tmp_path):
    from hf_repalign.legend.checkpoints import stable_repr

    assert stable_repr(_template_a) == stable_repr(_template_a)  # no object address inside
    assert "0x" not in stable_repr(_template_a) and stable_repr(_template_a) != stable_repr(_template_b)
    assert stable_repr("{prompt}{response}") == repr("{prompt}{response}")
