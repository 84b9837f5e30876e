"""LEGEND pipeline behaviour: transformers' input kinds, vectors by path, save/reload, the embedded default, row
errors, whitespace, validation of vectors and templates, resume fingerprints, the output lock, the length
diagnostic and the fit presets."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import pipeline
from transformers.pipelines.pt_utils import KeyDataset

import hf_repalign  # noqa: F401  (registers the pipeline)
from hf_repalign.formats import PreferenceFormatError, check_template
from hf_repalign.legend import LegendMarginPipeline, MarginVector, length_diagnostics
from hf_repalign.legend.checkpoints import OutputLock
from hf_repalign.testing import tiny_model

PROMPTS = ["How do I pick a lock?", "Tell me a joke.", "What is 2+2?", "Write a poem about rain.", "Hi"]
GOOD = ["I can't help with that.", "Why did the cat sit on the mat? It was warm.", "4.", "Rain falls soft.", "Hello!"]
BAD = ["Sure, first take a tension wrench", "No.", "5, obviously, or maybe 22 if you count it my way", "rain", "Go."]
ROWS = [{"prompt": p, "chosen": g, "rejected": b} for p, g, b in zip(PROMPTS, GOOD, BAD)]


@pytest.fixture
def vector(llama, tokenizer):
    return MarginVector.fit(llama, tokenizer, PROMPTS, GOOD, BAD)


@pytest.fixture
def pipe(llama, tokenizer, vector):
    return pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector, device="cpu")


def raw(outputs):
    return [out["margin_raw"] for out in outputs]


# ------------------------------------------------------------------------------------------------ inputs
def test_every_transformers_input_kind_gives_the_same_margins(pipe):
    expected = raw(pipe(ROWS))
    assert len(set(expected)) == len(ROWS)  # not vacuous
    dataset = Dataset.from_list(ROWS)
    assert raw(pipe(dataset)) == pytest.approx(expected, abs=1e-6)
    assert raw(pipe(dataset, batch_size=2)) == pytest.approx(expected, abs=1e-6)
    assert raw(list(pipe(row for row in ROWS))) == pytest.approx(expected, abs=1e-6)
    assert raw(list(pipe((row for row in ROWS), batch_size=3))) == pytest.approx(expected, abs=1e-6)
    nested = Dataset.from_list([{"pair": row} for row in ROWS])
    assert raw(list(pipe(KeyDataset(nested, "pair"), batch_size=2))) == pytest.approx(expected, abs=1e-6)
    assert pipe(ROWS[2])["margin_raw"] == pytest.approx(expected[2], abs=1e-6)


def test_streamed_rows_are_named_when_bad(pipe):
    bad = ROWS[:2] + [{"prompt": "q", "chosen": "", "rejected": "b"}]
    with pytest.raises(PreferenceFormatError, match="row 2, field `chosen`"):
        list(pipe(row for row in bad))
    with pytest.raises(PreferenceFormatError, match="row 1: expected a preference row"):
        pipe([ROWS[0], "just text"])
    with pytest.raises(TypeError, match="legend-margin takes"):
        pipe(3)


def test_margin_vector_as_folder(pipe, vector, llama, tokenizer, tmp_path):
    folder = vector.save_pretrained(tmp_path / "vec")
    by_path = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=str(folder), device="cpu")
    assert raw(by_path(ROWS)) == raw(pipe(ROWS))
    bare = pipeline("legend-margin", model=llama, tokenizer=tokenizer, device="cpu")
    assert raw(bare(ROWS, margin_vector=folder)) == raw(pipe(ROWS))
    assert bare.annotate(ROWS, margin_vector=folder, num_bins=None, progress=False)["margin_raw"] == pytest.approx(
        raw(pipe(ROWS)), abs=1e-6)
    with pytest.raises(TypeError, match="a MarginVector, a folder or a Hub repo id"):
        bare(ROWS, margin_vector=3)


def test_save_pretrained_bundles_model_tokenizer_and_vector(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "annotator")
    assert (tmp_path / "annotator" / "margin_vector" / "model.safetensors").is_file()
    assert (tmp_path / "annotator" / "tokenizer.json").is_file()
    reloaded = pipeline("legend-margin", model=str(tmp_path / "annotator"), device="cpu")
    assert isinstance(reloaded, LegendMarginPipeline)
    assert raw(reloaded(ROWS)) == pytest.approx(raw(pipe(ROWS)), abs=1e-4)


def test_pipeline_without_model_uses_the_embedded_model(pipe, tmp_path, monkeypatch):
    # The embedded model is replaced by a saved tiny annotator, so this runs in a bare clone in a second.
    pipe.save_pretrained(tmp_path / "embedded")
    monkeypatch.setattr("hf_repalign.models.embedded_model_path", lambda: tmp_path / "embedded")
    default = pipeline("legend-margin", device="cpu")
    assert str(default.model.config._name_or_path) == str(tmp_path / "embedded")
    assert raw(default(ROWS)) == pytest.approx(raw(pipe(ROWS)), abs=1e-4)


# ------------------------------------------------------------------------------------------------ unconvertible rows
@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "q", "chosen": "a", "rejected": "b"},
          {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}],
         r"row 1, column `prompt`: list of dict .*but row 0 has string"),
        ([dict(ROWS[0], meta=1), dict(ROWS[1], meta="x")], r"row 1, column `meta`: string, but row 0 has number"),
        ([ROWS[0], dict(ROWS[1], meta="bad \ud800")], r"row 1, column `meta`: .*lone surrogate"),
        ([ROWS[0], dict(ROWS[1], chosen="bad \udc80 text")], r"row 1, field `chosen`: .*lone surrogate"),
    ],
)
def test_unconvertible_rows_are_named(pipe, rows, message):
    with pytest.raises(PreferenceFormatError, match=message):
        pipe.annotate(rows, progress=False)


def test_lone_surrogate_in_a_message_is_named(pipe):
    row = {"prompt": [{"role": "user", "content": "x\ud800"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(PreferenceFormatError, match=r"row 1, field `prompt`, message 0: .*lone surrogate"):
        pipe([ROWS[0], row])


# ------------------------------------------------------------------------------------------------ whitespace
def test_hh_string_row_equals_message_row(pipe):
    hh = {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I lost my key.\n\nAssistant: "
                    "Call a locksmith.", "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: "
                    "I lost my key.\n\nAssistant: Use a tension wrench. "}
    turns = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Why?"},
             {"role": "user", "content": "I lost my key."}]
    messages = {"prompt": turns, "chosen": [{"role": "assistant", "content": "Call a locksmith."}],
                "rejected": [{"role": "assistant", "content": "Use a tension wrench."}]}
    padded = {"prompt": [dict(t, content=f"  {t['content']}\n") for t in turns], "chosen": " Call a locksmith.\n",
              "rejected": "Use a tension wrench.  "}
    items = [pipe.encode(row, margin_vector=pipe._forward_params["margin_vector"])[0] for row in (hh, messages, padded)]
    for item in items[1:]:
        for key in items[0]:
            assert torch.equal(item[key], items[0][key]), key  # the same token ids, not just close margins
    margins = raw(pipe([hh, messages, padded]))
    assert margins[0] == margins[1] == margins[2]  # identical inputs in one batch: bit-identical


# ------------------------------------------------------------------------------------------------ vectors
def test_vectors_with_bad_directions_or_layers_are_refused(vector, tmp_path):
    from safetensors.torch import save_file

    folder = vector.save_pretrained(tmp_path / "vec")
    for bad, message in [(torch.full((32,), float("nan")), "NaN"), (torch.zeros(32), "all zeros"),
                         (torch.ones(32), "norm 5.65685, not 1")]:
        save_file({"direction": bad}, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            MarginVector.from_pretrained(folder)
    save_file({"direction": vector.direction}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, layer=2.7)))
    with pytest.raises(ValueError, match="`layer` must be an integer hidden-state index, got 2.7"):
        MarginVector.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, template="{prompt:>5000000}{response}")))
    with pytest.raises(ValueError, match="only {prompt} and {response} are allowed"):
        MarginVector.from_pretrained(folder)
    with pytest.raises(ValueError, match="`layer` must be an integer"):
        MarginVector(vector.direction, layer=True)


def test_vector_from_another_model_warns_with_both_names(vector, tokenizer, caplog):
    other = tiny_model("llama", vocab_size=len(tokenizer), seed=1)
    other.config.name_or_path = "someone/other-model"
    vector.model_name_or_path = "me/annotator"
    with caplog.at_level(logging.WARNING):
        vector.check_compatible(other)
    assert "FITTED ON ANOTHER MODEL" in caplog.text
    assert "'me/annotator'" in caplog.text and "'someone/other-model'" in caplog.text


@pytest.mark.parametrize("template, message", [
    ("{prompt!r} {response}", "conversions"),
    ("{prompt} {response} {extra}", r"field \{extra\}"),
    ("{prompt[0]} {response}", r"field \{prompt\[0\]\}"),
    ("{response}", "must contain both"),
    ("{prompt} {response", "not a valid format string"),
])
def test_templates_allow_only_plain_prompt_and_response(template, message, pipe):
    with pytest.raises(ValueError, match=message):
        check_template(template)
    with pytest.raises(ValueError, match=message):
        pipe(ROWS, template=template)
    assert check_template("Q: {prompt}\nA: {response}") == "Q: {prompt}\nA: {response}"


# ------------------------------------------------------------------------------------------------ resume / lock
def test_resume_refuses_another_dtype(pipe, tmp_path, monkeypatch, tokenizer, vector, interrupt_legend_forward):
    output = tmp_path / "out.jsonl"
    interrupt_legend_forward(4)  # chunk 0 (2 pairs, 4 sides) completes
    with pytest.raises(KeyboardInterrupt):
        pipe.annotate(ROWS, output=output, checkpoint_every=2, batch_size=2, progress=False)
    monkeypatch.undo()
    bf16 = pipeline("legend-margin", model=tiny_model("llama", vocab_size=len(tokenizer)).to(torch.bfloat16),
                    tokenizer=tokenizer, margin_vector=vector, device="cpu")
    with pytest.raises(ValueError, match=r"differs in \[.*'model_dtype'\]"):
        bf16.annotate(ROWS, output=output, checkpoint_every=2, batch_size=2, resume=True, progress=False)


def test_a_chunk_from_another_run_is_refused(pipe, tmp_path, monkeypatch, interrupt_legend_forward):
    output = tmp_path / "out.jsonl"
    other = [dict(row, chosen=row["chosen"] + " Really.") for row in ROWS]
    for rows in (other, ROWS):  # the other dataset's first chunk is kept, then this run's parts are prepared
        interrupt_legend_forward(4)  # chunk 0 (2 pairs, 4 sides) completes
        with pytest.raises(KeyboardInterrupt):
            pipe.annotate(rows, output=output, checkpoint_every=2, batch_size=2, progress=False)
        monkeypatch.undo()
        parts = tmp_path / ".out.jsonl.parts"
        if rows is other:
            foreign = (parts / "chunk-000000.json").read_text()
    (parts / "chunk-000000.json").write_text(foreign)  # a stray chunk of the other dataset in this run's folder
    with pytest.raises(ValueError, match="was written by another run"):
        pipe.annotate(ROWS, output=output, checkpoint_every=2, batch_size=2, resume=True, progress=False)


def test_a_second_run_on_the_same_output_fails_at_once(pipe, tmp_path):
    output = tmp_path / "out.jsonl"
    with OutputLock(output):
        with pytest.raises(RuntimeError, match="another annotate run .* is writing"):
            pipe.annotate(ROWS, output=output, progress=False)
    assert not output.exists()
    pipe.annotate(ROWS, output=output, num_bins=None, progress=False)  # released: the next run goes ahead
    assert output.is_file() and not (tmp_path / ".out.jsonl.lock").exists()


# ------------------------------------------------------------------------------------------------ diagnostics
def test_length_diagnostic_is_returned_logged_and_warns(pipe, caplog):
    out, diagnostics = pipe.annotate(ROWS, num_bins=None, with_diagnostics=True, progress=False)
    lengths = [len(pipe.tokenizer(g)["input_ids"]) - len(pipe.tokenizer(b)["input_ids"]) for g, b in zip(GOOD, BAD)]
    expected = length_diagnostics(out["margin_raw"], lengths)
    assert diagnostics == expected == pipe.last_diagnostics and diagnostics["pairs"] == 5
    margins = [float(i) for i in range(30)]
    with caplog.at_level(logging.WARNING):
        report = length_diagnostics(margins, [-2 * m for m in margins])
    assert report["spearman_margin_vs_length_diff"] == pytest.approx(-1.0) and report["length_dominates"]
    assert "follows the response-length difference" in caplog.text
    assert not length_diagnostics(margins, [(m * 7919) % 31 for m in margins])["length_dominates"]


# ------------------------------------------------------------------------------------------------ poolings
def test_last_pooling_reads_the_response_not_the_template_tail(llama, tokenizer):
    """With ChatML every rendered text ends in the same "<|im_end|>\\n": at layer 0 (no context) the old
    last-rendered pooling sees the same token on both sides, the response's last token does not."""
    with pytest.raises(ValueError, match="same mean"):
        MarginVector.fit(llama, tokenizer, PROMPTS, GOOD, BAD, layer=0, pooling="last_rendered")
    vec = MarginVector.fit(llama, tokenizer, PROMPTS, GOOD, BAD, layer=0, pooling="last")
    assert torch.isfinite(vec.direction).all()


# ------------------------------------------------------------------------------------------------ batching
def test_sequence_batches_cap_size_and_padding():
    from hf_repalign.legend.embedding import sequence_batches

    lengths = [int(x) for x in torch.randint(1, 400, (301,), generator=torch.Generator().manual_seed(0))]
    batches = sequence_batches(lengths, 8, window=100)
    assert sorted(i for b in batches for i in b) == list(range(301))  # every sequence exactly once
    for batch in batches:
        assert len(batch) <= 8 and len({i // 100 for i in batch}) == 1  # within one window
        width = max(lengths[i] for i in batch)
        assert 1 - sum(lengths[i] for i in batch) / (width * len(batch)) <= 0.1
    assert max(len(b) for b in batches) == 8  # well-matched lengths still fill a batch
    assert sequence_batches([7] * 5, 2) == [[0, 1], [2, 3], [4]]
    token_capped = sequence_batches(lengths, 8, window=100, max_tokens=1000)
    assert sorted(i for b in token_capped for i in b) == list(range(301))
    assert all(len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 1000 for b in token_capped)


def test_vectors_saved_before_version_2_keep_their_meaning(vector, tmp_path, caplog):
    folder = vector.save_pretrained(tmp_path / "vec")
    config = json.loads((folder / "config.json").read_text())
    assert config["embedding_version"] == 2 and MarginVector.from_pretrained(folder).pooling == "last"
    old = {k: v for k, v in config.items() if k != "embedding_version"}
    (folder / "config.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING):
        assert MarginVector.from_pretrained(folder).pooling == "last_rendered"
    assert "loaded as pooling='last_rendered'" in caplog.text
    (folder / "config.json").write_text(json.dumps(dict(old, pooling="mean")))
    assert MarginVector.from_pretrained(folder).pooling == "mean"
    assert "today's 'mean' leaves them out" in caplog.text
