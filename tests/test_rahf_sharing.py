"""What RAHF saves and pushes loads with plain transformers + peft, in a fresh process without hf_repalign, as exactly
the trained model; pushes are one upload of one complete, pickle-free artifact (against a fake HfApi)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_repalign.testing import tiny_model

from rahf_helpers import lora, make_trainer

PLAIN_LOAD = Path(__file__).with_name("rahf_plain_load.py")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.fixture()
def base_dir(tmp_path, tokenizer):
    """A tiny base saved to a folder (what the adapters name as their base) and a non-zero step-1 adapter on it."""
    folder = tmp_path / "base"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora(init_lora_weights=False)).save_pretrained(
        str(tmp_path / "scit"))
    return folder


def _trained(tmp_path, tokenizer, base_dir, **kw):
    trainer = make_trainer(tmp_path, tokenizer, str(tmp_path / "scit"), model=AutoModelForCausalLM.from_pretrained(
        base_dir), max_steps=2, learning_rate=1e-2, **kw)
    trainer.train()
    with torch.no_grad():
        logits = trainer.model.eval()(input_ids=IDS).logits
    save_file({"input_ids": IDS, "logits": logits.contiguous()}, str(tmp_path / "expected.safetensors"))
    return trainer, logits


def _load_plain(folder, base_dir, kind, tmp_path):
    """Load ``folder`` in a fresh process where hf_repalign is not importable, from another working directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, str(PLAIN_LOAD), str(folder), str(base_dir),
                             str(tmp_path / "expected.safetensors"), kind],
                            capture_output=True, text=True, cwd=elsewhere, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_default_save_loads_alone_as_the_trained_model_with_plain_peft(tmp_path, tokenizer, base_dir):
    trainer, logits = _trained(tmp_path, tokenizer, base_dir)  # lora_on="instructed" on the step-1 adapter
    with torch.no_grad():  # negative control: the base alone is far from the trained model
        assert (AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=IDS).logits - logits).abs().max() > 1e-2
    out = trainer.save_pretrained(tmp_path / "rahf")
    signature = json.loads((out / "hf_repalign_base.json").read_text())
    assert signature["save_as"] == "adapter" and signature["stacked_on"] == []
    assert not (out / "training_args.bin").exists() and (out / "tokenizer.json").is_file()
    output = _load_plain(out, base_dir, "adapter", tmp_path)
    assert "AutoPeftModelForCausalLM" in output and "PeftModel" in output and output.strip().endswith("ok")
    # the card's snippet loads the folder by its absolute path: it runs from any directory
    assert f'PeftModel.from_pretrained(base, "{out.absolute()}")' in (out / "README.md").read_text()


def test_merged_save_is_a_plain_transformers_model_equal_to_the_trained_one(tmp_path, tokenizer, base_dir):
    trainer, logits = _trained(tmp_path, tokenizer, base_dir)
    out = trainer.save_pretrained(tmp_path / "merged", save_as="merged")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert "library_name: transformers" in (out / "README.md").read_text()
    _load_plain(out, base_dir, "merged", tmp_path)
    with torch.no_grad():  # the trained model itself is untouched: a copy was merged
        assert torch.equal(trainer.model(input_ids=IDS).logits, logits)


def test_stacked_save_says_so_and_is_not_the_model_alone(tmp_path, tokenizer, base_dir):
    trainer, logits = _trained(tmp_path, tokenizer, base_dir)
    out = trainer.save_pretrained(tmp_path / "stacked", save_as="stacked")
    signature = json.loads((out / "hf_repalign_base.json").read_text())
    assert signature["save_as"] == "stacked" and signature["stacked_on"] == [str(tmp_path / "scit")]
    assert "Loaded alone it is NOT the trained model" in (out / "README.md").read_text()
    with torch.no_grad():
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
        assert not torch.allclose(alone(input_ids=IDS).logits, logits, atol=1e-4)


def test_dual_default_save_folds_the_good_adapter(tmp_path, tokenizer, base_dir):
    bad = tmp_path / "bad"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora(init_lora_weights=False)).save_pretrained(
        str(bad))
    trainer = make_trainer(tmp_path, tokenizer, [str(tmp_path / "scit"), str(bad)], method="dual",
                           model=AutoModelForCausalLM.from_pretrained(base_dir), max_steps=1, learning_rate=1e-2,
                           lora_target_modules=["q_proj", "o_proj"])  # other modules than the good adapter's
    trainer.train()
    out = trainer.save_pretrained(tmp_path / "rahf")
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=IDS).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.embedded
@pytest.mark.slow
def test_default_save_of_the_embedded_model_loads_as_trained(tmp_path, embedded):
    """SmolLM2-135M: a random step-1 LoRA on all linear layers, two RAHF steps on it, then the saved adapter alone
    (plain peft, fresh process) against the trained model; the RAHF LoRA alone is far from it."""
    from hf_repalign.models import load_model_and_tokenizer
    from rahf_helpers import ROWS

    fresh = lambda: load_model_and_tokenizer()[0]  # noqa: E731
    _, tokenizer = embedded
    step1 = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)  # non-zero
    get_peft_model(fresh(), step1).save_pretrained(str(tmp_path / "scit"))
    model = fresh()
    base_dir = model.config.name_or_path
    trainer = make_trainer(tmp_path, tokenizer, str(tmp_path / "scit"), model=model, rows=ROWS, max_steps=2,
                           learning_rate=1e-3, target_layers=None, max_response_tokens=16)
    trainer.train()
    ids = tokenizer("How can I get better sleep? Try a regular schedule.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = trainer.model.eval()(input_ids=ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(tmp_path / "expected.safetensors"))
    out = trainer.save_pretrained(tmp_path / "rahf")
    print(_load_plain(out, base_dir, "peftmodel", tmp_path))
    stacked = trainer.save_pretrained(tmp_path / "stacked", save_as="stacked")
    with torch.no_grad():
        alone = PeftModel.from_pretrained(fresh(), str(stacked)).eval()(input_ids=ids).logits
    print(f"RAHF LoRA alone: max |logit diff| {(alone - logits).abs().max().item():.3g}")
    assert (alone - logits).abs().max() > 1e-2


def test_save_as_is_checked():
    from hf_repalign.rahf import RAHFConfig

    with pytest.raises(ValueError, match="save_as must be one of"):
        RAHFConfig(output_dir="x", save_as="gguf")


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records repos and every upload's files (after its ignore rules)."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.repos.append(repo_id)

    def upload_folder(self, folder_path, repo_id, commit_message=None, ignore_patterns=(), **kwargs):
        from fnmatch import fnmatch

        root = Path(folder_path)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
                 and not any(fnmatch(p.relative_to(root).as_posix(), pattern) for pattern in ignore_patterns)}
        self.uploads.append((repo_id, files))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub
    import transformers.trainer

    from hf_repalign import hub

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)

    def trainers_own_hub_code(*args, **kwargs):
        raise AssertionError("Trainer's own Hub code ran (a repo at init, an upload per save)")

    monkeypatch.setattr(transformers.trainer, "hf_api", trainers_own_hub_code)
    return fake


def _one_clean_upload(fake, repo_id, base_id):
    assert [repo for repo, _ in fake.uploads] == [repo_id] and fake.repos == [repo_id]
    files = fake.uploads[0][1]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl")) or "/" in name
                or name.startswith(".") or "checkpoint" in name]
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == base_id
    card = files["README.md"].decode()
    assert f"base_model: {base_id}" in card and f'from_pretrained("{repo_id}")' in card
    return files


def test_rahf_push_is_one_upload_of_the_default_artifact(tmp_path, tokenizer, base_dir, fake_hub):
    trainer = make_trainer(tmp_path, tokenizer, str(tmp_path / "scit"), model=AutoModelForCausalLM.from_pretrained(
        base_dir), max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True, hub_model_id="user/rahf",
        base_model="org/tiny-llama")
    trainer.train()  # two checkpoints: none is uploaded
    assert (tmp_path / "out" / "checkpoint-2").is_dir() and not fake_hub.uploads
    trainer.save_model()  # as Trainer: saves output_dir, then pushes (args.push_to_hub)
    files = _one_clean_upload(fake_hub, "user/rahf", "org/tiny-llama")
    config = json.loads(files["adapter_config.json"])
    assert config["r"] == 12  # the RAHF LoRA (r=8) and the step-1 adapter (r=4) folded into one
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_rahf_push_without_a_hub_id_base_is_refused_before_uploading(tmp_path, tokenizer, base_dir, fake_hub):
    trainer = make_trainer(tmp_path, tokenizer, str(tmp_path / "scit"), model=AutoModelForCausalLM.from_pretrained(
        base_dir), max_steps=1)
    trainer.train()
    with pytest.raises(ValueError, match="base_model"):
        trainer.push_to_hub(repo_id="user/rahf")
    assert not fake_hub.uploads


def test_cli_align_push_uploads_once_at_the_end(tmp_path, tokenizer, base_dir, fake_hub):
    from hf_repalign import cli

    data = tmp_path / "prefs.jsonl"
    from rahf_helpers import ROWS

    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert cli.main(["rahf", "align", "--model_name_or_path", str(base_dir), "--dataset_name", str(data), "--report_to",
                     "none", "--use_cpu", "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps",
                     "1", "--instructed", str(tmp_path / "scit"), "--target_layers", "1", "3", "--output_dir",
                     str(tmp_path / "rahf"), "--push_to_hub", "--hub_model_id", "user/rahf", "--base_model",
                     "org/tiny-llama"]) == 0
    _one_clean_upload(fake_hub, "user/rahf", "org/tiny-llama")


def test_cli_scit_push_uploads_once_and_the_card_names_the_folder(tmp_path, tokenizer, base_dir, fake_hub):
    from hf_repalign import cli
    from rahf_helpers import ROWS

    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    out = tmp_path / "scit_cli"
    out.mkdir()
    (out / "README.md").write_text("my notes")  # a foreign README: replaced only with --overwrite
    assert cli.main(["rahf", "scit", "--model_name_or_path", str(base_dir), "--dataset_name", str(data), "--report_to",
                     "none", "--use_cpu", "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps",
                     "1", "--use_peft", "--output_dir", str(out), "--overwrite", "--push_to_hub", "--hub_model_id",
                     "user/scit", "--base_model", "org/tiny-llama"]) == 0
    _one_clean_upload(fake_hub, "user/scit", "org/tiny-llama")
    assert f'PeftModel.from_pretrained(base, "{out.absolute()}")' in (out / "README.md").read_text()


def test_scit_push_and_save_are_hub_ready(tmp_path, tokenizer, base_dir, fake_hub, monkeypatch):
    from peft.utils import save_and_load

    from hf_repalign.rahf import SCITConfig, SCITTrainer
    from rahf_helpers import ROWS

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked during an adapter save")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_hub)

    args = SCITConfig(output_dir=str(tmp_path / "scit_out"), report_to="none", use_cpu=True, max_steps=1,
                      per_device_train_batch_size=2, save_strategy="no", hub_model_id="user/scit",
                      base_model="org/tiny-llama")
    trainer = SCITTrainer(AutoModelForCausalLM.from_pretrained(base_dir), args, train_dataset=ROWS,
                          processing_class=tokenizer, peft_config=lora())
    trainer.train()
    trainer.save_model()
    saved = tmp_path / "scit_out"
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    assert "RAHF step 1: SCIT" in (saved / "README.md").read_text() and (saved / "tokenizer.json").is_file()
    assert not (saved / "training_args.bin").exists()
    assert trainer.push_to_hub("Upload SCIT", tags=["x"]) == "https://huggingface.co/user/scit/commit/0"
    _one_clean_upload(fake_hub, "user/scit", "org/tiny-llama")


def test_dual_adapters_are_saved_hub_ready(tmp_path, tokenizer, base_dir):
    from hf_repalign.rahf import DualConfig, train_dual
    from rahf_helpers import ROWS

    args = DualConfig(output_dir=str(tmp_path / "dual"), per_device_train_batch_size=2, max_steps=1,
                      report_to="none", use_cpu=True, save_strategy="no", max_length=None)
    folders = train_dual(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, ROWS, args, peft_config=lora())
    for name, folder in folders.items():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base_dir.absolute())  # no Hub id known: the absolute path
        card = (folder / "README.md").read_text()
        assert f"Dual {name}" in card and f'from_pretrained("{folder.absolute()}")' in card
        assert (folder / "tokenizer.json").is_file() and not (folder / "training_args.bin").exists()
