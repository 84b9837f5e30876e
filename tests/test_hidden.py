import pytest
import torch

from hf_repalign.testing import FAMILIES, tiny_model
from hf_repalign.hidden import hidden_states_at, pool_last, pool_mean, position_ids_from_mask, resolve_layers


def _batch(vocab=200):
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_equals_full_forward(family, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer))
    ids, mask = _batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     output_hidden_states=True).hidden_states
        total = len(full) - 1
        every = hidden_states_at(model, ids, mask, list(range(total + 1)))
        middle = hidden_states_at(model, ids, mask, [1, 2])
    for i in range(total + 1):
        assert torch.allclose(every[i], full[i], atol=1e-5), i
    for i in (1, 2):
        assert torch.allclose(middle[i], full[i], atol=1e-5), i


def test_early_exit_skips_upper_layers(llama):
    ids, mask = _batch()
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(llama.model.layers)]
    head = llama.lm_head.register_forward_hook(lambda m, a, o: ran.append("lm_head"))
    try:
        hidden_states_at(llama, ids, mask, [2])
    finally:
        for h in hooks + [head]:
            h.remove()
    assert ran == [0, 1]


def test_gradients_flow(llama):
    ids, mask = _batch()
    out = hidden_states_at(llama, ids, mask, [1])[1]
    out.sum().backward()
    assert llama.model.layers[0].self_attn.q_proj.weight.grad is not None
    llama.zero_grad(set_to_none=True)


def test_resolve_layers(llama):
    assert resolve_layers(llama, -1) == [4]
    assert resolve_layers(llama, [3, -5, 3]) == [0, 3]
    with pytest.raises(ValueError, match="layer 5 is out of range for a model with 4 layers"):
        resolve_layers(llama, [5])
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(llama, [])


def test_pooling():
    hidden = torch.arange(24, dtype=torch.float).view(2, 4, 3)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    assert torch.equal(pool_last(hidden, left), torch.stack([hidden[0, 3], hidden[1, 2]]))
    span = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0]])
    assert torch.allclose(pool_mean(hidden, span), torch.stack([hidden[0, 2:].mean(0), hidden[1, 0]]))
