"""``transformers serve`` runs the exported method behind an OpenAI-compatible endpoint (on 127.0.0.1)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from hf_repalign.linear_alignment import export_custom_generate
from hf_repalign.linear_alignment.method import generate as method_generate
from hf_repalign.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn", "openai")),
    reason="transformers serve needs `pip install 'transformers[serving]'` (the [dev] extra installs it)",
)
PRINCIPLE, ALPHA, MAX_TOKENS = "Always answer in French.", 2.0, 12


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_served_chat_completion_equals_the_python_path(tmp_path, free_port):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    export_custom_generate(tmp_path / "method")
    shutil.copytree(tmp_path / "method" / "custom_generate", folder / "custom_generate")

    port = free_port
    cli = Path(sys.executable).with_name("transformers")
    hub_cache = tmp_path / "hf_home" / "hub"
    hub_cache.mkdir(parents=True)  # transformers 5.17 lists the served models by scanning it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub_cache.parent), "HF_HUB_CACHE": str(hub_cache),
           "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [str(cli), "serve", str(folder), "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                break
            except urllib.error.HTTPError:  # it answered: it is up, whatever it thinks of this endpoint
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"transformers serve did not start:\n{server.stdout.read()[-3000:]}")
                time.sleep(1)
        messages = [{"role": "user", "content": "What is the capital of Italy?"}]
        reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": str(folder), "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "generation_config": json.dumps({"principle": PRINCIPLE, "alpha": ALPHA}),
        })
        served = reply["choices"][0]["message"]["content"]
        plain_reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": str(folder), "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "generation_config": json.dumps({"principle": PRINCIPLE, "alpha": -1.0}),
        })
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    gen = dict(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=model.generation_config.eos_token_id)
    out = method_generate(model, **inputs, principle=PRINCIPLE, alpha=ALPHA, tokenizer=tokenizer, **gen)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert served == expected
    plain = model.generate(**inputs, **gen)
    assert plain_reply["choices"][0]["message"]["content"] == tokenizer.decode(
        plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not torch.equal(out, plain)  # the principle changed the answer
