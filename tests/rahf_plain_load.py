"""Run in a fresh process where hf_repalign cannot be imported: load a saved RAHF folder with plain transformers +
peft and compare its logits with the trained model's (saved beside it).

    python rahf_plain_load.py FOLDER BASE_FOLDER EXPECTED.safetensors adapter|peftmodel|merged

``adapter`` loads with ``AutoPeftModelForCausalLM`` and ``PeftModel``; ``peftmodel`` with ``PeftModel`` on
BASE_FOLDER only (for an adapter whose recorded base is a Hub id, offline).
"""

import sys

sys.modules["hf_repalign"] = None  # any import of it fails: the folder must load without it

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main(folder: str, base: str, expected_file: str, kind: str) -> None:
    expected = load_file(expected_file)
    ids, logits = expected["input_ids"], expected["logits"]
    loaded = []
    if kind == "merged":
        loaded.append(("AutoModelForCausalLM", AutoModelForCausalLM.from_pretrained(folder)))
    else:
        from peft import AutoPeftModelForCausalLM, PeftModel

        if kind == "adapter":
            loaded.append(("AutoPeftModelForCausalLM", AutoPeftModelForCausalLM.from_pretrained(folder)))
        loaded.append(("PeftModel", PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)))
    for name, model in loaded:
        with torch.no_grad():
            got = model.eval()(input_ids=ids).logits
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean()
        print(f"{name}: max |logit diff| {(got - logits).abs().max().item():.3g}, KL/token {kl.item():.3g}")
        torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
