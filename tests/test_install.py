"""What a user sees from an install: no DeepSpeed probe noise on stdout in runs that do not use DeepSpeed."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed prints the notice only on machines without a GPU")
def test_the_deepspeed_cpu_notice_is_not_printed_by_a_trainer_that_does_not_use_deepspeed():
    pytest.importorskip("deepspeed", reason="the notice comes from DeepSpeed, which is not installed")
    # accelerate's unwrap (called by every Trainer) imports DeepSpeed when it is installed, which prints the notice.
    code = ("import hf_repalign, torch\nfrom accelerate.utils import extract_model_from_parallel\n"
            "extract_model_from_parallel(torch.nn.Linear(1, 1))\nimport deepspeed\n"
            "deepspeed.utils.logger.warning('another DeepSpeed warning')\n")
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr
    assert "another DeepSpeed warning" in done.stdout  # DeepSpeed's other messages are kept
    without = subprocess.run([sys.executable, "-c", code.replace("import hf_repalign, torch", "import torch")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert "Setting accelerator to CPU" in without.stdout  # the test can fail: the notice exists without the filter


def test_library_calls_print_nothing_to_stdout(llama, tokenizer, tmp_path, capfd):
    from transformers import LogitsProcessorList, pipeline

    from hf_repalign import LinearAlignmentProcessor, MarginVector, build_principle_inputs, paired_generate

    capfd.readouterr()
    plain, principle = build_principle_inputs(tokenizer, ["Hi", "How are you?"], "Be kind.")
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=1.0)
    for extra in ({}, {"custom_generate": paired_generate}):
        llama.generate(**plain, logits_processor=LogitsProcessorList([proc]), max_new_tokens=3, do_sample=False,
                       **extra)
    vector = MarginVector.fit(llama, tokenizer, ["Hi", "Bye"], ["No.", "No."], ["Sure, here", "Sure, so"],
                              progress=False)
    vector.save_pretrained(tmp_path / "vector")
    pipe = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector, device="cpu")
    pipe.annotate([{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}] * 2, num_bins=None, progress=False)
    assert capfd.readouterr().out == ""


def test_public_objects_print_what_they_hold(llama, tokenizer):
    from transformers import pipeline

    from hf_repalign import LinearAlignmentProcessor, MarginVector, build_principle_inputs

    _, principle = build_principle_inputs(tokenizer, ["Hi"], "Be kind.")
    proc = LinearAlignmentProcessor(llama, principle["input_ids"], principle["attention_mask"], alpha=2.0,
                                    principle_top_p=0.8, principle_temperature=0.5)
    text = repr(proc)
    assert text.startswith("LinearAlignmentProcessor(alpha=2, normalize=False, principle_top_p=0.8") and "x " in text
    vector = MarginVector.fit(llama, tokenizer, ["Hi", "Bye"], ["No.", "No."], ["Sure, here", "Sure, so"],
                              progress=False)
    pipe = pipeline("legend-margin", model=llama, tokenizer=tokenizer, margin_vector=vector, device="cpu")
    assert repr(pipe).startswith("LegendMarginPipeline(model=") and "margin_vector=MarginVector(" in repr(pipe)


def test_progress_bars_follow_transformers_settings(llama, tokenizer, capfd):
    from transformers.utils import logging

    from hf_repalign import MarginVector

    def fit():
        MarginVector.fit(llama, tokenizer, ["Hi", "Bye"], ["No.", "No."], ["Sure, here", "Sure, so"], progress=True)
        return capfd.readouterr().err

    capfd.readouterr()
    assert "fit safety vector" in fit()
    logging.disable_progress_bar()
    try:
        assert "fit safety vector" not in fit()
    finally:
        logging.enable_progress_bar()
