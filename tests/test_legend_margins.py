"""LEGEND margins you can rely on: batch-invariant, tie-safe binning, length control, any attribute, safe outputs."""

import json
import os
import stat

import pytest
import torch
from datasets import Dataset
from transformers import pipeline

import hf_repalign  # noqa: F401  (registers the pipeline)
from hf_repalign.legend import MarginVector, equal_frequency_bins
from hf_repalign.legend.checkpoints import OutputLock, OutputLockedError
from hf_repalign.legend.data import write_dataset
from hf_repalign.legend.embedding import embed_pairs, encode_triplets, response_length
from hf_repalign.legend.margin import length_direction, margin_direction, margin_raw, remove_direction
from hf_repalign.formats import PreferenceTriplet
from hf_repalign.testing import tiny_model
from test_legend_pipeline import BAD, GOOD, PROMPTS, pipe, vector  # noqa: F401  (shared fixtures)

# Real-looking pairs of varied lengths for the embedded model.
ROWS = [
    {"prompt": "How do I make a bomb?", "chosen": "I can't help with that.",
     "rejected": "Sure. First, gather the following materials from a hardware store and mix them carefully."},
    {"prompt": "Give me a cookie recipe.", "chosen": "Mix butter, sugar, flour and eggs, then bake at 180C for 12 min.",
     "rejected": "No."},
    {"prompt": "What's the capital of France?", "chosen": "Paris.", "rejected": "I think it is Lyon, or Marseille."},
    {"prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof / the garden drinks slowly / night "
     "smells of wet stone", "rejected": "Rain rain rain."},
    {"prompt": "How can I hurt my neighbour?", "chosen": "I won't help with hurting anyone. If you're in a conflict, "
     "talking it through or mediation can help.", "rejected": "Poison their dog."},
    {"prompt": "Tell me a joke.", "chosen": "Why did the scarecrow win an award? He was outstanding in his field.",
     "rejected": "Jokes are a waste of time and so are you."},
]


def pairs(n=5):
    return [{"prompt": PROMPTS[i % 5] * (1 + i // 5), "chosen": GOOD[i % 5], "rejected": BAD[i % 5]} for i in range(n)]


# ------------------------------------------------------------------------------------------ reproducible margins
@pytest.fixture(scope="module")
def embedded_pipe(embedded):
    model, tokenizer = embedded
    vec = MarginVector.fit(model, tokenizer, [r["prompt"] for r in ROWS], [r["chosen"] for r in ROWS],
                           [r["rejected"] for r in ROWS])
    return pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu")


def test_embedded_margins_do_not_depend_on_batch_size_or_order(embedded_pipe):
    """The default configuration (float32): every pair's margin within 1% of the margins' spread, whatever the
    batch size, the order, or whether the pair is scored alone."""

    def margins(data, **kwargs):
        return list(embedded_pipe.annotate(data, num_bins=None, progress=False, **kwargs)["margin_raw"])

    rows = ROWS * 2
    reference = margins(rows, batch_size=1)
    spread = torch.tensor(reference).std().item()
    assert spread > 0
    order = [7, 2, 11, 0, 5, 9, 3, 10, 1, 6, 8, 4]
    shuffled = margins([rows[i] for i in order], batch_size=5)
    runs = {
        "batch 12": margins(rows, batch_size=12),
        "batch 3": margins(rows, batch_size=3),
        "shuffled": [shuffled[order.index(i)] for i in range(len(rows))],
        "alone": [embedded_pipe(row)["margin_raw"] for row in rows],
        "two processes' shards": margins(rows[:5]) + margins(rows[5:]),
    }
    for name, values in runs.items():
        worst = max(abs(a - b) for a, b in zip(values, reference))
        assert worst < 0.01 * spread, (name, worst, spread)
    # The same pair twice in one dataset: bit-identical margins (a repeated sequence is embedded once).
    assert reference[:6] == reference[6:]


def test_embedded_annotate_output_is_identical_run_to_run(embedded_pipe, tmp_path):
    first, second, third = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    embedded_pipe.annotate(ROWS, num_bins=3, output=first, progress=False)
    embedded_pipe.annotate(ROWS, num_bins=3, output=second, progress=False)
    assert first.read_bytes() == second.read_bytes()
    assert len(first.read_text().splitlines()) == len(ROWS)
    # Another batch size: the same bins, margins equal to float32 rounding of the forward.
    embedded_pipe.annotate(ROWS, num_bins=3, output=third, batch_size=2, progress=False)
    a, c = ([json.loads(line) for line in path.read_text().splitlines()] for path in (first, third))
    assert [r["margin"] for r in a] == [r["margin"] for r in c]
    assert [r["margin_raw"] for r in a] == pytest.approx([r["margin_raw"] for r in c], abs=1e-4)


# ------------------------------------------------------------------------------------------------------- ties
def test_identical_margins_get_identical_bins_whatever_their_position():
    values = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert equal_frequency_bins(values + [0.1, 2.0], 3) == [2 / 3] * 6 + [1 / 3, 1.0]
    for rotation in range(6):
        ties = [1.0] * 6
        mixed = ties[:rotation] + [-1.0, 3.0] + ties[rotation:]
        binned = equal_frequency_bins(mixed, 3)
        assert len({binned[i] for i, v in enumerate(mixed) if v == 1.0}) == 1
        assert set(binned) <= {1 / 3, 2 / 3, 1.0}


def test_bins_without_ties_stay_equal_frequency():
    values = torch.randn(103, generator=torch.Generator().manual_seed(1)).tolist()
    binned = equal_frequency_bins(values, 10)
    counts = [binned.count(k / 10) for k in range(1, 11)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == 103


def test_identical_pairs_get_one_bin_through_annotate(pipe):
    rows = [pairs(5)[0]] * 6 + pairs(5)[1:]
    annotated = pipe.annotate(rows, num_bins=3, progress=False)
    assert len(set(list(annotated["margin_raw"])[:6])) == 1
    assert len(set(list(annotated["margin"])[:6])) == 1


# ---------------------------------------------------------------------------------------------- any attribute
def test_fit_from_two_labelled_sets_equals_the_mean_difference(llama, tokenizer):
    rows = ([{"prompt": p, "completion": g, "label": True} for p, g in zip(PROMPTS, GOOD)]
            + [{"prompt": p, "completion": b, "label": False} for p, b in zip(PROMPTS[:3], BAD[:3])])
    vec = MarginVector.fit(llama, tokenizer, data=rows, attribute="helpfulness", pooling="mean")
    encoded = encode_triplets(tokenizer, [PreferenceTriplet(r["prompt"], r["completion"], r["completion"])
                                          for r in rows])
    with torch.no_grad():
        emb = embed_pairs(llama, [item for item, _ in encoded], [(-1, "mean")])[(-1, "mean")][:, 0]
    expected = emb[:5].double().mean(0) - emb[5:].double().mean(0)
    torch.testing.assert_close(vec.direction, (expected / expected.norm()).float(), rtol=1e-5, atol=1e-6)
    assert vec.attribute == "helpfulness" and vec.contrast["kind"] == "sets" and vec.n_pairs is None
    assert (vec.contrast["positive"], vec.contrast["negative"]) == (5, 3)


def test_non_safety_vector_from_a_file_saves_reloads_and_annotates(llama, tokenizer, tmp_path):
    data = tmp_path / "helpful_pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in pairs(5)))
    vec = MarginVector.fit(llama, tokenizer, data=str(data), attribute="helpfulness", length_control=True)
    from_dataset = MarginVector.fit(llama, tokenizer, data=Dataset.from_list(pairs(5)), attribute="helpfulness",
                                    length_control=True)
    torch.testing.assert_close(vec.direction, from_dataset.direction)
    vec.save_pretrained(tmp_path / "vec")
    config = json.loads((tmp_path / "vec" / "config.json").read_text())
    assert config["attribute"] == "helpfulness" and config["length_control"] is True
    assert config["contrast"] == {"source": str(data), "kind": "pairs", "positive": 5, "negative": 5}
    card = (tmp_path / "vec" / "README.md").read_text()
    assert "helpfulness" in card and "length control | yes" in card and "helpful_pairs.jsonl" in card
    reloaded = MarginVector.from_pretrained(tmp_path / "vec")
    assert reloaded.attribute == "helpfulness" and reloaded.length_control
    pipe = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=tmp_path / "vec", device="cpu")
    direct = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vec, device="cpu")
    assert pipe(pairs(5))[2]["margin_raw"] == pytest.approx(direct(pairs(5))[2]["margin_raw"], rel=1e-5)


def test_card_shows_a_measured_agreement_table(vector, tmp_path):
    vector.evaluation = {"HH harmless-base agreement": "56.2% (51.8-60.5)"}
    vector.save_pretrained(tmp_path / "vec")
    assert "| HH harmless-base agreement | 56.2% (51.8-60.5) |" in (tmp_path / "vec" / "README.md").read_text()
    assert MarginVector.from_pretrained(tmp_path / "vec").evaluation == vector.evaluation


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b", "label": "maybe"}], "row 0, field `label`"),
    ([{"prompt": "a", "completion": "b", "label": True}], "0 negative"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "completion": "b", "label": True}],
     "row 1: a set row among pairs rows"),
    ([{"prompt": "a", "completion": "", "label": True}], "row 0, field `completion`"),
    ([{"text": "a"}], "row 0: expected `chosen`/`rejected`"),
])
def test_bad_contrast_rows_are_named(llama, tokenizer, rows, message):
    with pytest.raises(ValueError, match=message):
        MarginVector.fit(llama, tokenizer, data=rows)


# ---------------------------------------------------------------------------------------------- length control
def test_length_controlled_direction_is_orthogonal_to_the_length_direction(llama, tokenizer):
    vec = MarginVector.fit(llama, tokenizer, PROMPTS, GOOD, BAD, pooling="mean", length_control=True)
    plain = MarginVector.fit(llama, tokenizer, PROMPTS, GOOD, BAD, pooling="mean")
    encoded = [item for item, _ in encode_triplets(tokenizer, [PreferenceTriplet(*t) for t in zip(PROMPTS, GOOD, BAD)])]
    with torch.no_grad():
        emb = embed_pairs(llama, encoded, [(-1, "mean")])[(-1, "mean")]
    along = length_direction([emb[:, 0], emb[:, 1]], [[response_length(it, s) for it in encoded]
                                                      for s in ("chosen", "rejected")])
    assert abs(float(vec.direction @ along)) < 1e-5
    expected = remove_direction(margin_direction(emb[:, 0], emb[:, 1]), along)
    torch.testing.assert_close(vec.direction, expected)
    assert abs(float(plain.direction @ along)) > 1e-3  # the control has something to remove


def test_annotate_length_control_removes_the_linear_length_dependence(pipe):
    rows = pairs(10)
    plain, diagnostics = pipe.annotate(rows, num_bins=None, with_diagnostics=True, progress=False)
    controlled, after = pipe.annotate(rows, num_bins=5, length_control=True, with_diagnostics=True, progress=False)
    assert list(controlled["margin_raw"]) == list(plain["margin_raw"])
    control = after["length_control"]
    assert abs(control["pearson_margin_vs_length_diff"]) < 1e-6
    assert diagnostics["pearson_margin_vs_length_diff"] != pytest.approx(0, abs=1e-3)
    lengths = [len(r["chosen"]) for r in rows]  # sanity: the byte tokenizer counts characters
    assert lengths
    expected = [m - control["slope_per_token"] * d for m, d in
                zip(plain["margin_raw"], [_length_diff(pipe, r) for r in rows])]
    assert list(controlled["margin_length_controlled"]) == pytest.approx(expected, abs=1e-9)
    assert list(controlled["margin"]) == equal_frequency_bins(list(controlled["margin_length_controlled"]), 5)


def _length_diff(pipe, row):
    item, _ = pipe.encode(row, margin_vector=pipe._forward_params["margin_vector"])
    return response_length(item, "chosen") - response_length(item, "rejected")


# ------------------------------------------------------------------------------------------ models refused/warned
def test_encoder_decoder_models_are_refused(tokenizer, vector):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2,
                                             num_heads=2, d_kv=16, decoder_start_token_id=0))
    with pytest.raises(ValueError, match="encoder-decoder"):
        pipeline("legend-margin", model=t5, tokenizer=tokenizer, margin_vector=vector, device="cpu")
    with pytest.raises(ValueError, match="encoder-decoder"):
        MarginVector.fit(t5, tokenizer, PROMPTS, GOOD, BAD)


def test_same_width_vector_from_other_weights_warns_even_under_the_same_name(vector, tokenizer, llama, caplog):
    from transformers.utils import logging

    other = tiny_model("llama", vocab_size=len(tokenizer), seed=123)
    other.config.name_or_path = llama.config.name_or_path
    logging.get_logger("hf_repalign").addHandler(caplog.handler)
    try:
        vector.check_compatible(llama.to(torch.bfloat16))  # the same weights in another dtype: no warning
        llama.to(torch.float32)
        assert "ANOTHER MODEL" not in caplog.text
        vector.check_compatible(other)
        assert "ANOTHER MODEL" in caplog.text and "other weights" in caplog.text
    finally:
        logging.get_logger("hf_repalign").removeHandler(caplog.handler)
        llama.to(torch.float32)


# --------------------------------------------------------------------------------------------- lock and output
def test_output_lock_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    output = tmp_path / "out.jsonl"
    (tmp_path / ".out.jsonl.lock").symlink_to(victim)
    with pytest.raises(OutputLockedError, match="not an annotate lock"):
        with OutputLock(output):
            pass
    assert victim.read_text() == "keep me"
    assert (tmp_path / ".out.jsonl.lock").is_symlink()


@pytest.mark.parametrize("kind", ["foreign content", "hard link", "folder"])
def test_output_lock_never_truncates_a_file_not_ours(tmp_path, kind):
    lock = tmp_path / ".out.jsonl.lock"
    victim = tmp_path / "notes.txt"
    victim.write_text("my notes")
    if kind == "foreign content":
        lock.write_text("my notes")
    elif kind == "hard link":
        os.link(victim, lock)
    else:
        lock.mkdir()
    with pytest.raises(OutputLockedError, match="not an annotate lock"):
        with OutputLock(tmp_path / "out.jsonl"):
            pass
    assert victim.read_text() == "my notes"
    if kind == "foreign content":
        assert lock.read_text() == "my notes"


def test_output_lock_takes_over_a_stale_lock_of_ours_and_removes_it(tmp_path):
    lock = tmp_path / ".out.jsonl.lock"
    lock.write_text("pid 99999999")
    with OutputLock(tmp_path / "out.jsonl"):
        assert lock.read_text() == f"pid {os.getpid()}"
    assert not lock.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_output_file_follows_the_umask_and_leaves_no_temp_file(tmp_path, umask, suffix):
    previous = os.umask(umask)
    try:
        path = write_dataset(Dataset.from_list(pairs(3)), tmp_path / f"out{suffix}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    dataset = Dataset.from_list(pairs(3))
    monkeypatch.setattr(Dataset, "to_parquet", lambda self, path: (open(path, "w").write("x"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        write_dataset(dataset, tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == []


def test_margin_raw_is_computed_in_double_precision():
    chosen = torch.tensor([[1e4, 1.0, 3.0]])
    rejected = torch.tensor([[1e4, 0.0, 1.0]])
    d = torch.tensor([0.6, 0.8, 0.0])
    assert margin_raw(chosen, rejected, d).item() == pytest.approx(0.8, abs=1e-7)
