"""DEAP-style variation operators for sparse gene lists."""

from .crossover import cx_layer_swap, cx_one_point, cx_uniform
from .init import init_empty, init_random
from .mutation import (
    DEFAULT_MUTATION_PROBS,
    mut_add_gene,
    mut_mixed,
    mut_move_gene,
    mut_remove_gene,
    mut_shift_offset,
)

__all__ = [
    "init_random", "init_empty",
    "mut_add_gene", "mut_remove_gene", "mut_shift_offset", "mut_move_gene", "mut_mixed",
    "DEFAULT_MUTATION_PROBS",
    "cx_uniform", "cx_one_point", "cx_layer_swap",
]
