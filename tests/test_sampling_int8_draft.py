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


@pytest.fixture(scope="module")
def target_pairs(models):
    return hf_target_pairs(models / TINY_TARGET)


@pytest.mark.parametrize("spec", ["chain:3", "dynamic:6/3"])  # dynamic: a spine and leaves
def test_an_int8_draft_keeps_the_target_distribution(models, target_pairs, spec):
    check_int8_draft(models, target_pairs, 4_000, max_tv=0.06, spec=spec)
