"""Retrieval and zero-shot evaluation, and the one evaluation path of every task.

Retrieval follows ALBEF: all held-out images and captions are embedded with the ITC projections, the
image x text cosine similarity ranks candidates ("ITC" row), then the top ``k`` candidates of every query
are re-ranked by the ITM head ("ITC+ITM top-k" row; candidates beyond ``k`` keep their ITC order). An
image may have several captions: image->text counts a hit when *any* of its captions is in the top K;
text->image when its one image is. Numbers are percentages; mean recall = mean of the six R@K values.

Every evaluation (the end of training or fine-tuning, ``semmim eval``) goes through
:func:`run_evaluation`: the task's :meth:`~semmim.train.Task.evaluate` computes an
:class:`Evaluation`, :func:`write_evaluation` (the one writer) prints its table and writes
``eval.json`` / ``eval.txt`` and the task's files beside them.
:func:`semmim.eval_checkpoint.open_checkpoint_eval` prepares a checkpoint for ``semmim eval``
(a module of its own: it builds the tasks, which use this one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from semmim.data import PairDataset, Record, SkipLog
from semmim.transforms import EvalTransform

KS = (1, 5, 10)


def _hits(ranks: torch.Tensor) -> dict[int, float]:
    return {k: 100.0 * (ranks < k).float().mean().item() for k in KS}


def retrieval_metrics(sim: torch.Tensor, txt2img: Sequence[int]) -> dict[str, float]:
    """R@1/5/10 both ways and mean recall from an image x text score matrix.

    Args:
        sim: (Ni, Nt) scores, higher = better match.
        txt2img: for each text, the index of its image.

    Ties are broken by the lower index (stable sort), so results are deterministic.
    """
    n_img, n_txt = sim.shape
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries but sim has {n_txt} texts")
    t2i = torch.as_tensor(list(txt2img), dtype=torch.long)
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"txt2img values must be in [0, {n_img}), got {t2i.min()}..{t2i.max()}")
    order_i2t = torch.argsort(sim, dim=1, descending=True, stable=True)  # (Ni, Nt) text indices
    pos_of_text = torch.empty_like(order_i2t)
    pos_of_text.scatter_(1, order_i2t, torch.arange(n_txt).expand(n_img, n_txt).contiguous())
    gt = t2i.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)  # (Ni, Nt) gt-text mask
    big = torch.full_like(pos_of_text, n_txt)
    rank_i2t = torch.where(gt, pos_of_text, big).min(dim=1).values  # best rank of any gt caption
    order_t2i = torch.argsort(sim.t(), dim=1, descending=True, stable=True)  # (Nt, Ni)
    rank_t2i = (order_t2i == t2i.unsqueeze(1)).float().argmax(dim=1)
    i2t, t2i_hits = _hits(rank_i2t), _hits(rank_t2i)
    out = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i_hits.items()}
    out["i2t_mean"] = sum(i2t.values()) / len(KS)
    out["t2i_mean"] = sum(t2i_hits.values()) / len(KS)
    out["mean_recall"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


def chance_metrics(n_img: int, txt2img: Sequence[int]) -> dict[str, float]:
    """Expected metrics of a random ranking (R@K = P(a gt item lands in K random picks))."""
    n_txt = len(txt2img)
    per_image = [0] * n_img
    for i in txt2img:
        per_image[i] += 1

    def p_hit(n: int, g: int, k: int) -> float:
        k = min(k, n)
        return 1.0 - math.comb(n - g, k) / math.comb(n, k) if g else 0.0

    out = {}
    for k in KS:
        out[f"i2t_r{k}"] = 100.0 * sum(p_hit(n_txt, g, k) for g in per_image) / max(n_img, 1)
        out[f"t2i_r{k}"] = 100.0 * min(k, n_img) / max(n_img, 1)
    out["i2t_mean"] = sum(out[f"i2t_r{k}"] for k in KS) / len(KS)
    out["t2i_mean"] = sum(out[f"t2i_r{k}"] for k in KS) / len(KS)
    out["mean_recall"] = (out["i2t_mean"] + out["t2i_mean"]) / 2
    return out


def rerank(
    sim: torch.Tensor, k: int, score_fn, desc: str = "ITM re-rank", chunk: int = 16
) -> torch.Tensor:
    """Re-score each row's top-``k`` candidates with ``score_fn`` and rank them above the rest.

    Args:
        sim: (Nq, Nc) first-stage scores.
        k: candidates re-scored per query.
        score_fn: ``(queries (q,), candidates (q, k)) -> (q, k)`` second-stage scores.
        chunk: queries per ``score_fn`` call (q <= chunk).

    Returns an (Nq, Nc) matrix whose row order is: top-k by ``score_fn``, then the rest by ``sim``.
    """
    k = min(k, sim.shape[1])
    out = sim - sim.max() - 1.0  # every non-candidate <= -1
    top = sim.topk(k, dim=1).indices  # (Nq, k)
    starts = range(0, sim.shape[0], chunk)
    for q0 in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 4):
        queries = torch.arange(q0, min(q0 + chunk, sim.shape[0]))
        scores = score_fn(queries, top[queries]).float()  # (q, k)
        scores = scores - scores.min(dim=1, keepdim=True).values  # every candidate >= 0
        out[queries.unsqueeze(1), top[queries]] = scores
    return out


class _Items(torch.utils.data.Dataset):
    def __init__(self, base: PairDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.base[i]


@torch.no_grad()
def embed_images(
    model,
    records: Sequence[Record],
    image_size: int,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    skips: SkipLog,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Load and embed images. Returns (kept record positions, images (N,3,S,S) cpu, features (N,256))."""
    dataset = PairDataset(records, EvalTransform(image_size))
    loader = torch.utils.data.DataLoader(
        _Items(dataset),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=lambda items: items,
        generator=torch.Generator().manual_seed(0),
    )
    kept, images, feats = [], [], []
    for items in tqdm(loader, desc="embed images", leave=False):
        good = []
        for it in items:
            if "bad" in it:
                skips.add(it["bad"], it["key"])
            else:
                good.append(it)
        if not good:
            continue
        batch = torch.stack([it["image"] for it in good])
        kept.extend(it["index"] for it in good)
        images.append(batch)
        feats.append(model.encode_image(batch.to(device)).float().cpu())
    if not kept:
        raise ValueError("no held-out image could be loaded")
    return kept, torch.cat(images), torch.cat(feats)


@torch.no_grad()
def embed_texts(
    model, texts: Sequence[str], tokenizer, max_len: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise (padded to ``max_len``) and embed. Returns (ids (N,T), mask (N,T), features (N,256))."""
    tokens = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    feats = [
        model.encode_text(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
        .float()
        .cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return ids, mask, torch.cat(feats)


@torch.no_grad()
def evaluate(
    model,
    records: Sequence[Record],
    *,
    image_size: int,
    max_len: int,
    class_names: Sequence[str] | None = None,
    prompt_template: str | Sequence[str] = "a photo of a {name}",
    rerank_k: int = 16,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Retrieval (ITC, then ITM re-rank of the top ``rerank_k``) and zero-shot classification.

    Args:
        model: a :class:`semmim.SemMIM` (its ``encode_image``, ``encode_text``, ``itm_score``,
            ``tokenizer`` are used; put in eval mode here).
        records: held-out image-caption pairs (several captions per image share ``key``).
        class_names: zero-shot classes; images with ``label >= 0`` are classified.
        prompt_template: ``"... {name} ..."`` or a list of them (class features are averaged).
        rerank_k: ITM re-ranked candidates per query; 0 = ITC only (ALBEF: 256 on COCO, 128 on
            Flickr30K). Each ITM call scores at most ``max(k, 256)`` pairs, so memory does not
            grow with k.

    Returns a dict with ``"itc"`` (and ``"itm"``) metric dicts, ``"chance"``, ``"zero_shot"`` (or None),
    counts and the ranking description.
    """
    if rerank_k < 0:
        raise ValueError(f"rerank_k: must be >= 0 (0 = ITC only), got {rerank_k}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    skips = SkipLog()
    first: dict[str, int] = {}
    for n, r in enumerate(records):
        first.setdefault(r.key, n)
    image_records = [records[n] for n in first.values()]
    kept, images, img_feats = embed_images(
        model, image_records, image_size, batch_size, device, num_workers, skips
    )
    key_to_img = {image_records[n].key: j for j, n in enumerate(kept)}
    texts = [r for r in records if r.key in key_to_img]
    txt2img = [key_to_img[r.key] for r in texts]
    tokenizer = model.tokenizer
    ids, mask, txt_feats = embed_texts(
        model, [r.caption for r in texts], tokenizer, max_len, batch_size, device
    )
    sim = img_feats @ txt_feats.t()  # (Ni, Nt) cosine similarities
    result: dict[str, Any] = {
        "n_images": len(kept),
        "n_texts": len(texts),
        "skipped": skips.summary(),
        "itc": retrieval_metrics(sim, txt2img),
        "chance": chance_metrics(len(kept), txt2img),
    }
    if rerank_k > 0:
        # Image tokens once; itm_score then runs only the text and fusion encoders per pair.
        tokens = torch.cat(
            [
                model.image_tokens(images[i : i + batch_size].to(device)).float().cpu()
                for i in range(0, len(images), batch_size)
            ]
        )  # (Ni, P+1, Dv)

        def i2t_score(queries: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            q, kk = cols.shape
            img = tokens[queries].unsqueeze(1).expand(-1, kk, -1, -1).flatten(0, 1)  # (q·k, L, D)
            flat = cols.flatten()
            scores = model.itm_score(img.to(device), ids[flat].to(device), mask[flat].to(device))
            return scores.view(q, kk).cpu()

        def t2i_score(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            q, kk = rows.shape
            flat = rows.flatten()
            tid = queries.repeat_interleave(kk)
            scores = model.itm_score(
                tokens[flat].to(device), ids[tid].to(device), mask[tid].to(device)
            )
            return scores.view(q, kk).cpu()

        # Queries per ITM call: about 256 (query, candidate) pairs per call whatever k is.
        chunk_i2t = max(1, 256 // min(rerank_k, sim.shape[1]))
        chunk_t2i = max(1, 256 // min(rerank_k, sim.shape[0]))
        s_i2t = rerank(sim, rerank_k, i2t_score, "ITM re-rank i2t", chunk_i2t)
        s_t2i = rerank(sim.t().contiguous(), rerank_k, t2i_score, "ITM re-rank t2i", chunk_t2i)
        i2t = retrieval_metrics(s_i2t, txt2img)
        t2i = retrieval_metrics(s_t2i.t(), txt2img)
        merged = {k: v for k, v in i2t.items() if k.startswith("i2t")}
        merged |= {k: v for k, v in t2i.items() if k.startswith("t2i")}
        merged["mean_recall"] = (merged["i2t_mean"] + merged["t2i_mean"]) / 2
        result["itm"] = merged
    result["ranking"] = (
        f"ITC, then ITM re-rank of the top {rerank_k}" if rerank_k > 0 else "ITC only"
    )
    result["zero_shot"] = None
    if class_names:
        labels = torch.tensor([image_records[n].label for n in kept])
        sel = labels >= 0
        if sel.any():
            templates = [prompt_template] if isinstance(prompt_template, str) else prompt_template
            prompts = [t.format(name=c) for c in class_names for t in templates]
            _, _, feats = embed_texts(model, prompts, tokenizer, max_len, batch_size, device)
            # Prompt ensembling (CLIP): average each class's prompt features, re-normalise.
            cls_feats = torch.nn.functional.normalize(
                feats.view(len(class_names), len(templates), -1).mean(1), dim=-1
            )  # (C, E)
            logits = img_feats[sel] @ cls_feats.t()  # (N, C)
            top = logits.topk(min(5, len(class_names)), dim=1).indices
            y = labels[sel]
            result["zero_shot"] = {
                "top1": 100.0 * (top[:, 0] == y).float().mean().item(),
                "top5": 100.0 * (top == y.unsqueeze(1)).any(1).float().mean().item(),
                "n_images": int(sel.sum()),
                "n_classes": len(class_names),
                "chance_top1": 100.0 / len(class_names),
                # what always naming the most frequent class scores (classes are rarely balanced)
                "majority_top1": 100.0 * torch.bincount(y).max().item() / len(y),
                "prompt": templates[0]
                + (f" (+{len(templates) - 1} more, averaged)" if len(templates) > 1 else ""),
            }
    model.train(was_training)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The eval result as a plain-text table."""
    cols = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS] + ["mean_recall"]
    head = ("ranking", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "mean R")
    rows = [("ITC", result["itc"])]
    if "itm" in result:
        k = result["ranking"].split("top ")[-1]
        rows.append((f"ITC+ITM top-{k}", result["itm"]))
    rows.append(("chance", result["chance"]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"{result.get('split', 'held-out')} retrieval: {result['n_images']} images, {result['n_texts']} captions "
        f"(ranking: {result['ranking']})",
        head[0].ljust(width) + "".join(h.rjust(9) for h in head[1:]),
    ]
    for name, m in rows:
        lines.append(name.ljust(width) + "".join(f"{m[c]:9.2f}" for c in cols))
    zs = result.get("zero_shot")
    if zs:
        lines.append(
            f"zero-shot classification ({zs['n_images']} images, {zs['n_classes']} classes, "
            f"prompt {zs['prompt']}): top-1 {zs['top1']:.2f}%  top-5 {zs['top5']:.2f}%  "
            f"(chance top-1 {zs['chance_top1']:.2f}%"
            + (f", majority class {zs['majority_top1']:.2f}%" if "majority_top1" in zs else "")
            + ")"
        )
    if result.get("skipped", {}).get("total"):
        lines.append(f"skipped {result.get('split', 'held-out')} samples: {result['skipped']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- the evaluation path
@dataclass
class Evaluation:
    """What a task's evaluation found: ``result`` (written as eval.json), ``table`` (printed and
    written as eval.txt) and ``files``: further JSON documents written beside them, by file name
    (VQA's ``vqa_results.json`` in the submission format, the captions' ``captions.json``)."""

    result: dict[str, Any]
    table: str
    files: dict[str, Any] = field(default_factory=dict)


def write_evaluation(evaluation: Evaluation, json_path: str) -> None:
    """The one writer of evaluation results: print the table, write the result to ``json_path``,
    the table to the same path with ``.txt``, and each of ``evaluation.files`` beside them —
    each file atomically (:mod:`semmim.rundir`). Beside ``eval.json`` the files keep their
    names; beside any other result (``eval_<...>.json``, a ``--json`` name) they get its stem
    as a prefix, so another evaluation never replaces the run's own ``captions.json`` / ...."""
    from semmim.rundir import write_json, write_text

    print(evaluation.table, flush=True)
    folder, base = os.path.split(os.path.abspath(json_path))
    stem = os.path.splitext(base)[0]
    write_json(json_path, evaluation.result)
    write_text(os.path.splitext(json_path)[0] + ".txt", evaluation.table + "\n")
    for name, content in evaluation.files.items():
        write_json(os.path.join(folder, name if stem == "eval" else f"{stem}.{name}"), content, 1)


def run_evaluation(
    task,
    model,
    source,
    model_cfg,
    tcfg,
    device: torch.device,
    json_path: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` with ``task`` (a :class:`semmim.train.Task`) on ``source.val``, add
    ``extra`` fields to the result, write it (:func:`write_evaluation`) and return it. The end of
    training and ``semmim eval`` both come here."""
    evaluation = task.evaluate(model, source, model_cfg, tcfg, device)
    evaluation.result.update(extra or {})
    write_evaluation(evaluation, json_path)
    return evaluation.result
