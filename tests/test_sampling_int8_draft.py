"""CI-sized: sampling through an int8 draft keeps the target's distribution (4,000 two-token
continuations, chi-square and total variation against HF's own warpers on the target). The
20,000-sample version is `test_sampling_lossless.py` (marked slow)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_TARGET
from tests.test_sampling_lossless import (
    check_int8_draft,
    hf_target_pairs,
    one_thread,  # noqa: F401 - autouse: one torch thread
)

pytestmark = pytest.mark.models


def test_an_int8_draft_keeps_the_target_distribution(models):
    check_int8_draft(models, hf_target_pairs(models / TINY_TARGET), 4_000, max_tv=0.06)
