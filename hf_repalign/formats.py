"""Preference data in TRL's shapes, reduced to ``(prompt, chosen, rejected)``, and (prompt, response) rendering.

Accepted rows (see TRL's dataset formats):

* explicit prompt: ``{"prompt", "chosen", "rejected"}`` -- strings, or conversational message lists;
* implicit prompt: ``{"chosen", "rejected"}`` holding whole dialogues that share everything up to the last
  assistant turn (HH-RLHF's ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings, or message lists).

Example:
    >>> from hf_repalign.formats import to_triplet
    >>> to_triplet({"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."})
    PreferenceTriplet(prompt='\\n\\nHuman: Hi\\n\\nAssistant:', chosen=' Hello!', rejected=' Go away.')
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]
Template = Union[str, Callable[[Prompt, str], str], None]

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class PreferenceFormatError(ValueError):
    """A preference row is malformed; the message names the row and the field."""


@dataclass(frozen=True)
class PreferenceTriplet:
    prompt: Prompt
    chosen: str
    rejected: str


def _where(row: int | None, field: str) -> str:
    return f"row {row}, field `{field}`" if row is not None else f"field `{field}`"


def check_unicode(value: str, where: str) -> str:
    """Refuse text that cannot be encoded (a lone surrogate such as ``"\\ud800"``), naming ``where``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PreferenceFormatError(
            f"{where}: the text holds a lone surrogate {value[err.start]!r} at character {err.start}, which is not "
            "valid Unicode (decode the source with errors='replace' or fix the row)."
        ) from None
    return value


def _check_text(value: Any, row: int | None, field: str) -> str:
    if value is None:
        raise PreferenceFormatError(f"{_where(row, field)}: value is None; expected a non-empty string.")
    if not isinstance(value, str):
        raise PreferenceFormatError(
            f"{_where(row, field)}: expected a string, got {type(value).__name__} ({value!r:.60})."
        )
    if not value.strip():
        raise PreferenceFormatError(f"{_where(row, field)}: the text is empty.")
    return check_unicode(value, _where(row, field))


def _check_messages(value: Any, row: int | None, field: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise PreferenceFormatError(f"{_where(row, field)}: expected a non-empty list of messages.")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise PreferenceFormatError(
                f"{_where(row, field)}: message {i} must be a dict with `role` and `content`, got {message!r:.80}."
            )
        if not isinstance(message["content"], str):
            raise PreferenceFormatError(
                f"{_where(row, field)}: message {i} content must be a string, got "
                f"{type(message['content']).__name__}."
            )
        check_unicode(message["content"], f"{_where(row, field)}, message {i}")
    return [dict(m) for m in value]


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], Mapping))


def _last_assistant(messages: Messages, row: int | None, field: str) -> str:
    if messages[-1].get("role") != "assistant":
        raise PreferenceFormatError(f"{_where(row, field)}: the last message must be the assistant's response.")
    return _check_text(messages[-1]["content"], row, f"{field}[-1].content")


def split_implicit(chosen: Any, rejected: Any, row: int | None = None) -> PreferenceTriplet:
    """Split two whole dialogues that share their prompt into ``(prompt, chosen, rejected)``.

    Strings are cut at the last ``"\\n\\nAssistant:"`` of their common prefix (HH-RLHF); message lists at the
    last message.
    """
    if _is_conversational(chosen) or _is_conversational(rejected):
        chosen_m = _check_messages(chosen, row, "chosen")
        rejected_m = _check_messages(rejected, row, "rejected")
        if chosen_m[:-1] != rejected_m[:-1] or len(chosen_m) < 2:
            raise PreferenceFormatError(
                f"row {row}: `chosen` and `rejected` share no prompt (implicit-prompt conversations must be "
                "identical up to the last assistant message)."
            )
        return PreferenceTriplet(
            chosen_m[:-1], _last_assistant(chosen_m, row, "chosen"), _last_assistant(rejected_m, row, "rejected")
        )
    chosen_s = _check_text(chosen, row, "chosen")
    rejected_s = _check_text(rejected, row, "rejected")
    common = 0
    for a, b in zip(chosen_s, rejected_s):
        if a != b:
            break
        common += 1
    cut = chosen_s.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        raise PreferenceFormatError(
            f"row {row}: `chosen` and `rejected` share no prompt (expected a common dialogue ending in "
            f"{HH_ASSISTANT!r}); pass an explicit `prompt` column instead."
        )
    cut += len(HH_ASSISTANT)
    prompt = chosen_s[:cut]
    chosen_r, rejected_r = chosen_s[cut:], rejected_s[cut:]
    _check_text(chosen_r, row, "chosen (response after the shared prompt)")
    _check_text(rejected_r, row, "rejected (response after the shared prompt)")
    return PreferenceTriplet(prompt, chosen_r, rejected_r)


def to_triplet(example: Mapping[str, Any], row: int | None = None) -> PreferenceTriplet:
    """One preference row (explicit or implicit prompt, plain or conversational) as a triplet."""
    missing = [k for k in ("chosen", "rejected") if k not in example]
    if missing:
        raise PreferenceFormatError(
            f"{'row ' + str(row) + ': ' if row is not None else ''}missing column(s) {missing}; a preference row "
            f"needs `chosen` and `rejected` (and optionally `prompt`), got {sorted(example)}."
        )
    if example.get("prompt") is None:  # absent, or None in a dataset that mixes explicit and implicit rows
        return split_implicit(example["chosen"], example["rejected"], row)
    prompt = example["prompt"]
    if _is_conversational(prompt):
        prompt = _check_messages(prompt, row, "prompt")
    else:
        prompt = _check_text(prompt, row, "prompt")
    responses = []
    for field in ("chosen", "rejected"):
        value = example[field]
        if _is_conversational(value):
            value = _last_assistant(_check_messages(value, row, field), row, field)
        responses.append(_check_text(value, row, field))
    return PreferenceTriplet(prompt, *responses)


def hh_to_messages(dialogue: str) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``.

    A trailing empty ``Assistant:`` turn (an HH-RLHF prompt) is dropped.
    """
    parts = _HH_TURN.split(dialogue)
    if len(parts) < 3:
        return [{"role": "user", "content": dialogue.strip()}]
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def prompt_messages(prompt: Prompt) -> Messages:
    """A prompt as chat messages: HH dialogues are parsed into turns, other strings become one user turn."""
    if isinstance(prompt, list):
        return prompt
    if _HH_TURN.search(prompt):
        return hh_to_messages(prompt)
    return [{"role": "user", "content": prompt}]


def normalize_triplet(triplet: PreferenceTriplet) -> PreferenceTriplet:
    """Strip surrounding whitespace from the responses and from every prompt turn, so that the same content gives
    the same text whatever its source: an HH-RLHF string row (``" Hello!"`` after ``"Assistant:"``), a message row
    or a generated answer (already stripped). HH dialogue strings keep their ``"\\n\\nHuman:"`` markers; their turns
    are stripped when they are parsed into messages."""
    return PreferenceTriplet(normalize_prompt(triplet.prompt), triplet.chosen.strip(), triplet.rejected.strip())


def normalize_prompt(prompt: Prompt) -> Prompt:
    """The prompt part of :func:`normalize_triplet` (also used before generating answers to be embedded)."""
    if isinstance(prompt, list):
        return [dict(m, content=m["content"].strip()) for m in prompt]
    return prompt if _HH_TURN.search(prompt) else prompt.strip()


def check_template(template: Template, where: str = "`template`") -> Template:
    """A format-string template may use only ``{prompt}`` and ``{response}`` (each at least once), with no format
    spec or conversion: a template read from a file or the Hub is data, and ``{prompt:>5000000}`` would cost
    seconds and a gigabyte a row."""
    if template is None or callable(template):
        return template
    if not isinstance(template, str):
        raise ValueError(f"{where} must be a format string, a callable or None, got {type(template).__name__}.")
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"{where} {template!r:.80} is not a valid format string: {err}.") from None
    seen = set()
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in ("prompt", "response") or spec or conversion:
            raise ValueError(
                f"{where} {template!r:.80} uses the field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}; only {{prompt}} and {{response}} are allowed, without format "
                "specs or conversions."
            )
        seen.add(name)
    if seen != {"prompt", "response"}:
        raise ValueError(f"{where} {template!r:.80} must contain both {{prompt}} and {{response}}.")
    return template


def render(tokenizer: Any, prompt: Prompt, response: str, template: Template = None) -> str:
    """Text of a (prompt, response) pair.

    ``template`` may be a callable ``(prompt, response) -> str``, a format string with ``{prompt}`` and
    ``{response}``, or ``None``: the tokenizer's chat template (user turn(s) plus an assistant turn) when it has
    one, else plain concatenation.
    """
    if callable(template):
        return template(prompt, response)
    if isinstance(template, str):
        if isinstance(prompt, list):
            raise PreferenceFormatError("a format-string template needs string prompts, got a message list.")
        return template.format(prompt=prompt, response=response)
    if getattr(tokenizer, "chat_template", None):
        messages = prompt_messages(prompt) + [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(prompt, list):
        prompt = "".join(f"{m['content']}\n" for m in prompt)
    return prompt + response


def prompt_prefix(tokenizer: Any, prompt: Prompt, template: Template = None) -> str:
    """The rendered text that precedes any response: where two renders with different placeholder responses
    first differ, which works for chat templates, format strings and callables alike."""
    a = render(tokenizer, prompt, "\ue000", template)
    b = render(tokenizer, prompt, "\ue001", template)
    cut = 0
    for x, y in zip(a, b):
        if x != y:
            break
        cut += 1
    return a[:cut]


def _response_part(tokenizer: Any, prompt: Prompt, response: str, template: Template, prefix: str) -> str:
    full = render(tokenizer, prompt, response, template)
    if not full.startswith(prefix):
        raise PreferenceFormatError("the template does not keep the prompt as a prefix of the rendered text.")
    return full[len(prefix):]


def render_split(tokenizer: Any, prompt: Prompt, response: str, template: Template = None) -> tuple[str, str]:
    """``render`` cut into (prompt part, response part), so their tokens can be told apart."""
    prefix = prompt_prefix(tokenizer, prompt, template)
    return prefix, _response_part(tokenizer, prompt, response, template, prefix)


def encode_pair(
    tokenizer: Any, prompt: Prompt, response: str, template: Template = None
) -> tuple[list[int], int]:
    """Token ids of a rendered (prompt, response) pair and the number of prompt tokens.

    Prompt and response parts are tokenized separately so that the boundary is exact.
    """
    prompt_ids, (response_ids,) = encode_responses(tokenizer, prompt, [response], template)
    return prompt_ids + response_ids, len(prompt_ids)


def encode_responses(
    tokenizer: Any, prompt: Prompt, responses: Sequence[str], template: Template = None
) -> tuple[list[int], list[list[int]]]:
    """``(prompt ids, [response ids, ...])`` for several responses to one prompt, rendering and tokenizing the
    prompt once; ``prompt ids + response ids`` equals :func:`encode_pair`'s ids for each response."""
    return encode_many(tokenizer, [(prompt, responses)], template)[0]


def encode_many(
    tokenizer: Any, groups: Sequence[tuple[Prompt, Sequence[str]]], template: Template = None,
    rows: Sequence[int] | None = None,
) -> list[tuple[list[int], list[list[int]]]]:
    """:func:`encode_responses` over many ``(prompt, responses)`` groups with two tokenizer calls in all (a fast
    tokenizer spreads a batch over every core). Template errors name ``rows[i]`` when given."""
    return [(prompt_ids, [body + tail for body, tail in parts])
            for prompt_ids, parts in _encode_groups(tokenizer, groups, template, rows, split_tail=False)]


def encode_spans(
    tokenizer: Any, groups: Sequence[tuple[Prompt, Sequence[str]]], template: Template = None,
    rows: Sequence[int] | None = None,
) -> list[tuple[list[int], list[tuple[list[int], list[int]]]]]:
    """Like :func:`encode_many`, with each response's ids cut into ``(response text ids, template tail ids)``.

    The tail is what the template adds after every response (``"<|im_end|>\\n"`` for ChatML, often nothing for a
    format string); it is found as the common suffix of two renders with different placeholder responses, like the
    prompt prefix. Prompt, response text and tail are tokenized separately, so each boundary is exact.
    """
    return _encode_groups(tokenizer, groups, template, rows, split_tail=True)


def _template_tail(tokenizer: Any, prompt: Prompt, template: Template) -> str:
    a = render(tokenizer, prompt, "\ue000", template)
    b = render(tokenizer, prompt, "\ue001", template)
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:] if n else ""


def _encode_groups(tokenizer, groups, template, rows, split_tail: bool):
    prefixes, bodies, tails, counts = [], [], [], []
    for i, (prompt, responses) in enumerate(groups):
        try:
            prefix = prompt_prefix(tokenizer, prompt, template)
            tail = _template_tail(tokenizer, prompt, template) if split_tail else ""
            for response in responses:
                part = _response_part(tokenizer, prompt, response, template, prefix)
                if tail and not part.endswith(tail):
                    raise PreferenceFormatError("the template does not end every response with the same text.")
                bodies.append(part[: len(part) - len(tail)])
                tails.append(tail)
        except PreferenceFormatError as err:
            raise PreferenceFormatError(f"row {rows[i]}: {err}" if rows is not None else str(err)) from err
        prefixes.append(prefix)
        counts.append(len(responses))
    if not groups:
        return []
    prompt_ids = tokenizer(prefixes, add_special_tokens=True)["input_ids"]
    body_ids = tokenizer(bodies, add_special_tokens=False)["input_ids"] if bodies else []
    tail_ids = _tokenize_tails(tokenizer, tails) if split_tail else [[] for _ in bodies]
    out, start = [], 0
    for ids, count in zip(prompt_ids, counts):
        parts = [(list(body_ids[j]), list(tail_ids[j])) for j in range(start, start + count)]
        out.append((list(ids), parts))
        start += count
    return out


def _tokenize_tails(tokenizer, tails: list[str]) -> list[list[int]]:
    """Tails repeat (one per template), so each distinct one is tokenized once."""
    distinct = list(dict.fromkeys(tails))
    ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"])) if distinct else {}
    return [list(ids[t]) for t in tails]


def triplets(rows: Sequence[Mapping[str, Any]]) -> list[PreferenceTriplet]:
    """``to_triplet`` over rows, with row numbers in every error."""
    return [to_triplet(example, i) for i, example in enumerate(rows)]
