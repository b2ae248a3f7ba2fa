"""Every training command's --help states the defaults its config really has, and help is fast (no torch)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tunelab.cli import build_parser
from tunelab.config import (ContrastiveConfig, DPOConfig, DPOSection, DataSource, GRPOConfig, KTOConfig, PPOConfig,
                            RLOOConfig, RMConfig, SFTConfig)

COMMANDS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "kto": KTOConfig, "ppo": PPOConfig,
            "grpo": GRPOConfig, "rloo": RLOOConfig, "contrastive": ContrastiveConfig}
KEY_LINE = re.compile(r"^  (\S+)\s+(.*) \[default: (.*)\]$")


def help_text(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sub.format_help()


def key_rows(text: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in text.splitlines():
        match = KEY_LINE.match(line)
        if match:
            rows[match[1]] = (match[2], match[3])
    return rows


def config_default(cls, key: str):
    if key.startswith("data.sources.N."):
        field = DataSource.model_fields[key.rsplit(".", 1)[1]]
        return "required" if field.is_required() else field.default
    node = cls().model_dump()
    for part in key.split("."):
        node = node[part]
    return node


def stated_lrs(text: str) -> dict[str, float]:
    """{peft method: lr} from 'default 5e-05 with peft=lora or qlora; 5e-07 with peft=none'."""
    found = {}
    for value, methods in re.findall(r"([0-9.e+-]+) with peft=((?:\w+(?: or )?)+)", text):
        for method in methods.split(" or "):
            found[method] = float(value)
    return found


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_states_the_config_defaults(command):
    cls = COMMANDS[command]
    text = help_text(command)
    rows = key_rows(text)
    assert len(rows) > 30
    for key, (_, stated) in rows.items():
        expected = config_default(cls, key)
        if isinstance(expected, tuple):
            expected = list(expected)
        value = stated if stated == "required" else yaml.safe_load(
            stated.replace("None", "null").replace("True", "true").replace("False", "false").replace("(", "[")
            .replace(")", "]"))
        assert value == expected, f"{command} --help says {key} defaults to {stated}, the config has {expected!r}"
    assert rows["data.sources.N.format"][1] == "'auto'"
    actual_lrs = {p: cls(peft=p).resolved_lr() for p in ("lora", "qlora", "prompt", "none")}
    flat = " ".join(text.split())
    flag_lr = re.search(r"--lr LR peak learning rate \(train\.lr; default (.*?)\)", flat)[1]
    assert stated_lrs(flag_lr) == actual_lrs
    assert stated_lrs(rows["train.lr"][0]) == actual_lrs
    train = cls().train
    assert float(re.search(r"train\.epochs; default ([0-9.]+)", flat)[1]) == train.epochs
    assert int(re.search(r"train\.batch_size; default (\d+)", flat)[1]) == train.batch_size


def test_preference_and_rl_commands_do_not_state_sft_learning_rates():
    assert stated_lrs(" ".join(help_text("dpo").split()))["lora"] == 5e-5
    ppo = " ".join(help_text("ppo").split())
    assert "2e-4" not in ppo and "0.0002" not in ppo
    assert re.search(r"--max-steps MAX_STEPS iterations to run", ppo)
    assert re.search(r"--batch-size BATCH_SIZE prompts per iteration", ppo)
    assert "ppo.minibatch_size rollouts" in ppo
    grpo = " ".join(help_text("grpo").split())
    assert "each sampled rl.num_generations times" in grpo


def test_dpo_beta_help_matches_each_loss_default():
    text = DPOSection.model_fields["beta"].description
    stated = re.findall(r"(?:^|; )([\w/]+): .*?default ([0-9.]+)\)", text)
    assert len(stated) == 3
    for losses, value in stated:
        for loss in losses.split("/"):
            assert DPOSection(loss=loss).resolved_beta() == float(value), loss


def test_save_every_zero_is_documented_as_no_checkpoints():
    rows = key_rows(help_text("sft"))
    assert rows["train.save_every"][1] == "0"
    assert "0: no checkpoints, only final/" in rows["train.save_every"][0]


PROBE = """
import sys, io, contextlib
from tunelab.cli import main
out = io.StringIO()
for argv in {argvs!r}:
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 0, (argv, stop.code)
assert "torch" not in sys.modules, "torch was imported"
assert "transformers" not in sys.modules, "transformers was imported"
print(out.getvalue())
"""


def test_help_and_version_do_not_import_torch():
    argvs = [["--version"], ["--help"]] + [[c, "--help"] for c in [*COMMANDS, "generate", "chat", "eval", "score",
                                                                      "merge", "export", "inspect", "demo", "label"]]
    done = subprocess.run([sys.executable, "-c", PROBE.format(argvs=argvs)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    from tunelab import __version__

    assert f"tunelab {__version__}" in done.stdout
    assert "usage: tunelab ppo" in done.stdout
