"""The demo pipeline end to end, at its quick size."""

import json

from tunelab.cli import main


def test_quick_demo_runs_every_stage_and_sft_beats_base(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    figures = json.loads((out / "demo.json").read_text())
    for stage in ("base", "sft", "rm", "dpo", "ppo", "grpo"):
        assert (out / stage / "final").is_dir()
        assert (out / stage / "config.yaml").is_file()
        assert (out / stage / "metrics.jsonl").read_text().strip()
    assert (out / "sft" / "final" / "adapter_config.json").is_file()  # SFT trains a LoRA adapter
    assert figures["rm_held_out_accuracy"] >= 0.8  # even the quick world separates the pairs
    assert set(figures["positive_share"]) == {"base", "sft", "dpo", "ppo", "grpo"}
    table = figures["evaluation"]
    assert table["sft"]["win_rate_vs_sft"] == 0.5 and table["sft"]["kl_to_sft"] == 0.0
    assert all({"positive_share", "reward_mean", "win_rate_vs_sft", "kl_to_sft", "bleu"} <= set(row)
               for row in table.values())
    assert (out / "report" / "report.md").is_file() and list((out / "report" / "plots").glob("*.png"))
    assert all(0 <= v <= 1 for v in figures["positive_share"].values())
    loss = figures["held_out_loss"]
    assert loss["sft"] < loss["base"] - 0.1, loss
    err = capsys.readouterr().err
    assert "held-out completion loss on the SFT task" in err and "base:" in err and "sft:" in err


def test_demo_refuses_a_directory_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 2
    assert "not an earlier demo" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"
