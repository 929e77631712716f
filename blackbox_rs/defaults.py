"""Certification defaults, defined once (the functions of :mod:`blackbox_rs.core`, :mod:`blackbox_rs.dataset` and
:mod:`blackbox_rs.certify_sequential` use them; pass a value to override any of them).

``FUTILITY = 0.05``: sequential certification gives up on an input (undecided, no claim) once a 95 %
upper bound on its top-class probability says the per-input cap cannot certify the smallest open
radius. On the Fashion-MNIST benchmark (``benchmarks/sequential_queries.py``, docs/benchmarks.md) it
met all three targets on two disjoint image sets (100.5x fewer queries than Cohen's n = 100,000 with
at most -0.8 points on the first 500 images; 107.0x with no change on the next 300), against 76.5x and
97.2x for 0.01. The futility stop never creates a false certificate (a stopped input is
"undecided", no claim); it may give up on an input that would have certified (at most ``futility`` chance
per look), which is where the -0.8 points above come from.
"""

from __future__ import annotations

__all__ = ["ALPHA", "FUTILITY", "MODULE_HOSTED", "N", "N0", "N_HOSTED", "RADII", "RADII_HOSTED", "SEQ_MAX_QUERIES",
           "SEQ_MAX_QUERIES_HOSTED", "SEQ_N0", "FIT_STEPS_HOSTED", "FIT_BATCH_HOSTED"]

ALPHA = 0.001
"""Probability that a certificate is wrong (per certificate)."""
N0 = 100
"""Cohen's selection samples."""
N = 10_000
"""Cohen's estimation samples: the default of the functions, the smoother and the CLI (certifies up to
radius ``sigma * Phi^-1(alpha ** (1 / N))``: 3.2 sigma at alpha = 0.001; pass n=100_000 for Cohen
et al.'s published settings)."""
N_HOSTED = 1_000
"""Cohen's estimation samples of the hosted-API recipes, which pay per query (up to radius 2.46 sigma at
alpha = 0.001)."""
RADII: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Radii at which dataset results report certified accuracy."""
SEQ_N0 = 10
"""Selection samples of sequential certification."""
SEQ_MAX_QUERIES = 100_000
"""Per-input query cap of sequential certification."""
FUTILITY = 0.05
"""Futility level of sequential certification (None: never give up early)."""

RADII_HOSTED: tuple[float, ...] = (0.25,)
"""Radii the vendor front door (``blackbox-rs api``) certifies sequentially unless ``--radius`` is given."""

SEQ_MAX_QUERIES_HOSTED = 1 + N0 + N_HOSTED
"""Per-image cap of the vendor front door's sequential certification: Cohen's cost there (1 clean +
n0 + n = 1,101), so the sequential test never costs more than Cohen's CERTIFY would."""

MODULE_HOSTED = "lowres"
"""Input module the vendor front door fits by default: it works at reduced resolution, so a fit in
front of a 224 x 224 model takes minutes on a CPU (docs/large-inputs.md)."""

FIT_STEPS_HOSTED = 300
"""Fit steps of the vendor front door: this many MSE pretraining steps, then as many of the strategy's
own steps (with :data:`FIT_BATCH_HOSTED` images per step: 7.7 minutes for a ``lowres`` ``denoise`` fit at
3 x 224 x 224 on 2 CPU cores, docs/large-inputs.md)."""

FIT_BATCH_HOSTED = 16
"""Clean images per fit step of the vendor front door."""
