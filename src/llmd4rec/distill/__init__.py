"""Bidirectional distillation: the KL term, the rank-based sample weights, and the on-disk teacher cache."""

from .cache import TeacherCache, TeacherCacheReader, TeacherCacheWriter
from .losses import kd_kl, kl_from_log_probs
from .weights import target_ranks, weights_crm_to_llm, weights_llm_to_crm

__all__ = [
    "TeacherCache",
    "TeacherCacheReader",
    "TeacherCacheWriter",
    "kd_kl",
    "kl_from_log_probs",
    "target_ranks",
    "weights_crm_to_llm",
    "weights_llm_to_crm",
]
