"""What ``SCITTrainer`` and ``RAHFTrainer`` share: metrics logged with one device sync, gradient accumulation
that weighs every loss item (an example, a valid layer-position) equally, however the micro-batches split them, and
a run that stops at the first non-finite loss (``FiniteLossMixin``) and checkpoints renamed into place once
complete (``AtomicCheckpointMixin``); Dual's SFT trainer uses these two as well.

Under gradient accumulation the Trainer counts the items of all micro-batches of one optimizer step (and, with
``average_tokens_across_devices``, of all processes) and passes that count to ``compute_loss`` as
``num_items_in_batch``; each micro-batch's loss is then its *sum* divided by that global count, so the step's
gradient equals the one of the whole batch at once. Without a count (evaluation, older transformers) the loss is the
micro-batch mean and the Trainer divides it by the accumulation steps.

Saving: the final model is written with ``artifacts.atomic_folder`` (other files in the folder are kept, the training
arguments as JSON instead of a pickle), and each checkpoint is built under a hidden name and renamed into place once
complete, so ``resume_from_checkpoint=True`` never picks a checkpoint cut short by a kill; ``save_model`` and
``push_to_hub`` keep ``Trainer``'s signatures and upload one finished artifact once (``HubMixin``).

Example:
    >>> class MyTrainer(RAHFTrainerMixin, Trainer):
    ...     def _count_items(self, batch): return batch["mask"].sum()
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from transformers.utils import logging

from ..hub import push_folder

logger = logging.get_logger(__name__)


def targets_embeddings(peft_config) -> bool:
    """Whether a LoRA config targets the embeddings, i.e. peft's ``save_embedding_layers``. RAHF never resizes the
    vocabulary, so this answers peft's "auto" check, which would look the base config up on the Hub at every save."""
    targets = peft_config.target_modules or []
    targets = [targets] if isinstance(targets, str) else targets
    return any(t in ("embed_tokens", "lm_head") for t in targets)


class FiniteLossMixin:
    """Mix into a ``Trainer`` subclass: a NaN or infinite training loss stops the run with an error naming the step.

    transformers' ``logging_nan_inf_filter`` would log such a step as the running mean and train on; the error is
    raised before the optimizer step, so the weights (and any later checkpoint) stay those of the last finite step.
    One device sync per micro-batch; under DDP the flag is reduced so every process stops together.
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).float()
        if self.args.world_size > 1:
            finite = self.accelerator.reduce(finite, reduction="min")
        if not bool(finite):
            raise FloatingPointError(
                f"{type(self).__name__}: the training loss is {loss.item()} at step {self.state.global_step + 1} "
                f"(epoch {self.state.epoch or 0:.2f}); stopping before the weights take a non-finite update. "
                "Lower learning_rate (or alpha), or train without bf16/fp16 to find the overflow.")
        return loss


class AtomicCheckpointMixin:
    """Mix into a ``Trainer`` subclass: each ``checkpoint-N`` is built under ``.checkpoint-N.partial`` and renamed
    into place once complete, so ``resume_from_checkpoint=True`` (the highest ``checkpoint-N``) never picks one cut
    short by a kill; staging folders of killed runs are removed at the next save."""

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        # One name on every process (each rank writes its optimizer shards into it); not matched by `checkpoint-*`.
        staging = run_dir / f".{name}.partial"
        if self.args.should_save:
            for leftover in run_dir.glob(f".{PREFIX_CHECKPOINT_DIR}-*.partial"):  # of killed runs
                shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # Trainer writes staging/checkpoint-N
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            final = run_dir / name
            if final.exists():  # the same step saved again (a resumed run): ours to replace
                final.rename(staging / f"{name}.old")
            (staging / name).rename(final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


class HubMixin:
    """Mix into a ``Trainer`` subclass: ``save_model`` / ``push_to_hub`` with ``Trainer``'s signatures, and one upload.

    Trainer's own Hub code creates the repo when the trainer is built and uploads ``output_dir`` at every save
    (checkpoint staging folders and ``training_args.bin`` included). Here nothing reaches the Hub before
    ``push_to_hub``, which uploads the finished artifact alone (weights, config, tokenizer, card; no pickle), once.
    With ``args.push_to_hub``, ``save_model()`` pushes after saving, as ``Trainer.save_model`` does.
    Subclasses write that artifact in ``_push_folder(folder, repo_id, **kwargs)``.
    """

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No repo is created before the one upload of ``push_to_hub``."""
        self.hub_model_id = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints stay local (resume_from_checkpoint reads them)."""

    def _save_final(self, output_dir: str) -> None:
        super().save_model(output_dir, _internal_call=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the trained model to ``output_dir`` (default ``args.output_dir``), then push it when
        ``args.push_to_hub`` is set and this is not a checkpoint."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        self._save_final(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save")

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **kwargs) -> str | None:
        """Upload the trained model to ``args.hub_model_id`` (else the name of ``output_dir``) in one commit;
        ``repo_id=`` names another repo. Returns the commit URL (``None`` on processes other than the main one).

        Only the artifact is uploaded: nothing else of ``output_dir``. ``blocking`` is accepted for ``Trainer``'s
        signature; the upload always completes before this returns. Offline (``HF_HUB_OFFLINE=1``) this fails at
        once.
        """
        import tempfile

        revision = revision or self.args.hub_revision
        if revision not in (None, "main"):
            raise ValueError(f"push_to_hub uploads to the main branch; revision={revision!r} is not supported.")
        repo_id = kwargs.pop("repo_id", None) or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        accepted = inspect.signature(self._push_folder).parameters
        ignored = sorted(k for k in kwargs if k not in accepted)
        if ignored:  # Trainer passes these to its generic model card; ours is written from the run itself
            logger.warning(f"push_to_hub: ignoring {', '.join(ignored)} (the model card is written from the run).")
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        with tempfile.TemporaryDirectory() as tmp:
            self._push_folder(Path(tmp), repo_id, **kwargs)  # on every process: a ZeRO-3 gather is collective
            if not self.args.should_save:
                return None
            return push_folder(tmp, repo_id, private=self.args.hub_private_repo if private is None else private,
                               token=token if token is not None else self.args.hub_token,
                               commit_message=commit_message or "End of training")


class RAHFTrainerMixin(FiniteLossMixin, AtomicCheckpointMixin, HubMixin):
    """Mix into a ``Trainer`` subclass (before ``Trainer``); call ``_setup_mixin()`` after ``Trainer.__init__``."""

    def _setup_mixin(self) -> None:
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        # Tells the Trainer that compute_loss normalises by num_items_in_batch when it gets one (see module doc).
        self.model_accepts_loss_kwargs = True

    def _count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The number of loss items in one micro-batch."""
        raise NotImplementedError

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples:
            return None
        count = sum(self._count_items(batch) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def _items_divisor(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | int | None:
        """What this process divides its loss sum by: the global count over the processes that DDP averages."""
        if num_items_in_batch is None:
            return None
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return num_items_in_batch / self.accelerator.num_processes
        return num_items_in_batch

    def _record(self, model: torch.nn.Module, **values: torch.Tensor) -> None:
        """Keep detached scalars; they are averaged and synced once, in ``log``."""
        metrics = self._metrics["train" if model.training else "eval"]
        for name, value in values.items():
            metrics[name].append(value.detach())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        names = [name for name, values in self._metrics[mode].items() if values]
        if names:
            means = torch.stack([torch.stack(self._metrics[mode][n]).float().mean() for n in names]).tolist()
            logs.update({f"{prefix}{name}": value for name, value in zip(names, means)})
        self._metrics[mode].clear()
        super().log(logs, start_time)


def save_training_args(args, folder: str | os.PathLike) -> None:
    """The training arguments as ``training_args.json`` (instead of Trainer's pickled ``training_args.bin``)."""
    folder = Path(folder)
    (folder / "training_args.bin").unlink(missing_ok=True)
    (folder / "training_args.json").write_text(args.to_json_string())
