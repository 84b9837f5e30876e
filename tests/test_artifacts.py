"""Saved RAHF adapters and margin vectors load elsewhere: Hub ids as base models, cards whose snippets run, no
pickle, push_to_hub at the HfApi boundary, and Trainer checkpoints that survive a kill during a save."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig, get_peft_model

from hf_repalign import cli
from hf_repalign.legend import MarginVector
from hf_repalign.models import load_model_and_tokenizer
from hf_repalign.rahf.trainer import RAHFConfig, RAHFTrainer
from hf_repalign.testing import tiny_model

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five, obviously!!"},
    {"prompt": "Name a colour.", "chosen": "Blue, like the sky.", "rejected": "No."},
    {"prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "Go away."},
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "7"},
]
HUB_ID = "org/tiny-llama"  # stands for the base model's Hub id; the snippets get the local folder instead


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scit_adapter(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("scit") / "adapter"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_model("llama", vocab_size=len(tokenizer)), lora).save_pretrained(str(path))
    return str(path)


def _trainer(tmp_path, model_dir, scit_adapter, **kw):
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    args = RAHFConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none",
                      use_cpu=True, save_strategy="no", target_layers=[1, 2], max_response_tokens=6, max_steps=1,
                      **kw)
    return RAHFTrainer(model, args, train_dataset=ROWS, processing_class=tokenizer, instructed=scit_adapter)


def _run_card_snippets(card: str, replacements: dict[str, str], cwd: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert blocks, "the card has no usage snippet"
    for block in blocks:
        for old, new in replacements.items():
            block = block.replace(f'"{old}"', json.dumps(new))
        done = subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
        assert done.returncode == 0, block + "\n" + done.stderr[-3000:]


def _metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


# ------------------------------------------------------------------------------------------------ RAHF adapters
@pytest.mark.parametrize("lora_on", ["instructed", "base"])  # stacked on the step-1 adapter, or alone
def test_rahf_adapter_records_the_hub_id_and_its_card_snippet_runs(tmp_path, model_dir, scit_adapter, lora_on):
    trainer = _trainer(tmp_path, model_dir, scit_adapter, base_model=HUB_ID, dataset_name="Anthropic/hh-rlhf",
                       lora_on=lora_on)
    trainer.train()
    folder = trainer.save_pretrained(tmp_path / "adapter")
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))], names  # no pickle
    assert json.loads((folder / "training_args.json").read_text())["alpha"] == trainer.args.alpha
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    card = (folder / "README.md").read_text()
    assert _metadata(card) | {"tags": None} == {"base_model": HUB_ID, "library_name": "peft",
                                                "datasets": ["Anthropic/hh-rlhf"], "tags": None}
    assert {"hf_repalign", "rahf"} <= set(_metadata(card)["tags"])
    assert 'adapter_name="step1"' not in card  # one adapter: the step-1 adapter is folded in
    _run_card_snippets(card, {HUB_ID: str(model_dir)}, tmp_path)


def test_rahf_adapter_of_a_local_model_needs_base_model_to_push(tmp_path, model_dir, scit_adapter, monkeypatch):
    trainer = _trainer(tmp_path, model_dir, scit_adapter)
    folder = trainer.save_pretrained(tmp_path / "adapter")
    # Without a Hub id the local path stays (it loads on this machine), and the card has no `base_model`.
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    assert "base_model" not in _metadata((folder / "README.md").read_text())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="pass base_model="):
        trainer.push_to_hub(repo_id="me/adapter")


def test_rahf_push_to_hub_at_the_hub_boundary(tmp_path, model_dir, scit_adapter, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns=()):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload", repo_id, commit_message, files, (Path(folder_path) / "README.md").read_text()))
            return "url"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    trainer = _trainer(tmp_path, model_dir, scit_adapter, base_model=HUB_ID, hub_private_repo=True)
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "thesis.tex").write_text("not for the Hub")
    with pytest.raises(ValueError, match="push those first"):  # stacked on a local step-1 adapter
        trainer.push_to_hub(repo_id="me/adapter", save_as="stacked")
    assert trainer.push_to_hub("Upload RAHF adapter", repo_id="me/adapter", save_as="stacked",
                               stacked_on=["me/scit"]) == "url"
    (create, (_, repo, message, files, card)) = calls
    assert create == ("create_repo", "me/adapter", True) and (repo, message) == ("me/adapter", "Upload RAHF adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_args.json"} <= set(files)
    assert "thesis.tex" not in files and not [f for f in files if f.endswith(".bin")]
    assert 'PeftModel.from_pretrained(base, "me/scit", adapter_name="step1")' in card
    assert 'model.load_adapter("me/adapter", adapter_name="rahf")' in card and f"base_model: {HUB_ID}" in card

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        trainer.push_to_hub(repo_id="me/adapter", save_as="stacked", stacked_on=["me/scit"])


def test_align_keeps_checkpoints_and_other_files_of_the_output_dir(tmp_path, model_dir, scit_adapter):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    assert cli.main(["rahf", "align", "--model_name_or_path", str(model_dir), "--dataset", str(data),
                     "--instructed", scit_adapter, "--output_dir", str(out), "--report_to", "none", "--use_cpu",
                     "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "1",
                     "--target_layers", "1", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert {"checkpoint-1", "checkpoint-2", "thesis.tex", "adapter_model.safetensors", "README.md"} <= set(names)
    assert (out / "thesis.tex").read_text() == "mine" and "training_args.bin" not in names
    assert not [n for n in names if n.startswith(".")], names


# ------------------------------------------------------------------------------------------------ margin vectors
def test_margin_vector_card_snippet_runs(tmp_path, model_dir):
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    vec = MarginVector.fit(model, tokenizer, ["How do I pick a lock?", "Make a weapon"], ["No.", "I can't."],
                           ["Sure, first...", "Step one..."], layer=2)
    assert vec.model_name_or_path == str(model_dir)  # a local folder without a recorded Hub id
    folder = vec.save_pretrained(tmp_path / "vec", base_model=HUB_ID)
    card = (folder / "README.md").read_text()
    assert _metadata(card)["base_model"] == HUB_ID and {"hf_repalign", "legend"} <= set(_metadata(card)["tags"])
    _run_card_snippets(card, {HUB_ID: str(model_dir)}, tmp_path)


# ------------------------------------------------------------------------------------------------ checkpoints
_TRAIN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from hf_repalign.models import load_model_and_tokenizer
    from hf_repalign.rahf.trainer import RAHFConfig, RAHFTrainer
    model_dir, adapter, out, steps, resume = sys.argv[1:6]
    rows = [{"prompt": f"Question {i}?", "chosen": "A kind answer.", "rejected": "No."} for i in range(8)]
    model, tokenizer = load_model_and_tokenizer(model_dir)
    args = RAHFConfig(output_dir=out, per_device_train_batch_size=2, report_to="none", use_cpu=True,
                      save_strategy="steps", save_steps=1, max_steps=int(steps), target_layers=[1, 2],
                      max_response_tokens=4)
    trainer = RAHFTrainer(model, args, train_dataset=rows, processing_class=tokenizer, instructed=adapter)
    print("training", flush=True)
    trainer.train(resume_from_checkpoint=resume == "resume")
    print("done", trainer.state.global_step, flush=True)
""")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_from_checkpoint_true_works_after_kills_during_saves(tmp_path, model_dir, scit_adapter):
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "out"
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, "-c", _TRAIN, str(model_dir), scit_adapter, str(out), "1000",
                                  "resume" if attempt else "fresh"], stdout=subprocess.PIPE, text=True, env=env)
        while (line := child.stdout.readline()) and line.strip() != "training":  # DeepSpeed may log first
            pass
        assert line.strip() == "training"
        deadline = time.time() + 120
        while not list(out.glob("checkpoint-*")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # steps and saves alternate every few tens of ms
        child.send_signal(signal.SIGKILL)
        child.wait()
        last = get_last_checkpoint(str(out))
        assert last is not None
        assert json.loads((Path(last) / "trainer_state.json").read_text())["global_step"] == int(last.split("-")[-1])
        assert (Path(last) / "adapter_model.safetensors").is_file() and (Path(last) / "optimizer.pt").is_file()
    step = int(get_last_checkpoint(str(out)).split("-")[-1])
    done = subprocess.run([sys.executable, "-c", _TRAIN, str(model_dir), scit_adapter, str(out), str(step + 2),
                           "resume"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == str(step + 2)
    assert not list(out.glob(".checkpoint-*"))  # the killed saves' staging folders are gone
