"""Linear Alignment as a ``custom_generate`` method: ``generate(model, ...)`` with the arguments of ``generate``.

This module becomes ``custom_generate/generate.py`` of the exported method (:func:`export_custom_generate`), so it
imports only its sibling modules, torch and transformers. transformers hands it every argument ``generate`` got,
loader arguments included; it builds the :class:`LinearAlignmentProcessor`, then runs ``GenerationMixin.generate``
with ``paired_generate`` (never ``model.generate``: a model repo that ships this method has its ``generate``
replaced by it).

Example:
    >>> out = model.generate(**plain, custom_generate="path/or/hub-id", trust_remote_code=True,
    ...                      principle="Always answer in French.", tokenizer=tokenizer, alpha=1.0, max_new_tokens=32)
"""

from __future__ import annotations

import copy
import functools

from transformers import GenerationMixin, LogitsProcessorList, StoppingCriteriaList

from .paired import paired_generate, stop_string_criteria
from .principles import principle_inputs_for
from .processor import LinearAlignmentProcessor

# What `generate` forwards from loading the method itself; none of it is for the model.
LOADER_ARGUMENTS = (
    "revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder",
    "code_revision", "resume_download", "use_auth_token",
)


def generate(
    model,
    inputs=None,
    *,
    principle: str | list[str] | None = None,
    principles: list[str | list[str]] | None = None,
    alpha: float | None = None,
    alphas: list[float] | None = None,
    principle_input_ids=None,
    principle_attention_mask=None,
    normalize: bool = False,
    principle_top_p: float | None = None,
    principle_temperature: float | None = None,
    check_prompts: bool = True,
    tokenizer=None,
    stop_strings: str | list[str] | None = None,
    streamer=None,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    **kwargs,
):
    """``model.generate`` with Linear Alignment; every other argument means what it means for ``generate``.

    Args:
        principle: the principle as text, one for every row or one per row; needs ``tokenizer``. It is placed in
            each prompt ``generate`` receives as ``build_principle_inputs`` places it (after the system text).
        principles: several principles composed in one forward, each a text (or one text per row).
        alpha: the step along ``mup - mu0`` (default 1.0): ``-1`` is plain decoding, ``0`` principle prompting.
        alphas: one alpha per principle of ``principles`` (default: ``alpha`` for each). The rule is
            ``mu0 + sum_i (1 + alpha_i) (mu_i - mu0)``.
        principle_input_ids / principle_attention_mask: principle-conditioned prompts already encoded (a list of
            them for several principles), instead of text.
        normalize, principle_top_p, principle_temperature, check_prompts: as for ``LinearAlignmentProcessor``.
        tokenizer: the model's tokenizer (for principles given as text and for ``stop_strings``).

    Any of these left unset is read from ``generation_config`` when it carries it (a server's per-request config).

    Returns:
        What ``generate`` returns (ids, or a ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``).
    """
    for name in LOADER_ARGUMENTS:
        kwargs.pop(name, None)
    # A server may carry these in the request's generation config (`transformers serve` 5.17 does); arguments win.
    principle, principles, alpha, alphas, principle_top_p, principle_temperature = (
        getattr(generation_config, name, None) if value is None else value
        for name, value in (("principle", principle), ("principles", principles), ("alpha", alpha),
                            ("alphas", alphas), ("principle_top_p", principle_top_p),
                            ("principle_temperature", principle_temperature)))
    normalize = normalize or bool(getattr(generation_config, "normalize", False))
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("Linear Alignment needs the prompts as `input_ids` (or `inputs`).")
    attention_mask = kwargs.get("attention_mask")
    ids, masks, alpha_value = _principle_rows(
        tokenizer, input_ids, attention_mask, principle, principles, alpha, alphas, principle_input_ids,
        principle_attention_mask)
    processor = LinearAlignmentProcessor(
        model, ids, masks, alpha=alpha_value, normalize=normalize, principle_top_p=principle_top_p,
        principle_temperature=principle_temperature, check_prompts=check_prompts)
    stops = stop_strings
    config_stops = getattr(generation_config if generation_config is not None else model.generation_config,
                           "stop_strings", None)
    if config_stops is not None:
        # generate would ask for a tokenizer it does not hand to the loop: the criterion is built here instead.
        generation_config = copy.deepcopy(generation_config if generation_config is not None
                                          else model.generation_config)
        generation_config.stop_strings = None
        stops = stops if stops is not None else config_stops
    criteria = StoppingCriteriaList(stopping_criteria or [])
    if stops is not None:
        criteria.append(stop_string_criteria(stops, tokenizer))
    return GenerationMixin.generate(
        model,
        inputs=inputs,
        generation_config=generation_config,
        logits_processor=LogitsProcessorList([processor, *(logits_processor or [])]),
        stopping_criteria=criteria,
        streamer=streamer,
        custom_generate=functools.partial(paired_generate, streamer=streamer),
        **kwargs,
    )


def _principle_rows(tokenizer, input_ids, attention_mask, principle, principles, alpha, alphas, principle_input_ids,
                    principle_attention_mask):
    """(principle ids, masks, alpha or alphas) for the processor, from exactly one way of giving the principle."""
    given = [name for name, value in (("principle", principle), ("principles", principles),
                                      ("principle_input_ids", principle_input_ids)) if value is not None]
    if len(given) != 1:
        raise ValueError(
            "give the principle one way: `principle=` (text), `principles=` (several texts) or "
            f"`principle_input_ids=` (encoded); got {given or 'none'}."
        )
    if alphas is not None and principles is None and not isinstance(principle_input_ids, (list, tuple)):
        raise ValueError("`alphas` goes with several principles (`principles=`); use `alpha` for one.")
    if principle_input_ids is not None:
        several = isinstance(principle_input_ids, (list, tuple))
        return principle_input_ids, principle_attention_mask, (alphas if several and alphas else
                                                               1.0 if alpha is None else alpha)
    if tokenizer is None:
        raise ValueError(f"`{given[0]}` as text needs the model's tokenizer: pass `tokenizer=` to generate.")
    if principle is not None:
        encoded = principle_inputs_for(tokenizer, input_ids, attention_mask, principle)
        return encoded["input_ids"], encoded["attention_mask"], 1.0 if alpha is None else alpha
    if isinstance(principles, str) or not principles:
        raise ValueError("`principles` must be a non-empty list of principles (use `principle=` for one).")
    if alphas is None:
        alphas = [1.0 if alpha is None else alpha] * len(principles)
    elif alpha is not None:
        raise ValueError("give `alphas` (one per principle) or `alpha` (the same for all), not both.")
    encoded = [principle_inputs_for(tokenizer, input_ids, attention_mask, text) for text in principles]
    return [e["input_ids"] for e in encoded], [e["attention_mask"] for e in encoded], list(alphas)
