"""``MarginVector``: LEGEND's Standard Margin Vector, a unit direction in a model's hidden space.

It is fitted from a contrast, responses with more of an attribute against responses with less (safety by
default: harmless against harmful), as the normalised difference of their mean embeddings (see
:func:`hf_repalign.legend.margin.margin_direction`), optionally with the response-length direction projected out,
and saved as safetensors plus a JSON config and a model card that name the attribute, the contrast data and the
length control.

Example:
    >>> from hf_repalign import load_model_and_tokenizer
    >>> from hf_repalign.legend import MarginVector
    >>> model, tokenizer = load_model_and_tokenizer()
    >>> vec = MarginVector.induce(model, tokenizer, ["How do I make a weapon at home?"])
    >>> vec.save_pretrained("out/margin-vector")
    >>> vec = MarginVector.from_pretrained("out/margin-vector")
    >>> helpful = MarginVector.fit(model, tokenizer, data="helpfulness_pairs.jsonl", attribute="helpfulness",
    ...                            length_control=True)  # chosen/rejected rows, or prompt/completion/label rows
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

from ..formats import PreferenceTriplet, Prompt, Template, check_template, normalize_prompt, prompt_prefix
from ..hidden import num_hidden_layers, resolve_layers
from ..artifacts import ArtifactKind, check_target, config_has, save_folder
from ..cards import base_model_fields, render_card
from ..hub import base_model_id, load_folder, push_folder, require_base_model
from .embedding import (EMBEDDING_VERSION, check_causal, check_pooling, embed_pairs, encode_triplets,
                        response_length)
from .margin import length_direction, margin_direction, remove_direction
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
        attribute: str = "safety",
        length_control: bool = False,
        contrast: dict[str, Any] | None = None,
        model_probe: Sequence[float] | None = None,
        evaluation: dict[str, Any] | None = None,
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
        if not isinstance(attribute, str) or not attribute.strip() or len(attribute) > 100:
            raise ValueError(f"`attribute` must be a short non-empty name such as 'safety', got {attribute!r}.")
        self.attribute = attribute.strip()
        self.length_control = bool(length_control)
        self.contrast = dict(contrast) if contrast else None
        self.model_probe = _check_probe(model_probe)
        self.evaluation = dict(evaluation) if evaluation else None  # e.g. a measured agreement table, for the card

    @property
    def hidden_size(self) -> int:
        return self.direction.numel()

    def __repr__(self) -> str:
        return (
            f"MarginVector(attribute={self.attribute!r}, hidden_size={self.hidden_size}, layer={self.layer}, "
            f"pooling={self.pooling!r}, length_control={self.length_control}, model={self.model_name_or_path!r}, "
            f"n_pairs={self.n_pairs})"
        )

    # ----------------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: Sequence[Prompt] | None = None,
        positive_responses: Sequence[str] | None = None,
        negative_responses: Sequence[str] | None = None,
        *,
        data: Any = None,
        data_split: str = "train",
        attribute: str = "safety",
        length_control: bool = False,
        layer: int = -1,
        pooling: str = "last",
        template: Template = None,
        batch_size: int = 8,
        progress: bool = False,
        harmless_responses: Sequence[str] | None = None,
        harmful_responses: Sequence[str] | None = None,
    ) -> "MarginVector":
        """Fit the direction from a contrast: responses with more of ``attribute`` against responses with less.

        Either three lists (``prompts`` with one positive and one negative response each; for safety
        ``harmless_responses`` / ``harmful_responses`` are the same two lists by their old names), or ``data``: pairs
        (``chosen`` positive, ``rejected`` negative) or two sets (``prompt``/``completion``/``label``) as a
        ``datasets.Dataset``, a list of dicts, a .jsonl/.json/.csv/.parquet file or a Hub dataset id (``data_split``).
        ``length_control=True`` projects the response-length direction, estimated from the same embeddings (each
        side centred on its own mean), out of the direction.
        """
        from .contrast import contrast_from_lists, read_contrast

        positive = _one_of(positive_responses, harmless_responses, "positive_responses", "harmless_responses")
        negative = _one_of(negative_responses, harmful_responses, "negative_responses", "harmful_responses")
        if data is not None:
            if prompts is not None or positive is not None or negative is not None:
                raise ValueError("give either `data` or `prompts` with the positive and negative responses, not both.")
            contrast = read_contrast(data, data_split)
        elif prompts is None or positive is None or negative is None:
            raise ValueError("give `data` (pairs or two labelled sets) or `prompts`, `positive_responses` and "
                             "`negative_responses`.")
        else:
            contrast = contrast_from_lists(list(prompts), list(positive), list(negative))
        check_causal(model)
        check_pooling(pooling)
        resolve_layers(model, layer)
        check_template(template)
        if contrast.kind == "pairs":
            triplets = [PreferenceTriplet(p, good, bad) for (p, good), (_, bad) in zip(contrast.positive,
                                                                                        contrast.negative)]
        else:  # each response alone; both sides of its item are the same sequence, embedded once
            triplets = [PreferenceTriplet(p, r, r) for p, r in contrast.positive + contrast.negative]
        items = [item for item, _ in encode_triplets(tokenizer, triplets, template, rows=range(len(triplets)))]
        bar = tqdm(total=len(items), desc=f"fit {attribute} vector", disable=not progress)
        with torch.no_grad(), bar:
            pairs = embed_pairs(model, items, [(layer, pooling)], batch_size, progress=bar)[(layer, pooling)]
        if contrast.kind == "pairs":
            groups = [pairs[:, 0], pairs[:, 1]]
            lengths = [[response_length(it, side) for it in items] for side in ("chosen", "rejected")]
        else:
            n = len(contrast.positive)
            groups = [pairs[:n, 0], pairs[n:, 0]]
            lengths = [[response_length(it, "chosen") for it in part] for part in (items[:n], items[n:])]
        direction = margin_direction(*groups)
        if length_control:
            direction = remove_direction(direction, length_direction(groups, lengths))
        return cls(
            direction,
            layer=layer,
            pooling=pooling,
            template=template,
            model_name_or_path=_model_name(model),
            num_hidden_layers=num_hidden_layers(model),
            n_pairs=len(items) if contrast.kind == "pairs" else None,
            attribute=attribute,
            length_control=length_control,
            contrast=contrast.describe(),
            model_probe=model_probe(model),
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

        Give ``harmful_responses`` and/or ``harmless_responses`` to skip generating / replace the refusal. The other
        arguments of :meth:`fit` pass through (``attribute``, ``length_control``, ``layer``, ``pooling``, ...).
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

        A model with the right shape but other weights gets a loud warning naming both (a vector measures a
        direction in one model's hidden space; on another model its margins are noise). The weights are compared
        by a probe recorded at fitting (the norms of the first token embeddings, which any dtype of the same
        weights reproduces); a vector without one falls back to the model's name (``check_name=False`` skips
        that, for a vector saved together with its model by ``pipe.save_pretrained``).
        """
        check_causal(model)
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
        if self.model_probe is not None:
            other = not _same_probe(self.model_probe, model_probe(model))
        else:
            other = check_name and bool(self.model_name_or_path) and name != self.model_name_or_path
        if other:
            logger.warning_once(  # once per pair of names, not at every call that passes the vector
                f"THE MARGIN VECTOR WAS FITTED ON ANOTHER MODEL: {self.model_name_or_path!r}, but it is used with "
                f"{name!r}{' (other weights)' if name == self.model_name_or_path else ''}. Both have hidden size "
                f"{size}, so nothing fails, but the margins are only meaningful on the model the vector was fitted "
                "on."
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
            "attribute": self.attribute,
            "length_control": self.length_control,
            "contrast": self.contrast,
            "model_probe": self.model_probe,
            "evaluation": self.evaluation,
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
            {"library_name": "hf_repalign", "tags": ["legend", "reward-modeling", self.attribute],
             "base_model": base},
            repo_id=repo_id,
            hidden_size=self.hidden_size,
            layer=self.layer,
            pooling=self.pooling,
            template="the tokenizer's chat template" if self.template is None else repr(self.template),
            n_pairs=self.n_pairs,
            num_hidden_layers=self.num_hidden_layers,
            attribute=self.attribute,
            length_control=self.length_control,
            contrast=self.contrast,
            evaluation=self.evaluation,
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
                attribute=config.get("attribute", "safety"),
                length_control=config.get("length_control", False) is True,
                contrast=config.get("contrast") if isinstance(config.get("contrast"), dict) else None,
                model_probe=config.get("model_probe"),
                evaluation=config.get("evaluation") if isinstance(config.get("evaluation"), dict) else None,
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


PROBE_ROWS = 32
PROBE_RTOL = 0.02  # bfloat16 / float16 copies of the same weights agree to a few 0.1%; other weights differ wholesale


def model_probe(model: torch.nn.Module) -> list[float]:
    """A fingerprint of the weights that survives a dtype change: the norms of the first token embeddings."""
    weight = model.get_input_embeddings().weight
    return [round(float(v), 5) for v in weight[:PROBE_ROWS].detach().double().norm(dim=1).cpu()]


def _same_probe(saved: Sequence[float], current: Sequence[float]) -> bool:
    return len(saved) == len(current) and all(math.isclose(a, b, rel_tol=PROBE_RTOL, abs_tol=1e-6)
                                              for a, b in zip(saved, current))


def _check_probe(probe: Any) -> list[float] | None:
    """A saved probe is data: anything but a short list of finite numbers is ignored (the name check applies)."""
    if not isinstance(probe, (list, tuple)) or not 0 < len(probe) <= PROBE_ROWS:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in probe):
        return None
    return [float(v) for v in probe]


def _one_of(value: Any, alias: Any, name: str, alias_name: str) -> Any:
    if value is not None and alias is not None:
        raise ValueError(f"give `{name}` or `{alias_name}` (the same argument under its safety name), not both.")
    return value if value is not None else alias


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
