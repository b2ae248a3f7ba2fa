"""The Python API: every recipe called as a function in one process, its result read back from the run, the
same run as the command's, the command's checks and errors, generate / evaluate / score / merge, a light import."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import tunelab
from tests.helpers import instruction_rows, make_tiny_model_dir, max_weight_diff, write_jsonl
from tests.recipes.test_reward import review_pairs
from tests.test_contrastive import retrieval_rows
from tunelab import ConfigError, DataError
from tunelab.cli import _recipe_config, main

ROOT = Path(__file__).resolve().parent.parent
FAST = {"train": {"warmup_ratio": 0.0, "log_every": 1, "report": False, "seed": 0}}


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward for the online recipes: longer responses score higher."""
    return [len(r) / 10 for r in responses]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    prompts = [{"prompt": f"Write a review of Film {i}.\n"} for i in range(16)]
    return types.SimpleNamespace(
        root=root, model=make_tiny_model_dir(root / "model"),
        sft=write_jsonl(root / "sft.jsonl", instruction_rows(40)),
        pairs=write_jsonl(root / "pairs.jsonl", review_pairs(24)),
        texts=write_jsonl(root / "texts.jsonl", retrieval_rows(6, 4)),
        prompts=write_jsonl(root / "prompts.jsonl", prompts),
        eval=write_jsonl(root / "eval.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                               for r in review_pairs(4, seed=1)]))


def metrics_file(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_run(result: tunelab.RunResult, output: Path, recipe: str, steps: int) -> None:
    """The result names the run's folder and final/, and holds the last records its metrics.jsonl holds."""
    records = metrics_file(output)
    train = [r for r in records if r.get("split") != "eval"]
    held_out = [r for r in records if r.get("split") == "eval"]
    assert (result.recipe, result.output, result.final, result.steps) == (recipe, output, output / "final", steps)
    assert (result.final / "config.json").is_file() or (result.final / "adapter_config.json").is_file()
    assert result.metrics == train[-1] and result.metrics["step"] == steps
    expected = {k.removeprefix("eval_"): v for k, v in held_out[-1].items() if k != "split"} if held_out else {}
    assert result.eval_metrics == expected
    assert result.history() == records


def test_import_loads_neither_torch_nor_transformers():
    code = ("import sys, tunelab; from tunelab import sft, rm, dpo, kto, ppo, grpo, rloo, generate, evaluate, score, "
            "merge, RunResult, ConfigError; assert callable(evaluate) and callable(sft); "
            "heavy = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def test_sft_through_the_api_is_the_commands_run(world, tmp_path):
    """Flags, a (path, weight) source, a section dict and a dotted key give the run the command gives with the same
    settings; a second call in the process, from the first one's config object, gives the same weights again."""
    settings = dict(max_steps=3, batch_size=4, lr=1e-2)
    api = tunelab.sft(model=world.model, data=[(world.sft, 1.0)], output=tmp_path / "api", quiet=True,
                      train={**FAST["train"], "grad_accum": 2}, **{"lora.r": 4}, **settings)
    check_run(api, tmp_path / "api", "sft", 3)
    assert api.eval_metrics["loss"] > 0 and api.config.lora.r == 4 and api.config.train.grad_accum == 2

    assert main(["sft", "--model", str(world.model), "--data", f"{world.sft}:1.0", "--output", str(tmp_path / "cli"),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "0.01", "--quiet", "train.warmup_ratio=0",
                 "train.log_every=1", "train.report=false", "train.grad_accum=2", "lora.r=4"]) == 0
    assert max_weight_diff(tmp_path / "api", tmp_path / "cli") <= 1e-6
    saved = [yaml.safe_load((tmp_path / run / "config.yaml").read_text()) for run in ("api", "cli")]
    assert {**saved[0], "output": ""} == {**saved[1], "output": ""}  # the same settings, key for key
    assert [r["loss"] for r in metrics_file(tmp_path / "api") if "loss" in r] == \
        [r["loss"] for r in metrics_file(tmp_path / "cli") if "loss" in r]

    again = tunelab.sft(config=api.config, output=tmp_path / "again", quiet=True)
    check_run(again, tmp_path / "again", "sft", 3)
    assert max_weight_diff(tmp_path / "api", tmp_path / "again") <= 1e-6
    assert api.config.output == str(tmp_path / "api")  # the object passed in is left as it was


def test_notebook_flow_sft_merge_dpo_evaluate(world, tmp_path):
    """The README's example: LoRA SFT, merged into a standalone model, DPO from it, then its scores."""
    sft = tunelab.sft(model=world.model, data=world.sft, output=tmp_path / "sft", max_steps=2, batch_size=4,
                      quiet=True, **FAST)
    merged = tunelab.merge(adapter=sft.output, output=tmp_path / "sft-merged")
    assert merged == tmp_path / "sft-merged" and (merged / "model.safetensors").is_file()
    dpo = tunelab.dpo(model=merged, data=world.pairs, output=tmp_path / "dpo", max_steps=2, batch_size=4, quiet=True,
                      dpo={"beta": 0.2}, **FAST)
    check_run(dpo, tmp_path / "dpo", "dpo", 2)
    assert dpo.config.dpo.beta == 0.2 and "reward_accuracy" in dpo.eval_metrics
    scores = tunelab.evaluate(model=dpo.output, data=world.eval, max_new_tokens=4)
    assert scores["n"] == 4 and {"bleu", "rouge1", "perplexity"} <= set(scores)
    assert all(isinstance(v, (int, float)) for v in scores.values())


@pytest.mark.parametrize("recipe, data, extra", [
    ("rm", "pairs", {"peft": "none"}),
    ("kto", "pairs", {"kto": {"beta": 0.2}}),
    ("contrastive", "texts", {"data.eval_fraction": 0.25, "contrastive": {"temperature": 0.1}}),
])
def test_offline_recipes(world, tmp_path, recipe, data, extra):
    result = getattr(tunelab, recipe)(model=world.model, data=getattr(world, data), output=tmp_path / recipe,
                                      max_steps=2, batch_size=4, lr=1e-3, quiet=True, **extra, **FAST)
    check_run(result, tmp_path / recipe, recipe, 2)
    assert "loss" in result.metrics and result.eval_metrics


@pytest.mark.parametrize("recipe, section", [
    ("ppo", {"ppo": {"epochs": 1, "minibatch_size": 4, "sample_every": 0}}),
    ("grpo", {"rl": {"num_generations": 2, "sample_every": 0}}),
    ("rloo", {"rl": {"num_generations": 2, "sample_every": 0}}),
])
def test_online_recipes(world, tmp_path, recipe, section):
    result = getattr(tunelab, recipe)(model=world.model, data=world.prompts, output=tmp_path / recipe,
                                      reward="tests.test_api:length_reward", max_steps=2, batch_size=4, quiet=True,
                                      generation={"max_new_tokens": 4, "min_new_tokens": 1},
                                      **{"data.eval_fraction": 0.0}, **section, **FAST)
    check_run(result, tmp_path / recipe, recipe, 2)
    assert isinstance(result.metrics["score_mean"], float) and result.eval_metrics == {}


def test_generate_and_score_return_rows_and_write_only_when_asked(world, tmp_path, capsys):
    prompts = ["Write a review of Up.\n", {"prompt": "Write a review of Jaws.\n"}]
    rows = tunelab.generate(model=world.model, prompts=prompts, max_new_tokens=4)
    assert [r["prompt"] for r in rows] == ["Write a review of Up.\n", "Write a review of Jaws.\n"]
    assert all(isinstance(r["response"], str) for r in rows)
    assert capsys.readouterr().out == ""  # nothing printed, no file

    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    written = tunelab.generate(model=world.model, prompts=prompts_file, output=tmp_path / "out.jsonl", max_new_tokens=4)
    assert written == rows  # greedy: the same responses from a file as from a list
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == rows

    rm = tunelab.rm(model=world.model, data=world.pairs, output=tmp_path / "rm", max_steps=1, batch_size=4,
                    peft="none", quiet=True, **FAST)
    pairs = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    scored = tunelab.score(model=rm.output, data=pairs)
    assert [r["prompt"] for r in scored] == [p["prompt"] for p in pairs]
    assert main(["score", "--model", str(rm.output), "--data", str(write_jsonl(tmp_path / "pairs.jsonl", pairs)),
                 "--output", str(tmp_path / "scored.jsonl")]) == 0
    by_command = [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in scored] == pytest.approx(by_command, abs=1e-6)


def test_evaluate_returns_what_the_command_writes(world, tmp_path):
    metrics = tunelab.evaluate(model=world.model, data=world.eval, max_new_tokens=4, limit=3,
                               output=tmp_path / "api.json")
    assert metrics["n"] == 3 and "generations" not in metrics
    assert json.loads((tmp_path / "api.json").read_text()) == metrics
    assert len((tmp_path / "api.generations.jsonl").read_text().splitlines()) == 3
    assert main(["eval", "--model", str(world.model), "--data", str(world.eval), "--max-new-tokens", "4", "--limit",
                 "3", "--output", str(tmp_path / "cli.json")]) == 0
    assert json.loads((tmp_path / "cli.json").read_text()) == pytest.approx(metrics)


def test_bad_settings_raise_the_commands_errors_and_never_exit(world, tmp_path):
    """Each is an exception (pytest.raises lets no SystemExit through), raised before a run folder is made."""
    out = tmp_path / "run"
    common = dict(model=world.model, data=world.sft, output=out)
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rank' \(from argument 'lora\.rank'\) "
                                          r"\(did you mean 'lora\.r'\?\)"):
        tunelab.sft(**common, **{"lora.rank": 4})
    with pytest.raises(ConfigError, match=r"unknown config key 'dpo\.betta' \(from argument dpo=\) "
                                          r"\(did you mean 'dpo\.beta'\?\)"):
        tunelab.dpo(**common, dpo={"betta": 0.1})
    with pytest.raises(ConfigError, match=r"tunelab\.sft\(\) has no setting 'max_step' \(did you mean 'max_steps'"):
        tunelab.sft(**common, max_step=2)
    with pytest.raises(ConfigError, match=r"'grad_accum': it is the config key 'train\.grad_accum'"):
        tunelab.sft(**common, grad_accum=2)
    with pytest.raises(ConfigError, match=r"max_steps=0: must be 1 or more, got 0"):
        tunelab.sft(**common, max_steps=0)
    with pytest.raises(ConfigError, match=r"peft='lorax': expected one of lora, qlora, prompt, none"):
        tunelab.sft(**common, peft="lorax")
    with pytest.raises(ConfigError, match=r"config value 'train\.lr' \(from argument train=\): Input should be "
                                          r"greater than 0"):
        tunelab.sft(**common, train={"lr": -1})
    with pytest.raises(ConfigError, match=r"config= is a DPOConfig; sft takes SFTConfig, a dict"):
        tunelab.sft(config=tunelab.api.DPOConfig())
    with pytest.raises(ConfigError, match=r"tunelab\.sft\(\) needs output="):
        tunelab.sft(model=world.model, data=world.sft)
    with pytest.raises(DataError, match="data file not found"):
        tunelab.sft(model=world.model, data=tmp_path / "missing.jsonl", output=out)
    assert not out.exists()  # the failed start left nothing behind
    with pytest.raises(ConfigError, match=r"top_p=2: must be at most 1"):
        tunelab.generate(model=world.model, prompts=["Hi"], top_p=2)
    with pytest.raises(ConfigError, match=r"tunelab\.generate\(\) needs model="):
        tunelab.generate(prompts=["Hi"])
    with pytest.raises(ConfigError, match=r"has no setting 'max_tokens' \(did you mean 'max_new_tokens'"):
        tunelab.evaluate(model=world.model, data=world.eval, max_tokens=4)
    with pytest.raises(DataError, match="no single prompt"):
        tunelab.generate(model=world.model, prompts=world.pairs)


def test_errors_name_settings_as_both_the_api_and_the_command_line_take_them(world, tmp_path, capsys):
    """The same message through tunelab.generate() / tunelab.sft() and through the command line."""
    from tunelab.checkpoint import RunDirError

    too_long = r"min_new_tokens \(--min-new-tokens\) 9 is more than max_new_tokens \(--max-new-tokens\) 4"
    with pytest.raises(ConfigError, match=too_long):
        tunelab.generate(model=world.model, prompts=["Hi"], min_new_tokens=9, max_new_tokens=4)
    assert main(["generate", "--model", str(world.model), "--prompts", str(world.eval), "--min-new-tokens", "9",
                 "--max-new-tokens", "4"]) == 2
    assert re.search(too_long, capsys.readouterr().err)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    occupied = (r"already holds files; pass resume=True \(--resume\) to continue that run, overwrite=True "
                r"\(--overwrite\) to replace it, or choose another output \(--output\)")
    with pytest.raises(RunDirError, match=occupied):
        tunelab.sft(model=world.model, data=world.sft, output=out)
    assert main(["sft", "--model", str(world.model), "--data", str(world.sft), "--output", str(out)]) == 2
    assert re.search(occupied, capsys.readouterr().err) and (out / "notes.txt").read_text() == "keep me"


def test_interrupt_saves_a_checkpoint_raises_and_resumes(world, tmp_path, monkeypatch):
    """Ctrl-C (a notebook's interrupt) during a call: the step ends with a checkpoint, KeyboardInterrupt reaches
    the caller, and the same call with resume=True finishes the run."""
    import tunelab.recipes.sft as sft_module

    real, calls = sft_module.sft_step, {"n": 0}

    def interrupted_step(module, batch):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(module, batch)

    monkeypatch.setattr(sft_module, "sft_step", interrupted_step)
    settings = dict(model=world.model, data=world.sft, output=tmp_path / "run", max_steps=3, batch_size=4,
                    quiet=True, **FAST)
    with pytest.raises(KeyboardInterrupt):
        tunelab.sft(**settings)
    assert (tmp_path / "run" / "checkpoints" / "step-1").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is the caller's again
    resumed = tunelab.sft(**settings, resume=True)
    check_run(resumed, tmp_path / "run", "sft", 3)


SAMPLE_FLAGS = {"model": "m", "data": [{"path": "d.jsonl", "weight": 0.5}], "eval_data": [{"path": "e.jsonl"}],
                "output": "o", "max_steps": 3, "epochs": 2.0, "lr": 1e-3, "batch_size": 2, "peft": "none", "ref": "r",
                "reward": "pkg.mod:fn", "report_to": ["tensorboard,wandb", "mlflow"]}


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo", "contrastive"])
def test_every_flag_of_the_command_sets_the_same_key_through_the_api(command):
    from tunelab import api

    flags = api.command_flags(command)
    settings = [name for name in flags if name not in (*api.RUN_OPTIONS, *api.LAYERS)]
    unknown = [name for name in settings if name not in api.RECIPE_FLAGS or name not in SAMPLE_FLAGS]
    assert not unknown, f"flags of tunelab {command} the API does not know: {unknown}"
    cls = {"sft": api.SFTConfig, "rm": api.RMConfig, "dpo": api.DPOConfig, "kto": api.KTOConfig,
           "ppo": api.PPOConfig, "grpo": api.GRPOConfig, "rloo": api.RLOOConfig,
           "contrastive": api.ContrastiveConfig}[command]
    args = argparse.Namespace(**{name: action.default for name, action in flags.items()})
    for name in settings:
        setattr(args, name, SAMPLE_FLAGS[name])
    by_api, _ = api.recipe_config(command, cls, {name: SAMPLE_FLAGS[name] for name in settings})
    assert by_api.model_dump() == _recipe_config(cls, args).model_dump()


def test_progress_bar_is_drawn_in_a_notebook_kernel(monkeypatch):
    """A Jupyter kernel's stderr is no terminal; the bar is drawn there all the same (tqdm.auto: a widget)."""
    from tunelab.loop import Progress

    assert Progress(3, 0, quiet=False, log_every=1, desc="t").bar is None  # pytest's captured stderr
    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    progress = Progress(3, 0, quiet=False, log_every=1, desc="t")
    assert progress.bar is not None and progress.bar.total == 3
    progress.close()
    assert Progress(3, 0, quiet=True, log_every=1, desc="t").bar is None
