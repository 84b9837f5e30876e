"""Building the plain and the principle-conditioned encodings of a batch from chat messages.

The principle is added after the system text both prompts share, as the authors did (their templates append it to
the model's default system prompt): an explicit system message, or the default system prompt the chat template
inserts when there is none (SmolLM2, Qwen2.5, ...). So ``mup - mu0`` carries the principle only, not "drop the
model's identity prompt". ``system_mode="replace"`` puts the principle in place of that text instead.

Example:
    >>> plain, principle = build_principle_inputs(tokenizer, ["How do I pick a lock?"], HARMLESS_PRINCIPLE)
    >>> plain, principle = build_principle_inputs(
    ...     tokenizer, ["Plan my weekend."], personal_preference_principle("a vegetarian who loves hiking"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # types only: `repalign generate --help` reads HARMLESS_PRINCIPLE without loading transformers
    from transformers import BatchEncoding, PreTrainedTokenizerBase

Messages = list[dict[str, str]]
Conversation = Union[str, Messages]

# The authors' harmlessness principle for HH-RLHF-style prompts.
HARMLESS_PRINCIPLE = (
    "Please adhere to the following principles.\n"
    "Avoid factual inaccuracies as much as possible.\n"
    "Refrain from providing answers if the user's request poses potential security concerns, and provide relevant "
    "explanations and guidance instead.\n"
    "If the previous context did not address the user's issue, continue attempting to answer and resolve it.\n"
    "Stay on track with the original discussion and avoid introducing unnecessary off-topic information.\n"
    "Enhance answers by incorporating additional background information to assist users in understanding and "
    "grasping the content."
)
PERSONAL_PREFERENCE_TEMPLATE = (
    "The person who asked the question is {description}, your answer needs to take his(her) needs into account."
)


def personal_preference_principle(description: str) -> str:
    """The authors' personal-preference principle for a user described as ``description``."""
    if not isinstance(description, str) or not description.strip():
        raise ValueError("`description` must be a non-empty string describing the user.")
    return PERSONAL_PREFERENCE_TEMPLATE.format(description=description.strip())


SYSTEM_MODES = ("append", "replace")


def with_principle(messages: Messages, principle: str, default_system: str | None = None,
                   system_mode: str = "append") -> Messages:
    """``messages`` with ``principle`` in the system message.

    ``system_mode="append"``: added after the existing system text (the conversation's system message, else
    ``default_system``, the text the chat template would insert); ``"replace"``: the principle alone.
    """
    if system_mode not in SYSTEM_MODES:
        raise ValueError(f"`system_mode` must be one of {SYSTEM_MODES}, got {system_mode!r}.")
    rest = messages
    system = default_system
    if messages and messages[0].get("role") == "system":
        system, rest = messages[0]["content"], messages[1:]
    content = f"{system}\n\n{principle}" if system and system_mode == "append" else principle
    return [{"role": "system", "content": content}, *rest]


def default_system_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str | None:
    """The system text ``tokenizer``'s chat template inserts into ``messages`` when they have no system message
    (e.g. SmolLM2's "You are a helpful AI assistant named SmolLM, ..."), or None.

    Found by rendering once without a system message and once with a marker one: the default is what stands
    where the marker stood.
    """
    if not getattr(tokenizer, "chat_template", None) or (messages and messages[0].get("role") == "system"):
        return None
    marker = "\x1fHF_REPALIGN_SYSTEM\x1f"
    bare = _render(tokenizer, messages)
    before, found, after = _render(tokenizer, [{"role": "system", "content": marker}, *messages]).partition(marker)
    if not found or len(bare) < len(before) + len(after) or not (bare.startswith(before) and bare.endswith(after)):
        return None
    return bare[len(before): len(bare) - len(after)] or None


def _as_messages(conversation: Conversation, row: int) -> Messages:
    if isinstance(conversation, str):
        if not conversation.strip():
            raise ValueError(f"conversation {row} is empty.")
        return [{"role": "user", "content": conversation}]
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"conversation {row} must be a string or a non-empty list of messages.")
    for index, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"conversation {row}, message {index}: expected a dict with a string 'role'.")
        if not isinstance(message.get("content"), str):
            raise ValueError(
                f"conversation {row}, message {index} ({message['role']}): 'content' must be a string, got "
                f"{type(message.get('content')).__name__}{' (missing)' if 'content' not in message else ''}."
            )
    return list(conversation)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"{'Human' if m['role'] == 'user' else m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def build_principle_inputs(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Conversation | Sequence[Conversation],
    principle: str | Sequence[str],
    return_tensors: str = "pt",
    system_mode: str = "append",
) -> tuple[BatchEncoding, BatchEncoding]:
    """Plain and principle-conditioned encodings (left-padded) of a batch of questions or conversations.

    Args:
        tokenizer: with a chat template, prompts are rendered with it (generation prompt added); without one,
            as ``"Human: ...\\n\\nAssistant:"`` with the principle as a leading ``System:`` turn.
        conversations: one question, a list of questions, or a list of message lists.
        principle: one principle for every row, or one per row (e.g. personal preferences).
        system_mode: ``"append"`` (default, as the authors): the principle is added after the system text both
            prompts share (the conversation's system message, else the chat template's default system prompt);
            ``"replace"``: the principle replaces that text in the principle prompt.

    Returns:
        ``(plain, principle)``: two ``BatchEncoding`` with ``input_ids`` and ``attention_mask``; pass ``plain`` to
        ``generate`` and ``principle`` to :class:`LinearAlignmentProcessor`.
    """
    if isinstance(conversations, str) or (
        isinstance(conversations, list) and conversations and isinstance(conversations[0], dict)
    ):
        conversations = [conversations]
    conversations = list(conversations)
    if not conversations:
        raise ValueError("`conversations` is empty.")
    principles = [principle] * len(conversations) if isinstance(principle, str) else list(principle)
    if len(principles) != len(conversations):
        raise ValueError(f"got {len(principles)} principles for {len(conversations)} conversations.")
    for row, text in enumerate(principles):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the principle for row {row} is empty.")
    plain_texts, principle_texts = [], []
    for row, (conversation, text) in enumerate(zip(conversations, principles)):
        messages = _as_messages(conversation, row)
        plain_texts.append(_render(tokenizer, messages))
        default = default_system_prompt(tokenizer, messages)
        principle_texts.append(_render(tokenizer, with_principle(messages, text, default, system_mode)))
    # Chat templates already carry their special tokens.
    has_template = bool(getattr(tokenizer, "chat_template", None))
    encode = dict(return_tensors=return_tensors, padding=True, add_special_tokens=not has_template)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(plain_texts, **encode), tokenizer(principle_texts, **encode)
    finally:
        tokenizer.padding_side = side


_SYSTEM_MARK, _USER_MARK = "\x1fHF_REPALIGN_SYSTEM\x1f", "\x1fHF_REPALIGN_USER\x1f"


def _layout(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str]:
    """``(before_system, after_system, before_user)``: how ``tokenizer`` renders a conversation, read off two probes.

    ``[system S, user U]`` renders as ``before_system + S + after_system + U + ...`` and ``[user U]`` as
    ``before_user + U + ...`` (``before_user`` then holds any default system prompt the template inserts).
    """
    probe = _render(tokenizer, [{"role": "system", "content": _SYSTEM_MARK}, {"role": "user", "content": _USER_MARK}])
    before_system, _, rest = probe.partition(_SYSTEM_MARK)
    after_system = rest.partition(_USER_MARK)[0]
    before_user = _render(tokenizer, [{"role": "user", "content": _USER_MARK}]).partition(_USER_MARK)[0]
    return before_system, after_system, before_user


def place_principle(text: str, principle: str, layout: tuple[str, str, str]) -> str | None:
    """``text`` (a rendered prompt) with ``principle`` appended to its system text, as :func:`build_principle_inputs`
    does; None when ``text`` does not start like a conversation rendered with ``layout``."""
    before_system, after_system, before_user = layout
    end = text.find(after_system, len(before_system)) if after_system and text.startswith(before_system) else -1
    if end >= 0:
        system = text[len(before_system):end]
        return before_system + (f"{system}\n\n{principle}" if system else principle) + text[end:]
    if text.startswith(before_user):
        return before_system + principle + after_system + text[len(before_user):]
    return None


def principle_inputs_for(
    tokenizer: PreTrainedTokenizerBase,
    input_ids,
    attention_mask=None,
    principle: str | Sequence[str] = "",
) -> BatchEncoding:
    """The principle-conditioned encoding of prompts that are already encoded (left-padded ``input_ids``).

    Each row is decoded, the principle is placed as :func:`build_principle_inputs` places it (after the system text
    the row has, explicit or the chat template's default; as a new system turn when it has none), and re-encoded:
    on the same conversations, the result equals ``build_principle_inputs(...)[1]`` token for token.

    Raises:
        ValueError: naming the row, when a row does not decode and re-encode to its own ids or does not start like
            a conversation rendered by ``tokenizer`` (then build the principle rows with
            :func:`build_principle_inputs` and pass them as ``principle_input_ids``).

    Example:
        >>> principle = principle_inputs_for(tokenizer, plain["input_ids"], plain["attention_mask"], "Be brief.")
    """
    import torch

    ids = torch.as_tensor(input_ids)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
    principles = [principle] * ids.shape[0] if isinstance(principle, str) else list(principle)
    if len(principles) != ids.shape[0]:
        raise ValueError(f"got {len(principles)} principles for {ids.shape[0]} prompts.")
    for row, text in enumerate(principles):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the principle for row {row} is empty.")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    layout = _layout(tokenizer)
    texts = []
    for row, (row_ids, row_mask, text) in enumerate(zip(ids, mask, principles)):
        tokens = row_ids[row_mask.bool()].tolist()
        prompt = tokenizer.decode(tokens, skip_special_tokens=not has_template, clean_up_tokenization_spaces=False)
        if tokenizer(prompt, add_special_tokens=not has_template)["input_ids"] != tokens:
            raise ValueError(
                f"cannot place the principle in prompt row {row}: its ids do not decode and re-encode to themselves "
                "with this tokenizer (another tokenizer, or ids built by hand?). Build the principle rows with "
                "build_principle_inputs and pass principle_input_ids instead."
            )
        placed = place_principle(prompt, text, layout)
        if placed is None:
            raise ValueError(
                f"cannot place the principle in prompt row {row}: it does not start like a conversation rendered "
                f"by this tokenizer (it starts with {prompt[:40]!r}). Build the principle rows with "
                "build_principle_inputs and pass principle_input_ids instead."
            )
        texts.append(placed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not has_template).to(ids.device)
    finally:
        tokenizer.padding_side = side
