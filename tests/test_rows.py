"""Per-sample reuse: only samples whose activations changed are recomputed, bit-identically."""

from __future__ import annotations

import math

import torch

import deap_quant.evaluation.incremental as incremental
from deap_quant import Evaluator, IncrementalEvaluator
from deap_quant.evaluation.rows import ROW_BUCKET, bucket, changed_rows, put_rows, take_rows

from .test_incremental import lineage


def layer_index(qmodel, name: str) -> int:
    return [layer.name for layer in qmodel.layers].index(name)


def tap(qmodel, name: str, out: int, inp: int, row: int, col: int) -> int:
    """Flat index of weight ``[out, inp, row, col]`` of the 3x3 convolution ``name``."""
    weight = dict(qmodel.module.named_modules())[name].weight
    assert weight.shape[2:] == (3, 3)
    return ((out * weight.shape[1] + inp) * 3 + row) * 3 + col


def test_changed_rows_compares_bits():
    old = torch.zeros(4, 3)
    new = old.clone()
    new[1, 2] = -0.0  # equal as numbers, different bits
    new[3, 0] = 1.0
    assert changed_rows(new, old, 4).tolist() == [1, 3]
    nan = torch.full((2, 2), math.nan)
    assert changed_rows(nan, nan.clone(), 2).tolist() == []  # the same bits, even for NaN
    pair_old = (old, torch.ones(4, 2))
    pair_new = (old.clone(), torch.ones(4, 2))
    pair_new[1][2, 1] = 5.0
    assert changed_rows(pair_new, pair_old, 4).tolist() == [2]


def test_states_that_are_not_batches_of_rows_are_not_compared():
    assert changed_rows(torch.zeros(4, 3), torch.zeros(4, 3), 5) is None  # first dimension is not the batch
    assert changed_rows([torch.zeros(4), "sizes"], [torch.zeros(4), "sizes"], 4) is None
    assert changed_rows(torch.zeros(4, 3), torch.zeros(4, 2), 4) is None


def test_row_helpers():
    assert [bucket(n, 40) for n in (1, ROW_BUCKET, ROW_BUCKET + 1, 39)] == [ROW_BUCKET, ROW_BUCKET, 2 * ROW_BUCKET, 40]
    base = {"a": torch.arange(12.0).reshape(4, 3)}
    index = torch.tensor([2, 0])
    taken = take_rows(base, index)
    assert taken["a"].tolist() == [[6, 7, 8], [0, 1, 2]]
    merged = put_rows(base, torch.tensor([3]), {"a": torch.full((2, 3), -1.0)})
    assert merged["a"][3].tolist() == [-1, -1, -1] and merged["a"][:3].equal(base["a"][:3])
    assert base["a"][3].tolist() == [9, 10, 11]  # the ancestor's activations are never written


def test_a_gene_that_changes_no_activation_reuses_all_of_them(resnet_setup):
    qmodel, data = resnet_setup
    name = "layer4.0.conv2"
    corner = (layer_index(qmodel, name), tap(qmodel, name, 3, 5, 0, 0), 1)  # meets only zero padding on a 1x1 map
    plain = Evaluator(qmodel, data, batch_size=40)
    fast = IncrementalEvaluator(qmodel, data, batch_size=40)
    fast([])
    assert fast([corner]) == plain([corner]) == plain([])
    assert fast.stats()["unchanged_batches"] == 1


def test_changed_samples_alone_are_recomputed_bit_identically(resnet_setup):
    qmodel, data = resnet_setup
    plain = Evaluator(qmodel, data, batch_size=40)
    fast = IncrementalEvaluator(qmodel, data, batch_size=40)
    genomes = lineage(qmodel, seed=11, n=40)
    for genes in genomes:
        assert fast(genes) == plain(genes), genes
    for genes in genomes[-3:]:
        assert fast.scores(genes) == plain.scores(genes)
    stats = fast.stats()
    assert stats["subset_batches"] > 0 and stats["unchanged_batches"] > 0
    off = IncrementalEvaluator(qmodel, data, batch_size=40, reuse_rows=False)
    assert [off(genes) for genes in genomes] == [plain(genes) for genes in genomes]
    assert off.stats()["subset_batches"] == off.stats()["unchanged_batches"] == 0
    assert stats["stage_fraction"] < off.stats()["stage_fraction"]


def test_a_row_count_that_fails_verification_runs_the_full_batch(resnet_setup, monkeypatch):
    qmodel, data = resnet_setup
    monkeypatch.setattr(incremental, "identical_bits", lambda a, b: False)
    plain = Evaluator(qmodel, data, batch_size=40)
    fast = IncrementalEvaluator(qmodel, data, batch_size=40)
    genomes = lineage(qmodel, seed=11, n=40)
    assert [fast(genes) for genes in genomes] == [plain(genes) for genes in genomes]
    assert fast.stats()["subset_batches"] == 0
    assert all(verdict is False for verdict in fast._row_verdicts.values()) and fast._row_verdicts
