"""Seeds derived from seeds: one function, and every fixed salt of the code base in one place.

A stage derives the seed of each random stream it uses (a learner's initialisation, an evaluation's start
states, a context) from its params seed and a salt. Deriving through numpy's ``SeedSequence`` gives the same
32-bit seed on any machine, and keeping the salts in one enum keeps two streams from sharing one by accident.
"""

from __future__ import annotations

from enum import IntEnum, unique

import numpy as np


@unique  # two streams sharing a salt would share their random numbers
class Salt(IntEnum):
    """The fixed salts of meta_train's streams (``derive_seed(meta_train.seed, Salt.X)``)."""

    CROSS_EVAL = 1
    """Start states of the cross-evaluation matrix."""
    SIAMESE_INIT = 3
    """The siamese encoder's initialisation."""
    SIAMESE_FIT = 4
    """The siamese training batches."""
    SIAMESE_INDEX = 5
    """The contexts embedded into the siamese index."""
    REPTILE = 7
    """Reptile's initialisation and inner-loop seeds."""
    MULTITASK = 11
    """The multitask DQN run."""
    GATE = 13
    """Start states of the validation zero-shot that decides the hypernet's out-of-range gate."""
    VAL_ZERO_SHOT = 99
    """Contexts and start states of the validation zero-shot figure."""


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed from integers (numpy's ``SeedSequence(list(entropy))``): the same on any machine."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
