"""The README (Hub card) of the exported Linear Alignment ``custom_generate`` repository."""

METHOD_README = '''---
library_name: transformers
tags:
- custom_generate
- linear-alignment
- alignment
- decoding
---

# Linear Alignment (decoding-time alignment with a principle)

Linear Alignment (Gao et al., "Linear Alignment: A Closed-form Solution for Aligning Human Preferences without
Tuning and Feedback", ICML 2024) steers any causal LM towards a principle written in plain text, with no training.
At every step it runs the prompt twice in one batched forward: as is (logits `mu0`) and with the principle added to
its system text (logits `mup`), and decodes from `mup + alpha * (mup - mu0)`. Every processor and warper `generate`
builds (repetition penalty, temperature, top-p, the model's `generation_config.json` defaults, ...) then acts on
these aligned scores as on a plain model's logits.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", padding_side="left")
messages = [[{"role": "user", "content": "What is the capital of Italy?"}]]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True, padding=True)
out = model.generate(**inputs, custom_generate="<this repo>", trust_remote_code=True,
                     principle="Always answer in French.", tokenizer=tokenizer, alpha=1.0, max_new_tokens=40)
print(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With a pipeline: `pipeline("text-generation", model=..., tokenizer=...)(messages, custom_generate="<this repo>",
trust_remote_code=True, principle="...", tokenizer=tokenizer)`.

`alpha` sets how far decoding moves along the principle's direction: `alpha=-1` is plain decoding, `alpha=0` is
just prompting with the principle, `alpha>0` goes past prompting (the authors used 3 to 5).

## Arguments (on top of those of `generate`)

| argument | meaning |
|---|---|
| `principle` | the principle as text: one for every row, or a list with one per row. Needs `tokenizer`. It is appended, after a blank line, to each prompt's system text (the conversation's system message, or the default system prompt the chat template inserts); a prompt with no system text gets the principle as its system turn. Prompts without a chat template use `System: ...` / `Human: ...` turns. |
| `principles`, `alphas` | several principles at once, composed in one forward of (k+1)B rows per step: `mu0 + sum_i (1 + alpha_i) (mu_i - mu0)`. With one principle this is exactly `mup + alpha (mup - mu0)`; `alpha_i = -1` drops principle i. `alphas` defaults to `alpha` for each. |
| `alpha` | the step (default 1.0). |
| `principle_input_ids`, `principle_attention_mask` | the principle-conditioned prompts already encoded (left-padded, one row per prompt; a list for several principles), instead of text. |
| `normalize` | the paper's Eq. 10: `mu0 + alpha (mup - mu0) / ||mup - mu0||` (alpha then in logit units, tens to hundreds). |
| `principle_top_p`, `principle_temperature` | the authors' plausibility mask: keep only the top-p nucleus of the principle distribution (they used 0.8 at temperature 0.5). |
| `check_prompts` | default True: refuse principle rows that are not their prompt with the principle inserted. |
| `tokenizer` | the model's tokenizer: needed for `principle(s)` as text and for `stop_strings`. |
| `stop_strings`, `streamer`, `stopping_criteria`, `logits_processor`, sampling and length arguments | as for `generate`. |
| `revision`, `token`, `cache_dir`, `local_files_only`, `force_download` | used by transformers to load this method; never passed to the model. |

## Output

What `generate` returns: the token ids (prompt + answer), or with `return_dict_in_generate=True` a
`GenerateDecoderOnlyOutput` with `sequences`, the aligned `scores`/`logits` when asked, and the plain rows' cache.

## Refused, and why

- Without `trust_remote_code=True`: transformers refuses to run this repository's code.
- Beam search (`num_beams > 1`), assisted decoding, `output_attentions`/`output_hidden_states`, a pre-filled cache,
  encoder-decoder models: the two-branch loop does not support them.
- A principle that cannot be placed (prompt ids that do not decode and re-encode to themselves, or that do not start
  like a conversation of this tokenizer's chat template): pass `principle_input_ids` instead.
- Principle rows built for other prompts, or a batch size that does not match: they would steer towards the
  answers to other questions.
- An `alpha` so large that the scores overflow float32, non-finite alphas, giving the principle two ways at once.

## Serving

`transformers serve <model folder or repo carrying this custom_generate/> --trust-remote-code` calls this method
for every request; send the principle and alpha per request in the JSON `generation_config`, e.g.
`"generation_config": "{\\"principle\\": \\"Be brief.\\", \\"alpha\\": 2.0}"`. Serving engines that ignore
`custom_generate/` (vLLM, TGI, SGLang) only load the weights and decode plainly.

Generated by `repalign export-custom-generate` (hf_repalign).
'''
