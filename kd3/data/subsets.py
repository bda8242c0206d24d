"""Deterministic subsets of the pool chosen by uid hash (independent of row order and of the run)."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

#: salts of the subsets kd3 draws; a sample's membership depends only on its uid, the salt and the pool
SWAD_VALIDATION = "kd3-val"
DISTILLATION_SAMPLE = "kd3-eval"


def uid_hash_rows(uids: Sequence[str], n: int, salt: str) -> np.ndarray:
    """Positions (ascending) of the ``n`` uids with the smallest SHA-256("<salt>:<uid>") (ties: lower position)."""
    keys = np.array([hashlib.sha256(f"{salt}:{uid}".encode()).hexdigest() for uid in uids])
    return np.sort(np.argsort(keys, kind="stable")[:n])


def uid_hash_mask(uids: Sequence[str], n: int, salt: str) -> np.ndarray:
    """bool [len(uids)], True for the rows :func:`uid_hash_rows` chooses."""
    mask = np.zeros(len(uids), dtype=bool)
    mask[uid_hash_rows(uids, n, salt)] = True
    return mask
