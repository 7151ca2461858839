"""Fine-tuning tasks on the training loop: retrieval, VQA and captioning (issue 11).

Each task is a :class:`semmim.train.Task`: the loop (optimizer, schedule, accumulation, DDP, bf16
autocast, progress bar, CSV log, loss plot, atomic checkpoints, exact resume) is the
pre-training loop, unchanged. A task starts from a pre-training checkpoint (``init``; its model
config is used) or from scratch (random init, the preset's config; the log says so).

- ``retrieval``: ALBEF's fine-tuning — the SemMIM model with ITC + ITM only (MLM, global and MIM
  weights set to 0), several captions per image, ``image_ids`` from the image key so that pairs
  of one image are ITC positives of each other and never ITM negatives. Evaluation: ITC top-k,
  ITM re-rank (``--eval-rerank-k``; ALBEF 256 COCO, 128 Flickr30K), R@1/5/10 and mean recall
  both ways; with ``init`` also the zero-shot numbers of the starting checkpoint, same split.
- ``vqa``: answer classifier (:class:`semmim.downstream.models.VQAModel`), soft-score BCE;
  official VQA accuracy, the majority-answer baselines, result JSON in the submission format.
- ``caption``: :class:`semmim.downstream.models.CaptionModel`, LM loss with label smoothing,
  beam search with a KV cache, pycocoevalcap metrics.

Data specs: every task reads the pair specs of :func:`semmim.data.open_data` (``synthetic``,
``folder:``, ``json:``, ``csv:``, ``wds:``); retrieval and captioning also read
``karpathy:FILE[,IMAGE_ROOT]`` (a Karpathy-split JSON: train+restval to train, test to
evaluate); VQA reads ``synthetic[:N[:V]]`` (questions about N / V embedded scenes) and
``vqa:QUESTIONS.json,ANNOTATIONS.json[,IMAGE_DIR]`` (VQA v2 files). ``eval_data`` evaluates on
another spec (all its records; for ``karpathy:`` its test split) instead of the held-out split.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from semmim import checkpoint as ckpt
from semmim.config import SemMIMConfig
from semmim.data import (
    Collator,
    DataError,
    DataSource,
    PairDataset,
    SkipLog,
    open_data,
    split_records,
)
from semmim.eval import Evaluation
from semmim.run_config import TaskConfig
from semmim.train import Task
from semmim.transforms import EvalTransform

log = logging.getLogger("semmim.finetune")

__all__ = ["TaskConfig", "TASKS", "make_task", "RetrievalTask", "VQATask", "CaptionTask"]


def _init_state(cfg: TaskConfig) -> tuple[dict[str, Any], str] | None:
    """The pre-training checkpoint named by ``cfg.init`` (None when training from scratch)."""
    if not cfg.init:
        return None
    state, path = ckpt.open_checkpoint(cfg.init, "cpu", ckpt.EVAL_KEYS)
    if state.get("task", "pretrain") != "pretrain":
        raise ValueError(
            f"--ckpt: {path} is a {state['task']!r} fine-tuning checkpoint; start from a "
            "pre-training checkpoint (or resume the fine-tuning run with --resume)"
        )
    return state, path


def init_model_config(
    cfg: TaskConfig,
    preset_cfg: SemMIMConfig,
    model_sets: dict[str, Any] | None = None,
    preset_given: bool = False,
) -> SemMIMConfig:
    """The model config a fresh fine-tuning run uses: the init checkpoint's (a ``--preset`` given
    is then ignored, with a warning), else the preset's; model ``--set`` keys (e.g.
    ``text.dropout=0.1``) on top of either."""
    found = _init_state(cfg)
    if found is not None and preset_given:
        log.warning("--preset ignored: the model config is the --ckpt checkpoint's")
    model_cfg = SemMIMConfig.from_dict(found[0]["config"]) if found else preset_cfg
    return model_cfg.override(model_sets) if model_sets else model_cfg


# -------------------------------------------------------------------------------------- data
def _karpathy(arg: str, split: tuple[str, ...], skips: SkipLog) -> list:
    from semmim.downstream.retrieval_data import load_retrieval_split

    file, _, root = arg.partition(",")
    return load_retrieval_split(file, split, root or None, skips=skips).records()


def open_pairs(spec: str, val_size: float, seed: int, eval_spec: str = "") -> DataSource:
    """Image-caption data for retrieval / captioning (``karpathy:`` + :func:`open_data` specs)."""
    if spec.startswith("karpathy:"):
        skips = SkipLog()  # one log for both reads: an entry bad in the file is counted once
        train = _karpathy(spec[len("karpathy:") :], ("train", "restval"), skips)
        val = _karpathy(spec[len("karpathy:") :], ("test",), skips)
        source = DataSource(spec, train, val, None, "a photo of a {name}", skips)
    else:
        source = open_data(spec or None, val_size, seed)
        if source.streaming:
            raise DataError(
                f"{spec}: fine-tuning reads map-style data; read these shards as wds-map:"
            )
    if eval_spec:
        if eval_spec.startswith("karpathy:"):
            source.val = _karpathy(eval_spec[len("karpathy:") :], ("test",), SkipLog())
        else:
            other = open_data(eval_spec, 0, seed)
            source.val = other.train + other.val
        source.class_names = None
    return source


def open_vqa(
    spec: str, val_size: float, seed: int, per_scene: int, eval_spec: str = ""
) -> DataSource:
    """VQA data: ``synthetic[:N[:V]]`` (default) or ``vqa:QUESTIONS,ANNOTATIONS[,IMAGE_DIR]``."""
    from semmim import data
    from semmim.downstream.vqa_data import load_vqa, synthetic_vqa

    def read(spec: str, skips: SkipLog) -> tuple[list, list | None]:
        if not spec or spec == "synthetic" or spec.startswith("synthetic:"):
            parts = spec.split(":")[1:] if spec else []
            try:
                n = int(parts[0]) if parts and parts[0] else data.SYNTHETIC_TRAIN
                v = int(parts[1]) if len(parts) > 1 else data.SYNTHETIC_VAL
            except ValueError:
                raise ValueError(
                    f"--data: synthetic[:N[:V]] needs integers, got {spec!r}"
                ) from None
            return synthetic_vqa(seed, "train", n, per_scene), synthetic_vqa(
                seed, "val", v, per_scene
            )
        if not spec.startswith("vqa:"):
            raise ValueError(
                f"--data: VQA data is synthetic[:N[:V]] or vqa:QUESTIONS.json,ANNOTATIONS.json"
                f"[,IMAGE_DIR], got {spec!r}"
            )
        files = spec[len("vqa:") :].split(",")
        if len(files) not in (2, 3) or not all(files[:2]):
            raise ValueError(
                f"--data: vqa:QUESTIONS.json,ANNOTATIONS.json[,IMAGE_DIR], got {spec!r}"
            )
        recs = load_vqa(files[0], files[1], files[2] if len(files) == 3 else None, skips)
        if not recs:
            raise ValueError(
                f"--data: {spec!r} has no usable question (skipped: {skips.summary()})"
            )
        return recs, None

    skips = SkipLog()
    train, val = read(spec, skips)
    if val is None:
        train, val = split_records(train, val_size, seed)
    if eval_spec:
        val, held = read(eval_spec, skips)
        val = val + (held or [])
    synthetic = not spec or spec.startswith("synthetic")
    return DataSource(
        spec or "synthetic",
        train,
        val,
        None,
        skips=skips,
        crop_scale=(0.85, 1.0) if synthetic else (0.5, 1.0),
        flip="swap" if synthetic else "none",
    )


def _eval_batches(records, image_size: int, batch_size: int, num_workers: int, desc: str):
    """Lists of dataset items (``image`` (3, S, S), ``caption``, ``index``; or ``bad``, ``key``
    for an unreadable image) with the evaluation transform, under a progress bar."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        PairDataset(records, EvalTransform(image_size)),  # items: image, caption, index
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=lambda items: items,
    )
    yield from tqdm(loader, desc=desc, leave=False)


# -------------------------------------------------------------------------------------- tasks
class _FinetuneTask(Task):
    diagnostics: tuple[str, ...] = ()  # their loss() computes no pre-training diagnostics

    def __init__(self, cfg: TaskConfig | None = None) -> None:
        self.cfg = cfg or TaskConfig()

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def _starting_weights(self, model_cfg: SemMIMConfig, pretrained: bool) -> dict | None:
        if not pretrained:
            return None  # a resume: the checkpoint's weights are loaded next
        found = _init_state(self.cfg)
        if found is None:
            log.info(
                "%s: no --ckpt given: training from scratch (random initialisation)", self.name
            )
            return None
        state, path = found
        if SemMIMConfig.from_dict(state["config"]).vision != model_cfg.vision:
            raise ValueError(f"--ckpt: {path} was trained with another vision config")
        log.info(
            "%s: starting from pre-training checkpoint %s (step %d)", self.name, path, state["step"]
        )
        return state


class RetrievalTask(_FinetuneTask):
    """ITC + ITM fine-tuning of the SemMIM model itself, image-identity aware."""

    name = "retrieval"
    objectives = ("itc", "itm")
    min_batch = 2

    def model_config(self, model_cfg: SemMIMConfig) -> SemMIMConfig:
        return model_cfg.override({"loss.mlm": 0.0, "loss.glob": 0.0, "loss.mim": 0.0})

    def open_data(self, tcfg) -> DataSource:
        return open_pairs(tcfg.data, tcfg.val_size, tcfg.split_seed, self.cfg.eval_data)

    def build_model(self, model_cfg: SemMIMConfig, pretrained: bool = True) -> nn.Module:
        from semmim import build_model

        state = self._starting_weights(model_cfg, pretrained)
        # *.pretrained weights only for a fresh start: a checkpoint's weights replace them
        model = build_model(self.model_config(model_cfg), pretrained=pretrained and state is None)
        if state is not None:
            model.load_state_dict(state["model"])
        return model

    def collate(self, model, records, max_len: int):
        return Collator(model.tokenizer, max_len, records)  # with image ids

    def loss(self, forward, batch, device, seed, check_inputs):
        out = forward(
            batch["images"].to(device, non_blocking=True),
            batch["input_ids"].to(device, non_blocking=True),
            batch["attention_mask"].to(device, non_blocking=True),
            seed=seed,
            check_inputs=check_inputs,
            image_ids=batch["image_ids"].to(device, non_blocking=True),
        )
        return out.loss, out.losses

    def evaluate(self, model, source, model_cfg, tcfg, device) -> Evaluation:
        """Retrieval as pre-training evaluates it; with ``init`` also the starting checkpoint's
        zero-shot numbers on the same split (``zero_shot_retrieval``)."""
        evaluation = super().evaluate(model, source, model_cfg, tcfg, device)
        result = evaluation.result
        table = "fine-tuned:\n" + evaluation.table
        found = _init_state(self.cfg) if self.cfg.init else None
        if found is not None:
            from semmim import build_model

            state, path = found
            start = build_model(SemMIMConfig.from_dict(state["config"]), pretrained=False)
            start = start.to(device)
            start.load_state_dict(state["model"])
            zero = super().evaluate(start, source, model_cfg, tcfg, device)
            zero.result["checkpoint"] = path
            result["zero_shot_retrieval"] = zero.result
            table += f"\n\nzero-shot (the starting checkpoint {path}):\n" + zero.table
        return Evaluation(result, table)


class _HeadTask(_FinetuneTask):
    """A task whose model is new heads on the pre-trained towers (VQA, captioning): it has no
    schedules and no EMA teacher, so the loop has nothing to update around an optimizer step."""

    def on_progress(self, model: nn.Module, step: int, total_steps: int) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass


class VQATask(_HeadTask):
    """Answer classification over the most frequent training answers."""

    name = "vqa"
    objectives = ("vqa",)
    min_batch = 1

    def __init__(self, cfg: TaskConfig | None = None, answers: list[str] | None = None) -> None:
        super().__init__(cfg)
        self.answers = answers  # the class list; fixed by the first open_data (or a checkpoint)

    def config(self) -> dict[str, Any]:
        return {**self.cfg.to_dict(), "answers": self.answers}

    def open_data(self, tcfg) -> DataSource:
        from semmim.downstream.vqa_data import answer_vocabulary

        source = open_vqa(
            tcfg.data,
            tcfg.val_size,
            tcfg.split_seed,
            self.cfg.questions_per_image,
            self.cfg.eval_data,
        )
        if self.answers is None:
            self.answers = answer_vocabulary(source.train, self.cfg.num_answers)
        return source

    def build_model(self, model_cfg: SemMIMConfig, pretrained: bool = True) -> nn.Module:
        from semmim.downstream.models import VQA_PARTS, VQAModel, pretrained_towers

        if self.answers is None:
            raise ValueError("vqa: the answer list is made when the data is opened")
        state = self._starting_weights(model_cfg, pretrained)
        towers = pretrained_towers(model_cfg, state, pretrained, VQA_PARTS)
        return VQAModel(model_cfg, len(self.answers), towers)

    def collate(self, model, records, max_len: int):
        from semmim.downstream.vqa_data import soft_scores

        index = {a: i for i, a in enumerate(self.answers)}
        targets = [soft_scores(r, index) for r in records]
        base, n = Collator(model.tokenizer, max_len), len(self.answers)

        def collate(items):
            batch = base(items)
            if "index" in batch:
                t = torch.zeros(len(batch["index"]), n)
                for row, i in enumerate(batch["index"].tolist()):
                    for cls, score in targets[i]:
                        t[row, cls] = score
                batch["targets"] = t
            return batch

        return collate

    def loss(self, forward, batch, device, seed, check_inputs):
        return forward(
            batch["images"].to(device, non_blocking=True),
            batch["input_ids"].to(device, non_blocking=True),
            batch["attention_mask"].to(device, non_blocking=True),
            targets=batch["targets"].to(device, non_blocking=True),
            seed=seed,
            check_inputs=check_inputs,
        )

    @torch.no_grad()
    def evaluate(self, model, source, model_cfg, tcfg, device) -> Evaluation:
        """Official VQA accuracy (overall and per answer type) beside the majority-answer
        baselines; the predictions in the submission format (``vqa_results.json``)."""
        from semmim.downstream.vqa_data import answer_vocabulary, normalize_answer, vqa_accuracy

        was = model.training
        model.eval()
        records = source.val
        max_len = min(tcfg.max_text_len, model_cfg.text.max_len)
        predictions: dict[int, str] = {}
        skips = SkipLog()
        for items in _eval_batches(
            records, model_cfg.vision.image_size, tcfg.eval_batch_size, tcfg.num_workers, "vqa eval"
        ):
            good = [it for it in items if "bad" not in it]
            for it in items:
                if "bad" in it:
                    skips.add(it["bad"], it["key"])
            if not good:
                continue
            tok = model.tokenizer(
                [it["caption"] for it in good],
                padding="longest",
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            logits = model.logits(
                torch.stack([it["image"] for it in good]).to(device),
                tok["input_ids"].to(device),
                tok["attention_mask"].to(device),
            )
            for it, c in zip(good, logits.argmax(1).tolist()):
                predictions[records[it["index"]].question_id] = self.answers[c]
        scored = [r for r in records if r.question_id in predictions and r.answers]
        gts = {r.question_id: [normalize_answer(a) for a in r.answers] for r in scored}
        majority = answer_vocabulary(source.train, 1)[0]
        by_type: dict[str, Counter] = {}
        for r in source.train:
            top = Counter(normalize_answer(a) for a in r.answers).most_common(1)[0][0]
            by_type.setdefault(r.question_type, Counter())[top] += 1
        type_major = {t: c.most_common(1)[0][0] for t, c in by_type.items()}

        def accuracy(answer_of) -> dict[str, float]:
            acc: dict[str, list[float]] = {"overall": []}
            for r in scored:
                a = vqa_accuracy(normalize_answer(answer_of(r)), gts[r.question_id], True)
                acc["overall"].append(a)
                acc.setdefault(r.answer_type or "unknown", []).append(a)
            return {k: 100.0 * sum(v) / max(len(v), 1) for k, v in acc.items()}

        result = {
            "n_questions": len(scored),
            "n_answers": len(self.answers),
            "model": accuracy(lambda r: predictions[r.question_id]),
            "majority": accuracy(lambda r: majority),
            "majority_answer": majority,
            "majority_per_question_type": accuracy(
                lambda r: type_major.get(r.question_type, majority)
            ),
            "skipped": skips.summary(),
        }
        sub = [{"question_id": q, "answer": a} for q, a in sorted(predictions.items())]
        model.train(was)
        return Evaluation(result, self.format_table(result), {"vqa_results.json": sub})

    @staticmethod
    def format_table(result: dict[str, Any]) -> str:
        types = [k for k in result["model"] if k != "overall"]
        cols = ["overall", *sorted(types)]
        width = 30
        lines = [
            f"VQA accuracy (official soft score, %): {result['n_questions']} questions, "
            f"{result['n_answers']} answer classes",
            "".ljust(width) + "".join(c.rjust(10) for c in cols),
        ]
        for name, key in (
            ("model", "model"),
            (f"majority ('{result['majority_answer']}')", "majority"),
            ("majority per question type", "majority_per_question_type"),
        ):
            lines.append(
                name.ljust(width) + "".join(f"{result[key].get(c, 0.0):10.2f}" for c in cols)
            )
        return "\n".join(lines)


class CaptionTask(_HeadTask):
    """Image captioning: LM loss with label smoothing; beam-search decoding; COCO metrics."""

    name = "caption"
    objectives = ("lm",)
    min_batch = 1

    def open_data(self, tcfg) -> DataSource:
        return open_pairs(tcfg.data, tcfg.val_size, tcfg.split_seed, self.cfg.eval_data)

    def build_model(self, model_cfg: SemMIMConfig, pretrained: bool = True) -> nn.Module:
        from semmim.downstream.models import CAPTION_PARTS, CaptionModel, pretrained_towers

        state = self._starting_weights(model_cfg, pretrained)
        return CaptionModel(
            model_cfg,
            self.cfg.label_smoothing,
            pretrained_towers(model_cfg, state, pretrained, CAPTION_PARTS),
        )

    def loss(self, forward, batch, device, seed, check_inputs):
        return forward(
            batch["images"].to(device, non_blocking=True),
            batch["input_ids"].to(device, non_blocking=True),
            batch["attention_mask"].to(device, non_blocking=True),
            seed=seed,
            check_inputs=check_inputs,
        )

    @torch.no_grad()
    def evaluate(self, model, source, model_cfg, tcfg, device) -> Evaluation:
        """BLEU / METEOR / ROUGE-L / CIDEr of the decoded captions (``captions.json``)."""
        from semmim.downstream.caption_metrics import caption_metrics, format_caption_table

        was = model.training
        model.eval()
        refs: dict[str, list[str]] = {}
        first: dict[str, Any] = {}
        for r in source.val:
            refs.setdefault(r.key, []).append(r.caption)
            first.setdefault(r.key, r)
        images = list(first.values())
        preds: dict[str, str] = {}
        skips = SkipLog()
        for items in _eval_batches(
            images, model_cfg.vision.image_size, tcfg.eval_batch_size, tcfg.num_workers, "captions"
        ):
            good = [it for it in items if "bad" not in it]
            for it in items:
                if "bad" in it:
                    skips.add(it["bad"], it["key"])
            if not good:
                continue
            caps = model.generate(
                torch.stack([it["image"] for it in good]).to(device),
                beam_size=self.cfg.beam_size,
                max_len=self.cfg.max_gen_len,
            )
            for it, c in zip(good, caps):
                preds[images[it["index"]].key] = c
        refs = {k: v for k, v in refs.items() if k in preds}
        try:
            result = caption_metrics(preds, refs)
        except ImportError as err:  # the captions are still written; the metrics say why not
            log.warning("caption metrics skipped: %s", err)
            result = {"skipped": {"BLEU/METEOR/ROUGE-L/CIDEr": str(err)}, "tokenizer": "none"}
        result.update(
            n_images=len(preds),
            decoding=f"beam {self.cfg.beam_size}" if self.cfg.beam_size > 1 else "greedy",
            skipped_images=skips.summary(),
            examples=[
                {"image": k, "caption": preds[k], "reference": refs[k][0]} for k in list(preds)[:5]
            ],
        )
        table = format_caption_table(result)
        for ex in result["examples"][:3]:
            table += f"\n  {ex['image']}: {ex['caption']!r}  (ref: {ex['reference']!r})"
        captions = [{"image_id": k, "caption": v} for k, v in preds.items()]
        model.train(was)
        return Evaluation(result, table, {"captions.json": captions})


TASKS = {"retrieval": RetrievalTask, "vqa": VQATask, "caption": CaptionTask}


def make_task(name: str, cfg: TaskConfig | dict | None = None) -> Task:
    """A task by name; ``cfg`` a :class:`TaskConfig` or a checkpoint's ``task_config`` dict."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; valid: {list(TASKS)}")
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        answers = cfg.pop("answers", None)
        task = TASKS[name](TaskConfig.from_dict(cfg))
        if answers is not None:
            task.answers = list(answers)
        return task
    return TASKS[name](cfg)
