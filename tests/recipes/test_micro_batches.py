"""Splitting batches into token-budget micro-batches changes memory and padding, never the losses."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import instruction_rows, make_tiny_model_dir, sft_config, write_jsonl
from tests.recipes.test_dpo import dpo_config
from tests.recipes.test_kto import kto_config
from tests.recipes.test_reward import review_pairs, rm_config
from tunelab.recipes.common import split_by_tokens
from tunelab.recipes.dpo import run_dpo
from tunelab.recipes.kto import run_kto
from tunelab.recipes.reward import run_rm
from tunelab.recipes.sft import run_sft


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("micro") / "model")


def train_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


def test_split_keeps_every_row_and_respects_the_budget():
    lengths = [5, 30, 12, 7, 50, 9, 31, 8]
    pieces = split_by_tokens(list(range(8)), lengths, budget=40)
    assert sorted(i for piece in pieces for i in piece) == list(range(8))
    for piece in pieces:
        assert len(piece) == 1 or len(piece) * max(lengths[i] for i in piece) <= 40, piece
    assert pieces[-1] == [4]  # longer than the budget: alone
    assert pieces[0] == [0, 3, 7, 5]  # shortest first, 4 x 9 = 36 <= 40
    assert split_by_tokens([3, 1], lengths, budget=None) == [[3, 1]]


@pytest.mark.parametrize("recipe", ["sft", "rm", "dpo", "kto"])
def test_micro_batches_give_the_same_losses_as_whole_batches(recipe, tiny_dir, tmp_path):
    if recipe == "sft":
        data = write_jsonl(tmp_path / "rows.jsonl", instruction_rows(40))
        make, run = (lambda out, **kw: sft_config(tiny_dir, data, out, peft="none", **kw)), run_sft
    else:
        data = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(40))
        make = {"rm": rm_config, "dpo": dpo_config, "kto": kto_config}[recipe]
        make = (lambda out, _make=make, **kw: _make(tiny_dir, data, out, **({} if recipe == "rm" else {"peft": "none"}),
                                                     **kw))
        # (KTO: its KL rows pair each prompt with the next row's completion across the whole batch)
        run = {"rm": run_rm, "dpo": run_dpo, "kto": run_kto}[recipe]
    records = {}
    for name, budget in (("whole", None), ("split", 64)):
        config = make(tmp_path / name, max_steps=4, lr=1e-3, log_every=1, micro_batch_tokens=budget)
        if recipe == "rm":
            config.peft = "none"
        if recipe == "kto":  # far enough from the reference, within 4 steps, for the KL estimate z0 to leave 0
            config.train.lr, config.train.batch_size, config.train.grad_accum = 1e-2, 4, 2
        run(config, quiet=True)
        records[name] = train_records(tmp_path / name)
    whole, split = records["whole"], records["split"]
    assert len(whole) == 4
    for a, b in zip(whole, split):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        for key in ("accuracy", "reward_accuracy", "margin", "reward_margin", "kl", "reward_desirable"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), key
    assert whole[-1]["loss"] != pytest.approx(whole[0]["loss"], abs=1e-3)  # the weights did move
    if recipe == "kto":  # (split at 64 tokens, every micro-batch holds one row: its partner is in another)
        assert any(r["kl"] > 0 for r in whole)


def test_fused_adamw_follows_the_per_tensor_update(tiny_dir, tmp_path, monkeypatch):
    import tunelab.loop as loop

    data = write_jsonl(tmp_path / "rows.jsonl", instruction_rows(40))
    real = loop.build_optimizer
    records, kinds = {}, {}
    for fused in (False, True):
        def build(params, lr, weight_decay, device, fused=fused):
            optimizer = real(params, lr, weight_decay, device, fused=fused)
            kinds[fused] = optimizer.defaults["fused"]
            return optimizer
        monkeypatch.setattr(loop, "build_optimizer", build)
        run_sft(sft_config(tiny_dir, data, tmp_path / f"fused-{fused}", peft="none", max_steps=5, lr=1e-3), quiet=True)
        records[fused] = [r["loss"] for r in train_records(tmp_path / f"fused-{fused}")]
    assert kinds == {False: None, True: True}
    assert records[True] == pytest.approx(records[False], abs=1e-4)
    assert records[True][-1] < records[True][0]
    default = real([torch.nn.Parameter(torch.zeros(3))], 1e-3, 0.0, torch.device("cpu"))
    assert default.defaults["fused"] is True  # what training uses on a CPU
