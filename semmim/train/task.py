"""The task interface (what the loop trains) and the pre-training task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semmim.data import Collator, DataSource, open_data
from semmim.diagnostics import STEP_COLUMNS, coverage_overlap, objective_grad_norms
from semmim.eval import Evaluation, evaluate, format_table
from semmim.run_config import TrainConfig

OBJECTIVES = ("itc", "itm", "mlm", "glob", "mim", "patch")


class Task:
    """What the loop trains: pre-training (this class) or a downstream task (subclasses in
    :mod:`semmim.downstream.tasks`). The loop itself (optimizer, schedule, accumulation, DDP,
    autocast, logs, checkpoints, exact resume) is the same for every task; a task supplies

    - ``name`` (saved in checkpoints), ``objectives`` (loss names: CSV columns, plot lines),
      ``min_batch`` (smaller micro-batches are skipped: ITM needs two pairs for a negative);
    - :meth:`open_data` (records), :meth:`build_model` (called under ``manual_seed(seed)``),
      :meth:`collate` (records → batch), :meth:`loss` (batch → total and named losses) and
      :meth:`evaluate` (the metrics at the end and of ``semmim eval``); :meth:`model_config`
      adapts the model config of a fresh run (e.g. retrieval turns the MLM / MIM losses off);
    - :meth:`on_progress` / :meth:`after_optimizer_step`: what the loop calls before and after
      each optimizer step (pre-training: the model's schedules and its EMA update);
    - :meth:`config` (plain dict saved in checkpoints, so a resume rebuilds the same task).
    """

    name = "pretrain"
    objectives: tuple[str, ...] = OBJECTIVES
    # Diagnostic columns (semmim.diagnostics); a task whose loss() takes no ``diagnostics``
    # argument sets () and the loop never asks for them.
    diagnostics: tuple[str, ...] = STEP_COLUMNS
    min_batch = 2

    def config(self) -> dict[str, Any]:
        return {}

    def open_data(self, tcfg: TrainConfig) -> DataSource:
        return open_data(tcfg.data or None, tcfg.val_size, tcfg.split_seed)

    def model_config(self, model_cfg):
        """The model config a fresh run of this task trains (pre-training: as given)."""
        return model_cfg

    def build_model(self, model_cfg, pretrained: bool = True) -> nn.Module:
        """The model; ``pretrained`` False on resume (the checkpoint's weights follow)."""
        from semmim import build_model

        return build_model(model_cfg, pretrained=pretrained)

    def collate(self, model: nn.Module, records, max_len: int):
        return Collator(model.tokenizer, max_len, records)  # with image ids

    def loss(
        self,
        forward: nn.Module,
        batch: dict[str, Any],
        device,
        seed: int,
        check_inputs: bool,
        diagnostics: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named losses); with ``diagnostics`` the dict also holds the model's
        diagnostic tensors, each objective's gradient norms on the image and text encoders and,
        when the batch has ``alpha`` (B, S, S), the mask's overlap with object coverage (names in
        :attr:`diagnostics`; :mod:`semmim.diagnostics`)."""
        images = batch["images"].to(device, non_blocking=True)
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        image_ids = batch.get("image_ids")
        if image_ids is not None:
            image_ids = image_ids.to(device, non_blocking=True)
        out = forward(
            images,
            ids,
            mask,
            seed=seed,
            check_inputs=check_inputs,
            image_ids=image_ids,
            **({"diagnostics": True} if diagnostics else {}),
        )
        if not diagnostics:
            return out.loss, out.losses
        return out.loss, {**out.losses, **step_diagnostics(forward, batch, out, device)}

    def on_progress(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called before each optimizer step with the step about to run (0-based) and the
        run's length: SemMIM's schedules (ITC α, teacher temperature, EMA momentum) follow it."""
        model.set_step(step, total_steps)

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called after each optimizer step: SemMIM's EMA teacher follows the student."""
        model.update_momentum()

    def evaluate(
        self, model: nn.Module, source: DataSource, model_cfg, tcfg: TrainConfig, device
    ) -> Evaluation:
        """Metrics of ``model`` on ``source.val`` (nothing written; see
        :func:`semmim.eval.run_evaluation`). Pre-training: retrieval R@1/5/10 (ITC, then the
        top ``tcfg.eval_rerank_k`` re-ranked by ITM) and zero-shot classification."""
        result = evaluate(
            model,
            source.val,
            image_size=model_cfg.vision.image_size,
            max_len=min(tcfg.max_text_len, model_cfg.text.max_len),
            class_names=source.class_names,
            prompt_template=source.prompt_template,
            rerank_k=tcfg.eval_rerank_k,
            batch_size=tcfg.eval_batch_size,
            num_workers=tcfg.num_workers,
            device=device,
        )
        result["split"] = source.eval_split
        return Evaluation(result, format_table(result))


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DistributedDataParallel wrappers."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


def step_diagnostics(forward: nn.Module, batch: dict[str, Any], out, device) -> dict[str, Any]:
    """The model's diagnostics of one pre-training step (``out``: its SemMIMOutput) plus each
    objective's gradient norms on the student's image and text encoders and, for a batch with
    ``alpha``, the mask's overlap with object coverage (:mod:`semmim.diagnostics`)."""
    from semmim.objectives import text_patch_scores

    model = unwrap(forward)
    diag = dict(out.diagnostics)
    towers = {"vision": model.net.vision, "text": model.net.text}
    diag.update(objective_grad_norms(out.losses, model.cfg.loss, towers))
    alpha = batch.get("alpha")
    if alpha is not None and out.mask is not None:
        images = batch["images"].to(device, non_blocking=True)
        ids = batch["input_ids"].to(device, non_blocking=True)
        am = batch["attention_mask"].to(device, non_blocking=True)
        score = text_patch_scores(model.cfg, model.ema, images, ids, am)  # (B, P)
        v = model.cfg.vision
        diag.update(
            coverage_overlap(score, out.mask, alpha.to(device), model.cfg.num_masked, v.patch_size)
        )
    return diag


def open_run_data(tcfg: TrainConfig, task: Task | None = None) -> DataSource:
    """The data a run trains and evaluates on: the task's split of ``tcfg.data``, with
    ``tcfg.validation`` training images carved into a validation split (evaluated instead of
    the held-out split) when it is > 0. Every caller that opens data for a run uses this."""
    source = (task or Task()).open_data(tcfg)
    if tcfg.validation > 0:
        source = source.carve_validation(tcfg.validation, tcfg.split_seed)
    return source
