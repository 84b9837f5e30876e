"""Tiny models and tokenizers built in code, for tests, CPU benchmarks and offline experiments.

Nothing here touches the network.

Example:
    >>> from hf_repalign.testing import tiny_model, tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> model = tiny_model("llama", vocab_size=len(tokenizer))
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_tokenizer(chat_template: bool = True, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges, ChatML specials) that encodes any text."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in byte_chars:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side=padding_side,
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(
    family: str = "llama",
    vocab_size: int = 261,
    hidden_size: int = 32,
    num_layers: int = 4,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised decoder-only LM of the given family, in eval mode."""
    torch.manual_seed(seed)
    decoder = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**decoder))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**decoder))
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}.")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model.eval()
