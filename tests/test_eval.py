"""Retrieval metrics against hand-computed values, chance levels, ITM re-ranking, the table."""

from __future__ import annotations

import pytest
import torch

from semmim.eval import chance_metrics, format_table, rerank, retrieval_metrics


def test_known_similarity_matrix_hand_computed():
    # 3 images, 4 captions; captions 0 and 1 belong to image 0.
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.3],  # image 0: order t0 t2 t3 t1 -> best gt rank 0
            [0.5, 0.2, 0.1, 0.7],  # image 1: order t3 t0 t1 t2 -> gt t2 at rank 3
            [0.1, 0.6, 0.3, 0.2],  # image 2: order t1 t2 t3 t0 -> gt t3 at rank 2
        ]
    )
    m = retrieval_metrics(sim, [0, 0, 1, 2])
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == 100.0
    # t2i ranks: t0 -> 0, t1 -> 2, t2 -> 2, t3 -> 2
    assert m["t2i_r1"] == 25.0 and m["t2i_r5"] == 100.0
    assert m["i2t_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["t2i_mean"] == pytest.approx(225 / 3)
    assert m["mean_recall"] == pytest.approx((m["i2t_mean"] + m["t2i_mean"]) / 2)


def test_ranks_at_every_cutoff():
    # 12 pairs; caption t's image is preceded by exactly t other images.
    n = 12
    sim = torch.zeros(n, n)
    for t in range(n):
        sim[t, t] = 0.5
        others = [i for i in range(n) if i != t][:t]
        sim[others, t] = 1.0
    m = retrieval_metrics(sim, list(range(n)))
    assert m["t2i_r1"] == pytest.approx(100 * 1 / 12)
    assert m["t2i_r5"] == pytest.approx(100 * 5 / 12)
    assert m["t2i_r10"] == pytest.approx(100 * 10 / 12)


def test_ties_break_to_lower_index_and_input_checks():
    sim = torch.ones(2, 2)
    m = retrieval_metrics(sim, [0, 1])
    assert m["i2t_r1"] == 50.0 and m["t2i_r1"] == 50.0
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_metrics(sim, [0])
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_metrics(sim, [0, 5])


def test_chance():
    c = chance_metrics(100, list(range(100)))
    assert c["i2t_r1"] == pytest.approx(1.0) and c["t2i_r10"] == pytest.approx(10.0)
    assert c["mean_recall"] == pytest.approx((1 + 5 + 10) / 3)
    # two captions per image: P(hit@1) = 2/4 for i2t
    c = chance_metrics(2, [0, 0, 1, 1])
    assert c["i2t_r1"] == pytest.approx(50.0) and c["t2i_r1"] == pytest.approx(50.0)


def test_rerank_orders_top_k_by_second_stage_then_rest_by_first():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0]])
    # second stage prefers higher index among the top 3
    out = rerank(sim, 3, lambda q, cols: cols.float())
    order = out[0].argsort(descending=True).tolist()
    assert order == [2, 1, 0, 3, 4]
    # a perfect ITM fixes what ITC got wrong inside the top-k
    sim = torch.tensor([[0.9, 0.8], [0.9, 0.8]])
    fixed = rerank(sim, 2, lambda q, cols: (cols == q.unsqueeze(1)).float(), chunk=1)
    assert retrieval_metrics(fixed, [0, 1])["i2t_r1"] == 100.0
    assert retrieval_metrics(sim, [0, 1])["i2t_r1"] == 50.0


def test_format_table_mentions_ranking_rows_and_zero_shot():
    m = retrieval_metrics(torch.eye(3), [0, 1, 2])
    result = {
        "n_images": 3,
        "n_texts": 3,
        "itc": m,
        "itm": m,
        "chance": chance_metrics(3, [0, 1, 2]),
        "ranking": "ITC, then ITM re-rank of the top 16",
        "zero_shot": {
            "top1": 50.0,
            "top5": 100.0,
            "n_images": 2,
            "n_classes": 5,
            "chance_top1": 20.0,
            "prompt": "a photo of a {name}",
        },
        "skipped": {"total": 0},
    }
    table = format_table(result)
    assert "ITC+ITM top-16" in table and "chance" in table and "zero-shot" in table
    assert "100.00" in table


def test_itm_rerank_calls_stay_bounded_for_large_k(monkeypatch):
    """ALBEF re-ranks k = 256 (COCO): each ITM call scores ~256 pairs, not 16 queries × k."""
    from semmim import build_model, from_preset
    from semmim.data import open_data
    from semmim.eval import evaluate

    torch.manual_seed(0)
    model = build_model(from_preset("tiny"))
    records = open_data("synthetic:1:20").val
    sizes = []
    score = model.itm_score

    def spy(images, ids, mask):
        sizes.append(ids.shape[0])
        return score(images, ids, mask)

    monkeypatch.setattr(model, "itm_score", spy)
    result = evaluate(model, records, image_size=64, max_len=16, rerank_k=20)
    assert result["n_texts"] == 20 and sum(sizes) == 2 * 20 * 20  # every query, both ways
    assert max(sizes) <= 256, sizes
    with pytest.raises(ValueError, match="rerank_k: must be >= 0"):
        evaluate(model, records, image_size=64, max_len=16, rerank_k=-1)


def test_zero_shot_reports_the_majority_class_baseline():
    """Classes are rarely balanced (Tux Paint: mostly animals): the table shows what always
    naming the most frequent class would score, beside the uniform chance 1/C."""
    from collections import Counter

    from semmim import build_model, from_preset, synthetic
    from semmim.data import open_data
    from semmim.eval import evaluate

    torch.manual_seed(0)
    model = build_model(from_preset("tiny"))
    records = open_data("synthetic:1:30").val
    result = evaluate(
        model,
        records,
        image_size=64,
        max_len=16,
        rerank_k=0,
        class_names=list(synthetic.SHAPES),
        prompt_template="a photo of a {name}",
    )
    zs = result["zero_shot"]
    counts = Counter(r.label for r in records if r.label >= 0)  # -1: no single class
    assert zs["n_images"] == sum(counts.values()) > 0
    assert zs["majority_top1"] == pytest.approx(100.0 * max(counts.values()) / zs["n_images"])
    assert zs["majority_top1"] >= zs["chance_top1"]
    assert f"majority class {zs['majority_top1']:.2f}%" in format_table(result)
