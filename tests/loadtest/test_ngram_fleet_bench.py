"""The fleet n-gram bench's prompt passes and report (the bench itself runs local stacks)."""

from __future__ import annotations

from specmesh.loadtest.ngram_fleet_bench import LEAD_IN, build_parser, prompt_passes, report


def test_pass_two_is_related_but_different():
    first, second = prompt_passes(3)
    assert first == ["Once upon a time", "The little dog", "One day, a girl named Lily"]
    assert second == [LEAD_IN + p for p in first]


def test_report_names_both_modes_and_the_ratio():
    run = {"accepted_per_round": 0.5, "tokens_per_s": 10.0, "rounds": 4, "seconds": 1.0}
    res = {"target": "t", "tree": "ngram:8", "num_prompts": 2, "max_new_tokens": 8,
           "same_tokens": True, "off": {"pass1": run, "pass2": run},
           "on": {"pass1": run, "pass2": dict(run, accepted_per_round=1.0, tokens_per_s=15.0),
                  "ngrams_written": 7}}
    text = report(res)
    assert "1.50x tokens/s, 2.00x accepted/round" in text and "same tokens: True" in text
    assert build_parser().parse_args([]).num_prompts == 8
