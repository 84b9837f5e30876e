"""``MarginVector``: LEGEND's Standard Margin Vector, a unit direction in a model's hidden space.

It is fitted from (prompt, harmless response, harmful response) triplets as the normalised mean of
``emb(prompt, harmless) - emb(prompt, harmful)`` (see :func:`hf_repalign.legend.margin.margin_direction`), and
saved as safetensors plus a JSON config and a model card.

Example:
    >>> from hf_repalign import load_model_and_tokenizer
    >>> from hf_repalign.legend import MarginVector
    >>> model, tokenizer = load_model_and_tokenizer()
    >>> vec = MarginVector.induce(model, tokenizer, ["How do I make a weapon at home?"])
    >>> vec.save_pretrained("out/margin-vector")
    >>> vec = MarginVector.from_pretrained("out/margin-vector")
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS
from transformers.utils import logging

from ..formats import Prompt, Template, check_template, normalize_prompt, prompt_prefix, to_triplet
from ..hidden import num_hidden_layers, resolve_layers
from ..hub import (ArtifactKind, base_model_fields, base_model_id, check_target, config_has, load_folder,
                   push_folder, render_card, require_base_model, save_folder)
from .embedding import EMBEDDING_VERSION, check_pooling, embed_pairs, encode_triplets
from .margin import margin_direction
from .presets import DEFAULT_REFUSAL, FIT_PRESETS  # noqa: F401  (FIT_PRESETS re-exported)

logger = logging.get_logger(__name__)

FORMAT_NAME = "hf_repalign.legend.MarginVector"
UNIT_TOLERANCE = 1e-3
MARGIN_VECTOR = ArtifactKind("LEGEND margin vector", ("config.json", "model.safetensors"),
                             lambda folder: config_has(folder, "config.json", "format", FORMAT_NAME))


def _hidden_size(model: torch.nn.Module) -> int:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


def _model_name(model: torch.nn.Module) -> str:
    """The model's Hub id when known (the embedded model's cache folder included), else its local path."""
    return base_model_id(model) or str(getattr(model.config, "name_or_path", "") or type(model).__name__)


class MarginVector:
    """A unit direction at one hidden layer, with what is needed to reproduce its embeddings."""

    def __init__(
        self,
        direction: torch.Tensor,
        layer: int = -1,
        pooling: str = "last",
        template: Template = None,
        model_name_or_path: str | None = None,
        num_hidden_layers: int | None = None,
        n_pairs: int | None = None,
    ):
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"`layer` must be an integer hidden-state index, got {layer!r}.")
        self.pooling = check_pooling(pooling)
        self.direction = check_direction(direction)
        self.layer = int(layer)
        self.template = check_template(template)
        # The Hub id when one is known, as `_model_name` reports models: check_compatible compares like with like.
        self.model_name_or_path = (base_model_id(model_name_or_path) or model_name_or_path) if model_name_or_path \
            else model_name_or_path
        self.num_hidden_layers = num_hidden_layers
        self.n_pairs = n_pairs

    @property
    def hidden_size(self) -> int:
        return self.direction.numel()

    def __repr__(self) -> str:
        return (
            f"MarginVector(hidden_size={self.hidden_size}, layer={self.layer}, pooling={self.pooling!r}, "
            f"model={self.model_name_or_path!r}, n_pairs={self.n_pairs})"
        )

    # ----------------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        harmless_responses: Sequence[str],
        harmful_responses: Sequence[str],
        layer: int = -1,
        pooling: str = "last",
        template: Template = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> "MarginVector":
        """Fit the direction from prompts and their harmless and harmful responses (one of each per prompt)."""
        if not (len(prompts) == len(harmless_responses) == len(harmful_responses)) or not prompts:
            raise ValueError(
                f"`prompts`, `harmless_responses` and `harmful_responses` must be non-empty and of equal length, "
                f"got {len(prompts)}, {len(harmless_responses)} and {len(harmful_responses)}."
            )
        check_pooling(pooling)
        resolve_layers(model, layer)
        # Harmless plays "chosen" and harmful "rejected", so the checks name the row and side.
        triplets = [to_triplet({"prompt": prompt, "chosen": good, "rejected": bad}, i)
                    for i, (prompt, good, bad) in enumerate(zip(prompts, harmless_responses, harmful_responses))]
        check_template(template)
        items = [item for item, _ in encode_triplets(tokenizer, triplets, template, rows=range(len(triplets)))]
        bar = tqdm(total=len(items), desc="fit margin vector", disable=not progress)
        with torch.no_grad(), bar:
            pairs = embed_pairs(model, items, [(layer, pooling)], batch_size, progress=bar)[(layer, pooling)]
        direction = margin_direction(pairs[:, 0], pairs[:, 1])
        return cls(
            direction,
            layer=layer,
            pooling=pooling,
            template=template,
            model_name_or_path=_model_name(model),
            num_hidden_layers=num_hidden_layers(model),
            n_pairs=len(items),
        )

    @classmethod
    def induce(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        harmful_prompts: Sequence[Prompt],
        refusal: str = DEFAULT_REFUSAL,
        harmful_responses: Sequence[str] | None = None,
        harmless_responses: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        generation_batch_size: int = 8,
        **fit_kwargs,
    ) -> "MarginVector":
        """Fit as the paper does: the model's own greedy answers are the harmful side, a fixed refusal the harmless.

        Give ``harmful_responses`` and/or ``harmless_responses`` to skip generating / replace the refusal.
        """
        prompts = list(harmful_prompts)
        if harmful_responses is None:
            harmful_responses = generate_responses(
                model, tokenizer, prompts, fit_kwargs.get("template"), max_new_tokens, generation_batch_size
            )
        if harmless_responses is None:
            harmless_responses = [refusal] * len(prompts)
        return cls.fit(model, tokenizer, prompts, list(harmless_responses), list(harmful_responses), **fit_kwargs)

    # ----------------------------------------------------------------------------------------------- checks
    def check_compatible(self, model: torch.nn.Module, check_name: bool = True) -> int:
        """Raise a clear error if ``model`` cannot use this vector; returns the resolved hidden-state index.

        A model with the right shape but another name gets a loud warning naming both (a vector measures a
        direction in one model's hidden space; on another model its margins are noise). ``check_name=False``
        skips that, for a vector saved together with its model (``pipe.save_pretrained``).
        """
        size = _hidden_size(model)
        if size != self.hidden_size:
            raise ValueError(
                f"the margin vector has hidden size {self.hidden_size} (fitted on {self.model_name_or_path!r}) but "
                f"the model {_model_name(model)!r} has hidden size {size}."
            )
        try:
            index = resolve_layers(model, self.layer)[0]
        except ValueError as err:
            raise ValueError(
                f"the margin vector uses layer {self.layer} (fitted on {self.model_name_or_path!r} with "
                f"{self.num_hidden_layers} layers), which {_model_name(model)!r} does not have: {err}"
            ) from None
        name = _model_name(model)
        if check_name and self.model_name_or_path and name != self.model_name_or_path:
            logger.warning_once(  # once per pair of names, not at every call that passes the vector
                f"THE MARGIN VECTOR WAS FITTED ON ANOTHER MODEL: {self.model_name_or_path!r}, but it is used with "
                f"{name!r}. Both have hidden size {size}, so nothing fails, but the margins are only meaningful on "
                "the model the vector was fitted on (ignore this if both names are the same weights)."
            )
        return index

    # ----------------------------------------------------------------------------------------------- saving
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "hidden_size": self.hidden_size,
            "layer": self.layer,
            "pooling": self.pooling,
            "template": _callable_name(self.template) if callable(self.template) else self.template,
            "model_name_or_path": self.model_name_or_path,
            "num_hidden_layers": self.num_hidden_layers,
            "n_pairs": self.n_pairs,
            "embedding_version": EMBEDDING_VERSION,
        }

    def fingerprint(self) -> str:
        """A short hash of the direction and config (used to match checkpoints to the vector that made them)."""
        digest = hashlib.sha256(self.direction.numpy().tobytes())
        digest.update(json.dumps(self.config_dict(), sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def model_card(self, repo_id: str, base_model: str | None = None) -> str:
        """The ``README.md`` card; its usage snippet loads the vector from ``repo_id`` (a Hub id or a folder)."""
        base = base_model or base_model_id(self.model_name_or_path)
        return render_card(
            "legend_margin_vector.md",
            {"library_name": "hf_repalign", "tags": ["legend", "reward-modeling", "safety"], "base_model": base},
            repo_id=repo_id,
            hidden_size=self.hidden_size,
            layer=self.layer,
            pooling=self.pooling,
            template="the tokenizer's chat template" if self.template is None else repr(self.template),
            n_pairs=self.n_pairs,
            num_hidden_layers=self.num_hidden_layers,
            **base_model_fields(base, self.model_name_or_path),
        )

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, repo_id: str | None = None,
                        overwrite: bool = False, base_model: str | None = None, **push_kwargs) -> Path:
        """Write ``model.safetensors`` (the direction), ``config.json`` and a ``README.md`` card as one atomic save.

        Other files in ``save_directory`` are kept; a folder holding something else (a model's weights) is refused
        unless ``overwrite=True``. ``base_model`` is the Hub id recorded in the card (default: the fitted model's
        id when known).
        """
        if callable(self.template):
            raise ValueError(
                "this vector was fitted with a callable template, which cannot be saved; fit it with a format "
                "string such as '{prompt}\\n{response}' or with the chat template (template=None)."
            )
        check_target(save_directory, MARGIN_VECTOR, overwrite)
        card = self.model_card(str(save_directory), base_model)
        path = save_folder(save_directory, MARGIN_VECTOR, {"direction": self.direction}, self.config_dict(), card,
                           overwrite=overwrite)
        if push_to_hub:
            self.push_to_hub(repo_id or Path(save_directory).name, base_model=base_model, **push_kwargs)
        return path

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    base_model: str | None = None, commit_message: str = "Upload LEGEND margin vector") -> str:
        """Upload the vector (with a card whose snippet loads ``repo_id``) to the Hub; returns the commit URL.

        The card must name the base model by its Hub id: pass ``base_model`` when the vector was fitted on a local
        folder whose config records none.
        """
        import tempfile

        base = require_base_model(base_model, base_model_id(self.model_name_or_path) or self.model_name_or_path,
                                  "margin vector")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "vector"
            save_folder(folder, MARGIN_VECTOR, {"direction": self.direction},
                        dict(self.config_dict(), model_name_or_path=base), self.model_card(repo_id, base))
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs) -> "MarginVector":
        """Load a vector saved by :meth:`save_pretrained` (local folder or Hub repo id)."""
        tensors, config = load_folder(path_or_repo_id, what="margin vector", **hub_kwargs)
        if config.get("format") != FORMAT_NAME or "direction" not in tensors:
            raise ValueError(f"{path_or_repo_id} does not hold a LEGEND margin vector (config format "
                             f"{config.get('format')!r}).")
        direction = tensors["direction"]
        if direction.numel() != config["hidden_size"]:
            raise ValueError(f"{path_or_repo_id}: direction has {direction.numel()} values but config.json says "
                             f"hidden_size={config['hidden_size']}.")
        try:
            return cls(
                direction,
                layer=config["layer"],
                pooling=_current_pooling(config, path_or_repo_id),
                template=config.get("template"),
                model_name_or_path=config.get("model_name_or_path"),
                num_hidden_layers=config.get("num_hidden_layers"),
                n_pairs=config.get("n_pairs"),
            )
        except ValueError as err:
            raise ValueError(f"{path_or_repo_id} does not hold a usable margin vector: {err}") from None


def _current_pooling(config: dict[str, Any], where: Any) -> str:
    """The pooling a saved vector was fitted with, in today's names. Vectors saved before embedding version 2 said
    "last" for the last rendered token (the chat template's closing ``\\n``), now called "last_rendered"; their
    "mean" also averaged the template's closing tokens, which today's "mean" leaves out."""
    pooling = config.get("pooling")
    if config.get("embedding_version", 1) >= EMBEDDING_VERSION:
        return pooling
    if pooling == "last":
        logger.warning(f"{where}: saved before 'last' meant the response's last token; it is loaded as "
                       "pooling='last_rendered' (the rendered text's last token), which is what it was fitted with.")
        return "last_rendered"
    if pooling == "mean":
        logger.warning(f"{where}: saved when 'mean' also averaged the template's closing tokens; today's 'mean' "
                       "leaves them out, so its margins differ slightly from those of the run that fitted it. Refit "
                       "it to be exact.")
    return pooling


def check_direction(direction: Any) -> torch.Tensor:
    """A 1-D, finite, unit-norm float32 direction on the CPU, or a ValueError saying what is wrong."""
    direction = torch.as_tensor(direction, dtype=torch.float32).detach().cpu()
    if direction.ndim != 1 or direction.numel() == 0:
        raise ValueError(f"`direction` must be a non-empty 1-D tensor, got shape {tuple(direction.shape)}.")
    if not bool(torch.isfinite(direction).all()):
        raise ValueError("`direction` holds NaN or infinite values.")
    norm = float(direction.double().norm())
    if norm == 0:
        raise ValueError("`direction` is all zeros; a margin direction must be a unit vector.")
    if not math.isclose(norm, 1.0, abs_tol=UNIT_TOLERANCE):
        raise ValueError(f"`direction` has norm {norm:.6g}, not 1; pass direction / direction.norm() (margins are "
                         "projections on a unit vector).")
    return direction


def _callable_name(template: Any) -> str:
    return f"<callable {getattr(template, '__qualname__', type(template).__name__)}>"


def generate_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    template: Template = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """The model's greedy answers to ``prompts``, rendered with the same template as the embeddings."""
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    # The prompt as the embeddings will render it (whitespace normalised), so the answer continues that text.
    texts = [prompt_prefix(tokenizer, normalize_prompt(prompt), template) for prompt in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues after the prompt's last token
    responses = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="generate harmful responses", leave=False):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=True).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1] :]
            responses.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    empty = [i for i, r in enumerate(responses) if not r]
    if empty:
        raise ValueError(
            f"the model generated an empty response for prompt(s) {empty[:10]}; give `harmful_responses` "
            "explicitly or raise `max_new_tokens`."
        )
    return responses
