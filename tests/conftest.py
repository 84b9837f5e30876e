"""Shared fixtures: tiny models built in code, the embedded model, launchers. Float-comparison rule: tests/README.md.

Hermetic: before anything imports huggingface_hub (which reads these variables once), every cache points into one
temporary folder per test session, so no test reads or writes the user's ``$HF_HOME`` or ``~/.cache`` and the
user's environment cannot change a result. The embedded model is converted into it once per session.
"""

import os
import shutil
import tempfile

SESSION_CACHE = tempfile.mkdtemp(prefix="repalign-tests-")
CACHE_VARIABLES = {
    "HF_HOME": "hf",
    "HF_HUB_CACHE": "hf/hub",
    "HF_MODULES_CACHE": "hf/modules",
    "HF_DATASETS_CACHE": "hf/datasets",
    "XDG_CACHE_HOME": "xdg",  # torch, matplotlib and the rest of ~/.cache
    "TRITON_CACHE_DIR": "xdg/triton",
}
for _variable, _folder in CACHE_VARIABLES.items():
    os.environ[_variable] = os.path.join(SESSION_CACHE, _folder)
# Older or more specific names that would win over HF_HOME, the user's token and data folder, debug switch.
for _variable in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN",
                  "HF_TOKEN_PATH", "HF_REPALIGN_DATA", "REPALIGN_DEBUG"):
    os.environ.pop(_variable, None)
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import atexit  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_repalign.testing import tiny_model, tiny_tokenizer  # noqa: E402

# At most 2 threads, shared out among pytest-xdist's workers so that they do not oversubscribe the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    """The same byte-level tokenizer without a chat template."""
    return tiny_tokenizer(chat_template=False)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model(request, tokenizer):
    """A tiny random decoder of each family (Llama and Qwen2)."""
    return tiny_model(request.param, vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def llama(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    return tiny_model("gpt2", vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (converted once per session into the session's HF cache)."""
    from hf_repalign.models import load_model_and_tokenizer

    return load_model_and_tokenizer()


@pytest.fixture
def launcher():
    """``launcher("torchrun")``: the path of a launcher script next to this Python, or skip the test."""

    def find(name: str) -> str:
        path = shutil.which(name, path=str(Path(sys.executable).parent))
        if path is None:
            pytest.skip(f"the {name} launcher is not installed next to this Python")
        return path

    return find


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: launchers and servers of parallel test workers must
    not share one (DeepSpeed reads MASTER_PORT itself, so port 0 does not work there)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def scit_adapter(tmp_path, tokenizer) -> str:
    """A non-zero LoRA on the tiny Llama, saved to a folder: the instructed (SCIT) model of multi-process tests."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_model("llama", vocab_size=len(tokenizer)), config).save_pretrained(str(tmp_path / "scit"))
    return str(tmp_path / "scit")


@pytest.fixture
def interrupt_legend_forward(monkeypatch):
    """``interrupt_legend_forward(n)``: the LEGEND forward that would embed more than ``n`` sequences in all raises
    KeyboardInterrupt (an interrupted ``annotate`` run); returns a counter of the sequences embedded.
    ``monkeypatch.undo()`` restores the real forward."""
    from hf_repalign.legend.embedding import embed_sequences

    def arm(after: int) -> dict:
        calls = {"sequences": 0}

        def failing(model, sequences, views):
            if calls["sequences"] + len(sequences) > after:
                raise KeyboardInterrupt
            calls["sequences"] += len(sequences)
            return embed_sequences(model, sequences, views)

        monkeypatch.setattr("hf_repalign.legend.pipeline.embed_sequences", failing)
        return calls

    return arm
