"""The exported ``custom_generate`` method, run where hf_repalign is not installed, equals ``paired_generate``.

The child process runs with ``-I -S`` and only the environment's site-packages on ``sys.path`` (so the editable
install of hf_repalign is not on it; the child checks), ``HF_HUB_OFFLINE=1``, a fresh ``HF_HOME`` and no stdin. It
loads the tiny model and tokenizer saved here and the method from the exported folder, with transformers alone.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GenerationMixin, LogitsProcessorList

from hf_repalign.linear_alignment import (
    LinearAlignmentProcessor,
    build_principle_inputs,
    export_custom_generate,
    paired_generate,
)
from hf_repalign.linear_alignment.export import exported_files
from hf_repalign.testing import tiny_model, tiny_tokenizer

QUESTIONS = ["hi", "How do I open a locked door quickly?", "Tell me a story about a cat."]
PRINCIPLE, SECOND = "Be harmless and kind.", "Answer in one short sentence."
GEN = dict(max_new_tokens=10, pad_token_id=0)
CASES = {
    "greedy": dict(do_sample=False, alpha=1.5),
    "sampling": dict(do_sample=True, top_p=0.9, temperature=0.8, alpha=2.0, seed=3),
    "repetition_penalty": dict(do_sample=False, repetition_penalty=1.4, alpha=1.0),
    "sequence_bias": dict(do_sample=False, sequence_bias={(70,): 4.0, (80, 81): -2.0}, alpha=1.0),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=2, alpha=1.0, seed=5),
    "revision_and_loader_arguments": dict(do_sample=False, alpha=1.0, revision="main", local_files_only=True,
                                          cache_dir=None, force_download=False, token=None),
}

CHILD = textwrap.dedent('''
    import importlib.util, json, sys, traceback
    assert importlib.util.find_spec("hf_repalign") is None, "hf_repalign must not be importable here"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from transformers.generation.streamers import BaseStreamer

    work = sys.argv[1]
    jobs = torch.load(f"{work}/jobs.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(f"{work}/model")
    tokenizer = AutoTokenizer.from_pretrained(f"{work}/model")
    method = f"{work}/method"
    results = {}
    for name, job in jobs.items():
        kwargs = dict(job["kwargs"])
        seed = kwargs.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        if kwargs.pop("needs_tokenizer", False):
            kwargs["tokenizer"] = tokenizer
        try:
            if name == "streamer":
                class Collect(BaseStreamer):
                    puts, ended = [], False
                    def put(self, value): self.puts.append(value.flatten().tolist())
                    def end(self): Collect.ended = True
                kwargs["streamer"] = streamer = Collect()
            if name == "pipeline":
                generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
                out = generator(job["messages"], custom_generate=method, trust_remote_code=True, **kwargs)
                results[name] = out[0]["generated_text"][-1]["content"]
                continue
            out = model.generate(**job["inputs"], custom_generate=method, **kwargs)
            results[name] = out.tolist()
            if name == "streamer":
                results["streamed"] = [streamer.puts, Collect.ended]
        except Exception as error:
            results[name] = {"error": type(error).__name__, "message": str(error)}
    # A model repo that carries the method gets its generate replaced by it: no recursion.
    shipped = AutoModelForCausalLM.from_pretrained(f"{work}/model_with_method", trust_remote_code=True)
    job = jobs["greedy"]
    results["model_repo"] = shipped.generate(**job["inputs"], **{k: v for k, v in job["kwargs"].items()
                                                                 if k != "trust_remote_code"}).tolist()
    json.dump(results, open(f"{work}/results.json", "w"))
''')


def _reference(model, plain, principle, alpha, kwargs, tokenizer=None):
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", None)
    for name in ("revision", "local_files_only", "cache_dir", "force_download", "token"):
        kwargs.pop(name, None)
    if seed is not None:
        torch.manual_seed(seed)
    proc = LinearAlignmentProcessor(model, principle["input_ids"], principle["attention_mask"], alpha=alpha)
    extra = {"tokenizer": tokenizer} if tokenizer is not None else {}
    return model.generate(**plain, logits_processor=LogitsProcessorList([proc]), custom_generate=paired_generate,
                          **GEN, **kwargs, **extra).tolist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Run every case in the child process once; return (results, references, extras)."""
    work = tmp_path_factory.mktemp("hub_method")
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    export_custom_generate(work / "method")
    shutil.copytree(work / "model", work / "model_with_method")
    shutil.copytree(work / "method" / "custom_generate", work / "model_with_method" / "custom_generate")
    plain, principle = build_principle_inputs(tokenizer, QUESTIONS, PRINCIPLE)
    _, second = build_principle_inputs(tokenizer, QUESTIONS, SECOND)
    encoded = dict(principle_input_ids=principle["input_ids"], principle_attention_mask=principle["attention_mask"])
    inputs = {"input_ids": plain["input_ids"], "attention_mask": plain["attention_mask"]}
    jobs, references = {}, {}
    for name, case in CASES.items():
        kwargs = {**GEN, **case, **encoded, "trust_remote_code": True}
        jobs[name] = {"inputs": inputs, "kwargs": kwargs}
        alpha = case["alpha"]
        references[name] = _reference(model, plain, principle, alpha, {k: v for k, v in case.items() if k != "alpha"})
    # Stop strings (one prompt): stop at the text of its third greedy token.
    one_plain, one_principle = build_principle_inputs(tokenizer, QUESTIONS[2:], PRINCIPLE)
    greedy = torch.tensor(_reference(model, one_plain, one_principle, 1.5, {"do_sample": False}))
    start = one_plain["input_ids"].shape[1]
    # The first generated token (after the first) that decodes to one printable ASCII character.
    texts = {i: tokenizer.decode(greedy[0, i:i + 1]) for i in range(start + 1, greedy.shape[1])}
    stop_at = next(i for i, text in texts.items() if text.isascii() and text.isprintable())
    stop = tokenizer.decode(greedy[0, stop_at:stop_at + 1])
    stop_case = dict(do_sample=False, stop_strings=[stop])
    jobs["stop_strings"] = {
        "inputs": {"input_ids": one_plain["input_ids"], "attention_mask": one_plain["attention_mask"]},
        "kwargs": {**GEN, **stop_case, "principle_input_ids": one_principle["input_ids"], "alpha": 1.5,
                   "trust_remote_code": True, "needs_tokenizer": True}}
    references["stop_strings"] = _reference(model, one_plain, one_principle, 1.5, stop_case, tokenizer=tokenizer)
    references["greedy_one"] = greedy.tolist()
    references["stop_at"] = stop_at
    text = dict(do_sample=False, principle=PRINCIPLE, alpha=1.5, needs_tokenizer=True, trust_remote_code=True)
    jobs["principle_text"] = {"inputs": inputs, "kwargs": {**GEN, **text}}
    jobs["streamer"] = {"inputs": inputs, "kwargs": {**GEN, **text}}
    jobs["untrusted"] = {"inputs": inputs, "kwargs": {**GEN, "principle": PRINCIPLE, "needs_tokenizer": True}}
    several = dict(do_sample=False, principles=[PRINCIPLE, SECOND], alphas=[1.0, 0.5], needs_tokenizer=True,
                   trust_remote_code=True)
    jobs["principles"] = {"inputs": inputs, "kwargs": {**GEN, **several}}
    proc = LinearAlignmentProcessor(model, [principle["input_ids"], second["input_ids"]],
                                    [principle["attention_mask"], second["attention_mask"]], alpha=[1.0, 0.5])
    references["principles"] = model.generate(**plain, logits_processor=[proc], custom_generate=paired_generate,
                                              do_sample=False, **GEN).tolist()
    for alpha in (-1.0, 0.0):
        jobs[f"alpha={alpha:g}"] = {"inputs": inputs, "kwargs": {**GEN, **text, "alpha": alpha}}
    references["plain"] = model.generate(**plain, do_sample=False, **GEN).tolist()
    references["prompting"] = model.generate(**principle, do_sample=False, **GEN).tolist()
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    jobs["pipeline"] = {"messages": messages, "kwargs": {**GEN, "do_sample": False, "principle": PRINCIPLE,
                                                         "alpha": 1.5, "needs_tokenizer": True}}
    one_plain, one_principle = build_principle_inputs(tokenizer, [messages], PRINCIPLE)
    one = torch.tensor(_reference(model, one_plain, one_principle, 1.5, {"do_sample": False}))
    references["pipeline"] = tokenizer.decode(one[0, one_plain["input_ids"].shape[1]:], skip_special_tokens=True)
    torch.save(jobs, work / "jobs.pt")

    site = sysconfig.get_paths()["purelib"]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "fresh_hf_home"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    boot = f"import sys; sys.path.append({site!r}); exec(open({str(work / 'child.py')!r}).read())"
    (work / "child.py").write_text(CHILD)
    run = subprocess.run([sys.executable, "-I", "-S", "-c", boot, str(work)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, env=env, timeout=600, cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    return results, references, {"prompt_length": plain["input_ids"].shape[1], "principle": principle}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_method_matches_paired_generate(exported, case):
    results, references, _ = exported
    assert results[case] == references[case]


def test_exported_method_in_a_model_repo_does_not_recurse(exported):
    results, references, _ = exported
    assert results["model_repo"] == references["greedy"]


def test_exported_method_refused_without_trust_remote_code(exported):
    results, _, _ = exported
    assert results["untrusted"]["error"] == "ValueError"
    assert "trust_remote_code" in results["untrusted"]["message"]


def test_exported_method_stop_strings_match_the_installed_path(exported):
    results, references, extras = exported
    assert results["stop_strings"] == references["stop_strings"]
    # It stopped at the stop string (the installed path honours it too).
    stopped, full = references["stop_strings"][0], references["greedy_one"][0]
    assert len(stopped) <= references["stop_at"] + 1 < len(full) and stopped == full[:len(stopped)]


def test_exported_method_principle_text_equals_build_principle_inputs(exported):
    results, references, _ = exported
    assert results["principle_text"] == references["greedy"]
    assert results["pipeline"] == references["pipeline"]


def test_exported_method_streams_and_ends(exported):
    results, references, extras = exported
    puts, ended = results["streamed"]
    assert ended
    generated = [row[extras["prompt_length"]:] for row in results["streamer"]]
    assert [token for put in puts[1:] for token in put] == [token for step in zip(*generated) for token in step]


def test_exported_method_several_principles_and_alpha_identities(exported):
    results, references, extras = exported
    assert results["principles"] == references["principles"]
    assert results["alpha=-1"] == references["plain"]
    cut = extras["prompt_length"]
    prompting = [row[extras["principle"]["input_ids"].shape[1]:] for row in references["prompting"]]
    assert [row[cut:] for row in results["alpha=0"]] == prompting


def test_shipped_method_folder_equals_a_fresh_export():
    shipped = Path(__file__).resolve().parents[1] / "examples" / "linear_alignment_custom_generate"
    files = exported_files()
    on_disk = {str(p.relative_to(shipped)): p.read_text(encoding="utf-8")
               for p in shipped.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk == files, "regenerate it: repalign export-custom-generate examples/linear_alignment_custom_generate"


def test_exported_readme_and_requirements_parse(tmp_path):
    from huggingface_hub import ModelCard
    from transformers.utils.import_utils import split_package_version

    folder = export_custom_generate(tmp_path / "m")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "custom_generate" in card.data.tags
    for line in (folder / "custom_generate" / "requirements.txt").read_text().splitlines():
        name, _, version = split_package_version(line)
        assert name in ("torch", "transformers") and version


def test_export_refuses_to_overwrite_other_files(tmp_path):
    (tmp_path / "m" / "custom_generate").mkdir(parents=True)
    (tmp_path / "m" / "custom_generate" / "generate.py").write_text("mine")
    with pytest.raises(ValueError, match="overwrite"):
        export_custom_generate(tmp_path / "m")
    assert (tmp_path / "m" / "custom_generate" / "generate.py").read_text() == "mine"
    export_custom_generate(tmp_path / "m", overwrite=True)
    export_custom_generate(tmp_path / "m")  # same content again: nothing to refuse


def test_method_never_calls_model_generate(llama, tokenizer, monkeypatch):
    from hf_repalign.linear_alignment.method import generate

    plain, _ = build_principle_inputs(tokenizer, QUESTIONS[:1], PRINCIPLE)
    monkeypatch.setattr(llama, "generate", lambda *a, **k: pytest.fail("model.generate called"), raising=False)
    out = generate(llama, **plain, principle=PRINCIPLE, tokenizer=tokenizer, **GEN)
    assert out.shape[1] == plain["input_ids"].shape[1] + GEN["max_new_tokens"]
    assert GenerationMixin.generate is not llama.generate


def test_cli_export_writes_the_method_and_refuses_in_one_line(tmp_path):
    from hf_repalign.cli import main

    assert main(["export-custom-generate", str(tmp_path / "m")]) == 0
    written = {str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert written == set(exported_files())
    (tmp_path / "m" / "custom_generate" / "rule.py").write_text("mine")
    assert main(["export-custom-generate", str(tmp_path / "m")]) == 1
    assert (tmp_path / "m" / "custom_generate" / "rule.py").read_text() == "mine"


def test_method_reads_unset_settings_from_the_generation_config(llama, tokenizer):
    """A server's per-request config carries principle and alpha (``transformers serve`` 5.17 passes only that);
    arguments given to generate win over it."""
    from transformers import GenerationConfig

    from hf_repalign.linear_alignment.method import generate

    plain, _ = build_principle_inputs(tokenizer, QUESTIONS, PRINCIPLE)
    config = GenerationConfig(principle=PRINCIPLE, alpha=1.5, do_sample=False, **GEN)
    explicit = generate(llama, **plain, principle=PRINCIPLE, alpha=1.5, tokenizer=tokenizer, do_sample=False, **GEN)
    assert torch.equal(generate(llama, **plain, generation_config=config, tokenizer=tokenizer), explicit)
    plain_decoding = llama.generate(**plain, do_sample=False, **GEN)
    overridden = generate(llama, **plain, generation_config=config, alpha=-1.0, tokenizer=tokenizer)
    assert torch.equal(overridden, plain_decoding) and not torch.equal(explicit, plain_decoding)
