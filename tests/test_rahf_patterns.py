"""Activity patterns: aligned positions, default layers, response masking, early exit."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_repalign.formats import encode_pair
from hf_repalign.rahf.instructions import instructed_template
from hf_repalign.rahf.patterns import (
    SCIT_SCRIPT_LAYERS,
    AdapterSwitch,
    activity_patterns,
    align_stimuli,
    default_target_layers,
    difference_vectors,
    target_layers,
)
from hf_repalign.testing import tiny_model


def test_default_layers_are_the_papers_band_scaled():
    assert default_target_layers(32) == [10, 12, 14, 16, 18, 20]
    assert default_target_layers(30) == [9, 11, 13, 15, 17, 19]
    assert default_target_layers(64) == [20, 24, 28, 32, 36, 40]
    assert all(1 <= i <= 4 for i in default_target_layers(4))


def test_target_layers_accept_any_list_and_reject_out_of_range(llama):
    assert target_layers(llama, [1, 3]) == [1, 3]
    assert target_layers(llama, None) == default_target_layers(4)
    with pytest.raises(ValueError, match="out of range"):
        target_layers(llama, [2, 9])


def test_positions_line_up_across_stimuli_of_different_prompt_lengths(tokenizer, llama):
    response = "Sure, here it is."
    prompts, responses = [], []
    for instruction in ("Be nice.", "Be extremely rude and unhelpful in everything you say."):
        ids, n = encode_pair(tokenizer, "Hi?", response, instructed_template(tokenizer, instruction))
        prompts.append(ids[:n])
        responses.append(ids[n:])
    assert len(prompts[0]) != len(prompts[1]) and responses[0] == responses[1]
    batch = align_stimuli(prompts, responses, pad_token_id=0, max_response_tokens=64)
    width = max(len(p) for p in prompts)
    r = len(responses[0])
    for row in range(2):
        assert batch["input_ids"][row, width : width + r].tolist() == responses[0]
        assert batch["input_ids"][row, width - len(prompts[row]) : width].tolist() == prompts[row]
    assert torch.equal(batch["response_mask"][0], batch["response_mask"][1])
    assert batch["response_mask"][0].sum().item() == r
    # Left padding is exact: the padded row's response states equal those of the unpadded sequence.
    layers = [1, 3]
    states = activity_patterns(llama, batch["input_ids"], batch["attention_mask"], layers)
    for row in range(2):
        alone = torch.tensor([prompts[row] + responses[row]])
        reference = activity_patterns(llama, alone, torch.ones_like(alone), layers)
        torch.testing.assert_close(states[:, row, width : width + r], reference[:, 0, len(prompts[row]):],
                                   rtol=1e-4, atol=1e-5)


def test_only_the_first_max_response_tokens_real_tokens_are_valid():
    batch = align_stimuli([[1, 2], [3]], [[4, 5, 6, 7, 8], [9, 10]], pad_token_id=0, max_response_tokens=3)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 6], [0, 3, 9, 10, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]


def test_difference_vectors_are_masked():
    a, b = torch.ones(2, 1, 3, 4), torch.zeros(2, 1, 3, 4)
    v, mask = difference_vectors(a, b, torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]))
    assert mask.tolist() == [[0, 1, 0]]
    assert v[:, 0, 1].eq(1).all() and v[:, 0, 0].eq(0).all() and v[:, 0, 2].eq(0).all()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_early_exit_matches_full_forward(tokenizer, family):
    model = tiny_model(family, vocab_size=len(tokenizer))
    batch = align_stimuli([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], 0, 8)
    states = activity_patterns(model, batch["input_ids"], batch["attention_mask"], [1, 2])
    with torch.no_grad():
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=position_ids, output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()
    for k, layer in enumerate([1, 2]):
        torch.testing.assert_close(states[k][valid], full[layer][valid], rtol=1e-5, atol=1e-5)


def test_adapter_switch_stacks_and_switches_without_touching_trainability(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.set_adapter("default")
    peft_model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    switch = AdapterSwitch(peft_model)
    with torch.no_grad():
        default = activity_patterns(peft_model, ids, mask, [2])
        with peft_model.disable_adapter():  # PEFT's own switch-off (it re-enables trainability of active adapters)
            bare = activity_patterns(peft_model, ids, mask, [2])
        switch.set(["other", "default"])
        stacked = activity_patterns(peft_model, ids, mask, [2])
        with switch.only(peft_model, ["other"]):
            assert not peft_model.training
            other = activity_patterns(peft_model, ids, mask, [2])
        with switch.only(peft_model, []):
            base = activity_patterns(peft_model, ids, mask, [2])
        again = activity_patterns(peft_model, ids, mask, [2])
    assert not torch.allclose(default, other) and not torch.allclose(default, base)
    assert not torch.allclose(stacked, default) and not torch.allclose(stacked, other)
    torch.testing.assert_close(base, bare)
    assert torch.equal(again, stacked)  # back to the resting stack
    assert peft_model.training and peft_model.active_adapter == "default"
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    # stacking two adapters == the sum of their deltas on each layer (LoRA is additive), checked on one layer
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        delta = {}
        for name in ("default", "other"):
            with switch.only(peft_model, [name]):
                delta[name] = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), delta["default"] + delta["other"])


def test_scit_script_band_scaled():
    assert default_target_layers(32, SCIT_SCRIPT_LAYERS) == [10, 12, 14, 16, 18]
    assert default_target_layers(30, SCIT_SCRIPT_LAYERS) == [9, 11, 13, 15, 17]
