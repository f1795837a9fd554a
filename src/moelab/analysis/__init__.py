"""Routing analyses: pure, streaming functions from a trace (or weights) to tables and arrays.

Each analysis consumes an iterable of column batches (dicts of numpy arrays: an opened `Trace`, one
batch, or any iterable of batches), accumulates counts, and finalises to a small result dataclass with
`to_dict()`. Every number carries its null, one that keeps the layer's expert load and each group's
size (a permutation of the label, the queue-only drop baseline; `resample`), and a 95% bootstrap interval
over sequences, as `Estimate`s; uniform routing stays beside them as a named reference.
"""

from moelab.analysis.coactivation import Coactivation, coactivation, coactivation_counts, conditional_coactivation
from moelab.analysis.drops import (
    DropProfile, QueueComparison, drop_profile, expert_capacity, queue_comparison, simulate_drops,
)
from moelab.analysis.dynamic import DynamicResult, angular_similarity, dynamic_analysis, rank_table
from moelab.analysis.early import EarlyRouting, early_routing, jensen_shannon, top1_agreement, topk_overlap
from moelab.analysis.gates import GateStats, cross_layer_mi_T, gate_stats
from moelab.analysis.load import LoadResult, expert_load
from moelab.analysis.resample import Estimate
from moelab.analysis.specialization import (
    ShareTables, domain_specialisation, expert_label_mi, share_tables, std_score, top_tokens, vocab_specialisation,
)
from moelab.analysis.suite import ANALYSES, analyze_all, to_json_dict
from moelab.analysis.pca import pca_explained_variance, project
from moelab.analysis.reorder import joint_reordering, kendall_tau, paper_reordering
from moelab.analysis.weights import matrix_similarity, rmoe_similarity, weight_analysis

__all__ = [
    "ANALYSES", "Coactivation", "DropProfile", "DynamicResult", "EarlyRouting", "Estimate", "GateStats",
    "LoadResult", "QueueComparison", "queue_comparison",
    "ShareTables", "analyze_all", "angular_similarity", "coactivation", "coactivation_counts",
    "conditional_coactivation", "cross_layer_mi_T", "domain_specialisation", "drop_profile", "dynamic_analysis",
    "early_routing", "expert_capacity", "expert_label_mi", "expert_load", "gate_stats", "jensen_shannon",
    "joint_reordering", "kendall_tau", "matrix_similarity", "paper_reordering", "pca_explained_variance", "project",
    "rank_table", "rmoe_similarity",
    "share_tables", "simulate_drops", "std_score", "to_json_dict", "top1_agreement", "top_tokens",
    "topk_overlap", "vocab_specialisation", "weight_analysis",
]
