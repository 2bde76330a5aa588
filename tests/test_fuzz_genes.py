"""Fuzzing: any gene list, hostile values included, is either applied and reverted bit-exactly or rejected
with a clear :class:`GeneError` that leaves the model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deap_quant import Evaluator, Gene, GeneError, quantize

from .conftest import make_tiny_model

# Uniform per-channel, asymmetric per-tensor at 8 bits (states up to 255), and a k-means codebook.
QMODELS = {
    "uniform-2bit": quantize(make_tiny_model(), bits=2),
    "affine-8bit-per-tensor": quantize(make_tiny_model(seed=1), bits=8, per_channel=False, symmetric=False),
    "kmeans-3bit": quantize(make_tiny_model(seed=2), bits=3, scheme="kmeans"),
}
N_LAYERS = 2
SIZES = [36, 256]
INT64 = 2 ** 63

hostile_scalars = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),  # far beyond int64
    st.integers(-INT64, INT64 - 1).map(np.int64),
    st.integers(0, 2 ** 64 - 1).map(np.uint64),
    st.integers(-128, 127).map(np.int8),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -0.0, 1.0, 2.5]),
    st.booleans(), st.just(np.bool_(True)), st.none(), st.text(max_size=3), st.binary(max_size=3),
    st.just(torch.tensor(1)), st.just(1 + 2j), st.just([1]),
)
# Values near every boundary, so that many hostile lists are also *valid* and get applied.
plausible_layers = st.integers(-2, N_LAYERS + 1)
plausible_indices = st.one_of(st.integers(-3, 300), st.sampled_from([0, 35, 36, 255, 256, 2 ** 62 - 1, 2 ** 62]))
plausible_offsets = st.one_of(st.integers(-300, 300), st.sampled_from([-(2 ** 62) + 1, 2 ** 62 - 1, 0]))

plausible_genes = st.tuples(plausible_layers, plausible_indices, plausible_offsets)
valid_genes = st.integers(0, N_LAYERS - 1).flatmap(
    lambda layer: st.tuples(st.just(layer), st.integers(0, SIZES[layer] - 1), st.integers(-300, 300)))
genes = st.one_of(
    valid_genes, valid_genes.map(lambda g: Gene(*g)), valid_genes.map(np.array), valid_genes.map(list),
    plausible_genes,
    st.tuples(hostile_scalars, plausible_indices, plausible_offsets),
    st.tuples(plausible_layers, hostile_scalars, plausible_offsets),
    st.tuples(plausible_layers, plausible_indices, hostile_scalars),
    st.lists(st.integers(0, 3), max_size=5),  # wrong arity
    st.text(max_size=4), st.none(), st.integers(), st.floats(), st.dictionaries(st.integers(), st.integers(), max_size=4),
)
gene_lists = st.one_of(st.lists(genes, max_size=12), st.lists(valid_genes, max_size=30),
                       st.lists(valid_genes, max_size=12).map(lambda g: np.array(g, dtype=np.int64).reshape(-1, 3)))


def raw_bits(qmodel) -> list[torch.Tensor]:
    """Every quantized weight's raw bits (so that 0.0 and -0.0, or two NaNs, are told apart)."""
    return [qmodel.dequantized_weights(layer).view(torch.int32) for layer in range(len(qmodel.layers))]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def on_the_grid(qmodel, genes) -> None:
    """With ``genes`` applied, every weight is its grid's value of the expected (clipped, in-range) state."""
    states = qmodel.states_with(genes)
    for layer, state in enumerate(states):
        assert int(state.min()) >= 0 and int(state.max()) < qmodel.layers[layer].n_levels
        expected = qmodel.grids[layer].dequantize(state).view(torch.int32)
        assert torch.equal(qmodel.dequantized_weights(layer).view(torch.int32), expected)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", list(QMODELS))
@FUZZ
@given(gene_list=gene_lists)
def test_hostile_gene_lists_apply_and_revert_bit_exactly_or_are_rejected(name, gene_list):
    qmodel = QMODELS[name]
    before = raw_bits(qmodel)
    try:
        handle = qmodel.apply_(gene_list)
    except GeneError as error:
        message = str(error)
        assert message.startswith("gene #") and any(word in message for word in ("must be", "valid", "triple", "out of"))
        assert same(raw_bits(qmodel), before), "a rejected gene list changed the model"
        event("rejected")
        return
    event("applied")
    try:
        on_the_grid(qmodel, gene_list)
    finally:
        qmodel.revert_(handle)
    assert same(raw_bits(qmodel), before), "revert_ did not restore the weights bit for bit"


@FUZZ
@given(first=gene_lists, second=gene_lists)
def test_nested_application_unwinds_exactly_even_when_the_inner_list_is_rejected(first, second):
    qmodel = QMODELS["uniform-2bit"]
    before = raw_bits(qmodel)
    try:
        with qmodel.applied(first):
            middle = raw_bits(qmodel)
            try:
                with qmodel.applied(second):
                    raise RuntimeError("the body fails")
            except (GeneError, RuntimeError):
                pass
            assert same(raw_bits(qmodel), middle)
    except GeneError:
        pass
    assert same(raw_bits(qmodel), before)


evaluator = Evaluator(QMODELS["uniform-2bit"], (torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                                                torch.arange(16) % 4), batch_size=8)


@settings(max_examples=100, deadline=None)
@given(gene_list=gene_lists)
def test_the_evaluator_scores_or_rejects_hostile_genes_and_leaves_the_model_intact(gene_list):
    qmodel = QMODELS["uniform-2bit"]
    before = raw_bits(qmodel)
    try:
        fitness = evaluator(gene_list)
    except GeneError:
        pass
    else:
        assert len(fitness) == 2 and all(np.isfinite(fitness))
    assert same(raw_bits(qmodel), before)
