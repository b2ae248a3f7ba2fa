"""The Python API: each command of `tunelab` as a function that takes the command's settings and returns its
result instead of printing it.

    import tunelab

    run = tunelab.sft(model="./base", data="train.jsonl", output="runs/sft", max_steps=200, lora={"r": 16})
    run.final                    # runs/sft/final
    run.metrics["loss"]          # the last training record of runs/sft/metrics.jsonl
    run.eval_metrics["loss"]     # the last held-out record

A function's keyword arguments are its command's flags (`--max-steps N` is `max_steps=N`; see `tunelab COMMAND
--help`), read and checked by the same code, and, for the training functions, every config key: a section as a
dict (`train={"grad_accum": 2}`), a dotted key (`**{"lora.r": 16}`), `key=value` text in `overrides=[...]`, and
a YAML file or a config object (`SFTConfig(...)`) in `config=`. Layers are applied as on the command line, later
ones winning: `config=`, the flags, sections and dotted keys, `overrides`. A bad setting raises the command's
error (a `ConfigError` naming the key, where it was set, and a suggestion) before any model is loaded. Nothing
here ends the process: every failure is an exception, and Ctrl-C (a notebook's interrupt) stops a training run
after its current step, saves a checkpoint and raises `KeyboardInterrupt` (pass `resume=True` to continue).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunelab import cli
from tunelab.config import (ConfigError, ContrastiveConfig, DPOConfig, GRPOConfig, KTOConfig, PPOConfig,
                            RLOOConfig, RMConfig, SFTConfig, build_config, describe_fields, flatten)

# the flags of the training commands and the config key each one sets (tunelab.cli._recipe_config)
RECIPE_FLAGS = {"model": "model.name_or_path", "data": "data.sources", "eval_data": "data.eval_sources",
                "output": "output", "max_steps": "train.max_steps", "epochs": "train.epochs", "lr": "train.lr",
                "batch_size": "train.batch_size", "peft": "peft", "ref": "ref", "reward": "reward.source",
                "report_to": "train.report_to"}
RUN_OPTIONS = ("resume", "overwrite", "allow_changes", "quiet")  # how to run, not what: no config key
LAYERS = ("config", "overrides")


@dataclass
class RunResult:
    """What a training function returns.

    `metrics` is the last training record of the run's metrics.jsonl as written there (`step`, `loss`, `lr`,
    ...; for ppo, grpo and rloo an iteration's `score_mean`, `kl`, ...), `eval_metrics` the last held-out
    record with its `eval_` prefixes dropped (`loss`, `accuracy`, ...; empty without held-out rows). `steps`
    counts optimizer steps (iterations for ppo, grpo and rloo), a resumed run's earlier ones included.
    """

    recipe: str
    output: Path
    final: Path
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    config: BaseModel | None = field(default=None, repr=False)

    def history(self) -> list[dict]:
        """Every record of the run's metrics.jsonl, training and held-out, in order (e.g. for a DataFrame)."""
        from tunelab.jsonlog import read_jsonl

        path = self.output / "metrics.jsonl"
        return read_jsonl(path, warn=False) if path.is_file() else []


@functools.lru_cache(maxsize=None)
def _commands() -> dict[str, argparse.ArgumentParser]:
    """The parser of each `tunelab COMMAND`: the API reads its flags, types, defaults and help from there."""
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def command_flags(command: str) -> dict[str, argparse.Action]:
    """The flags (and positional arguments) of `tunelab COMMAND`, by their Python name (`max_steps`)."""
    return {a.dest: a for a in _commands()[command]._actions if a.dest != "help"}


def _description(command: str) -> str:
    return _commands()[command].description or ""


def _plain(value: Any) -> Any:
    """Paths as text, all the way down (config fields hold strings)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _flag_value(command: str, name: str, action: argparse.Action, value: Any) -> Any:
    """`value` for flag `name`, checked and converted by the flag's own type and choices, as on the command line."""
    value = _plain(value)
    where = f"tunelab.{command}(): {name}={value!r}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected True or False")
        return value
    if value is None:
        return None
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_flag_item(where, action, item) for item in items]
    if isinstance(value, (list, tuple, dict)) and action.nargs is None:
        raise ConfigError(f"{where}: expected one value, got a {type(value).__name__}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, action.choices))}")
    if action.type is not None and isinstance(value, (str, int, float)):
        try:
            return action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return value


def _flag_item(where: str, action: argparse.Action, item: Any) -> Any:
    """One value of a repeatable flag: text as the command line reads it (`--data PATH[:WEIGHT]`), a
    `(path, weight)` pair, or a dict of the config's own keys."""
    if isinstance(item, tuple) and len(item) == 2:
        return {"path": item[0], "weight": item[1]}
    if isinstance(item, str) and action.type is not None:
        try:
            return action.type(item)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if isinstance(item, (str, dict)):
        return item
    raise ConfigError(f"{where}: expected a path, a (path, weight) pair or a dict, got {type(item).__name__}")


def _unknown(command: str, name: str, known: list[str], cls: type[BaseModel] | None = None) -> ConfigError:
    """The error for an argument that is no flag and no config key, with the nearest names as suggestions."""
    message = f"tunelab.{command}() has no setting '{name}'"
    keys = [key for key, _, _ in describe_fields(cls)] if cls is not None else []
    leaves = [key for key in keys if key.rsplit(".", 1)[-1] == name]
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if leaves:  # a config key given without its section, e.g. grad_accum=2 for train.grad_accum
        top = leaves[0].split(".")[0]
        return ConfigError(f"{message}: it is the config key '{leaves[0]}' (pass {top}={{...}} or "
                           f"**{{'{leaves[0]}': ...}})")
    if hint:
        return ConfigError(f"{message} (did you mean '{hint[0]}'?)")
    return ConfigError(f"{message}; known: {', '.join(known)}")


def _put(settings: dict[str, tuple[Any, str]], key: str, value: Any, where: str) -> None:
    """Set a dotted key, replacing what an earlier layer set there (a section's keys included)."""
    for existing in [k for k in settings if k == key or k.startswith(key + ".")]:
        del settings[existing]
    settings[key] = (value, where)


def recipe_config(command: str, cls: type[BaseModel], arguments: dict[str, Any]) -> tuple[BaseModel, dict]:
    """The config of a training function's call (built and checked as the command builds it from its flags),
    and the run options (resume, overwrite, allow_changes, quiet)."""
    flags = command_flags(command)
    arguments = dict(arguments)
    options = {name: _flag_value(command, name, flags[name], arguments.pop(name)) for name in RUN_OPTIONS
               if name in arguments}
    base, overrides = arguments.pop("config", None), arguments.pop("overrides", None)
    settings: dict[str, tuple[Any, str]] = {}
    yaml_path = None
    if isinstance(base, BaseModel):
        if type(base) is not cls:
            raise ConfigError(f"tunelab.{command}(): config= is a {type(base).__name__}; {command} takes "
                              f"{cls.__name__}, a dict of config keys or a YAML file")
        for key, value in flatten(base.model_dump()).items():
            _put(settings, key, value, "in config=")
    elif isinstance(base, dict):
        for key, value in flatten(_plain(base)).items():
            _put(settings, key, value, "in config=")
    elif isinstance(base, (str, os.PathLike)):
        yaml_path = os.fspath(base)
    elif base is not None:
        raise ConfigError(f"tunelab.{command}(): config= must be a {cls.__name__}, a dict or a YAML file, "
                          f"got {type(base).__name__}")
    if isinstance(overrides, str):
        overrides = [overrides]
    if overrides is not None and not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"tunelab.{command}(): overrides= must be key=value texts such as 'lora.r=16'")

    fields = cls.model_fields
    later = {}
    for name, value in arguments.items():
        is_flag = name in RECIPE_FLAGS and name in flags
        as_section = isinstance(value, dict) and name in fields and not (name == "data" and "path" in value)
        if is_flag and not as_section:
            if value is not None:  # None: not given, as a flag left out
                _put(settings, RECIPE_FLAGS[name], _flag_value(command, name, flags[name], value),
                     f"from argument {name}=")
        elif "." in name or name in fields:
            later[name] = value
        else:
            known = [n for n in flags if n in RECIPE_FLAGS] + list(RUN_OPTIONS) + list(LAYERS) + list(fields)
            raise _unknown(command, name, list(dict.fromkeys(known)), cls)
    for name, value in later.items():  # sections and dotted keys come after the flags, like key=value
        value = _plain(value)
        if isinstance(value, dict) and "." not in name and name in fields:
            for key, leaf in flatten(value, f"{name}.").items():
                _put(settings, key, leaf, f"from argument {name}=")
        else:
            _put(settings, name, value, f"from argument '{name}'" if "." in name else f"from argument {name}=")
    config = build_config(cls, yaml_path=yaml_path, settings=settings, overrides=overrides)
    if not config.output:
        raise ConfigError(f"tunelab.{command}() needs output= (the run folder to write)")
    return config, options


@contextlib.contextmanager
def quiet_libraries():
    """Within the block, transformers draws no bars of its own (loading weights) and its deprecation chatter is
    hidden, as under the command; both settings are as they were afterwards, for the rest of the notebook."""
    import warnings

    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _run_result(command: str, config: BaseModel, result) -> RunResult:
    """A recipe's result, with the last records of the metrics.jsonl it wrote."""
    from tunelab.jsonlog import read_jsonl

    output = Path(result.run_dir)
    records = read_jsonl(output / "metrics.jsonl", warn=False) if (output / "metrics.jsonl").is_file() else []
    train = [r for r in records if r.get("split") != "eval"]
    held_out = [r for r in records if r.get("split") == "eval"]
    evals = {k.removeprefix("eval_"): v for k, v in held_out[-1].items() if k != "split"} if held_out else {}
    steps = result.train.steps if hasattr(result, "train") else result.iterations
    return RunResult(command, output, Path(result.final_dir), steps, dict(train[-1]) if train else {}, evals,
                     config)


SETTINGS_DOC = """
Keyword arguments: the flags above by their Python names (`max_steps=`; `data=` a path, `PATH:WEIGHT`, a
`(path, weight)` pair, a dict of data-source keys, or a list of them), any config section as a dict
(`train={"grad_accum": 2}`) or dotted key (`**{"lora.r": 16}`), `overrides=["key=value", ...]`, and
`config=` a YAML file or a config object. Returns a `tunelab.RunResult` (output, final, steps, metrics,
eval_metrics, config). Raises `ConfigError` for a bad setting before any model is loaded.
"""


def _recipe(command: str, cls: type[BaseModel], module: str, function: str):
    """The function that runs `tunelab COMMAND`: same settings, a RunResult back."""
    def run(**arguments) -> RunResult:
        from tunelab import allocator
        from tunelab.runner import run_recipe

        config, options = recipe_config(command, cls, arguments)
        allocator.tune()  # as the command does; setting it again is harmless
        with quiet_libraries():
            return _run_result(command, config, run_recipe(module, function, config, **options))

    run.__name__ = run.__qualname__ = command
    run.__doc__ = f"Run `tunelab {command}` and return its RunResult.\n\n{_description(command)}\n{SETTINGS_DOC}"
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=action.default)
              for name, action in command_flags(command).items()]
    run.__signature__ = inspect.Signature(params + [inspect.Parameter("settings", inspect.Parameter.VAR_KEYWORD)],
                                          return_annotation=RunResult)
    return run


sft = _recipe("sft", SFTConfig, "tunelab.recipes.sft", "run_sft")
rm = _recipe("rm", RMConfig, "tunelab.recipes.reward", "run_rm")
dpo = _recipe("dpo", DPOConfig, "tunelab.recipes.dpo", "run_dpo")
kto = _recipe("kto", KTOConfig, "tunelab.recipes.kto", "run_kto")
ppo = _recipe("ppo", PPOConfig, "tunelab.recipes.ppo", "run_ppo")
grpo = _recipe("grpo", GRPOConfig, "tunelab.recipes.grpo", "run_grpo")
rloo = _recipe("rloo", RLOOConfig, "tunelab.recipes.grpo", "run_rloo")
contrastive = _recipe("contrastive", ContrastiveConfig, "tunelab.recipes.contrastive", "run_contrastive")


def command_arguments(command: str, arguments: dict[str, Any]) -> argparse.Namespace:
    """The arguments of a call as the command's parsed flags: defaults filled in, each value checked and
    converted by its flag's type, the required ones demanded."""
    flags = command_flags(command)
    parsed = argparse.Namespace(**{name: action.default for name, action in flags.items()})
    for name, value in arguments.items():
        if name not in flags:
            raise _unknown(command, name, list(flags))
        setattr(parsed, name, _flag_value(command, name, flags[name], value))
    missing = [name for name, action in flags.items() if action.required and getattr(parsed, name) is None]
    if missing:
        raise ConfigError(f"tunelab.{command}() needs {', '.join(f'{name}=' for name in missing)}")
    return parsed


def _rows_command(command: str, arguments: dict, name: str, key: str):
    """(parsed arguments, rows, whether they were given in memory) of a command whose `name=` is a file or a list
    of rows (texts standing for `{key: text}`); the output file is checked before anything is read."""
    from tunelab.safety import check_output_file

    value = arguments.get(name)
    given = isinstance(value, (list, tuple))
    parsed = command_arguments(command, {**arguments, name: "(rows)"} if given else arguments)
    check_output_file(parsed.output, flag="output=", inputs=() if given else (getattr(parsed, name),))
    return parsed, _rows(list(value), name, key) if given else None


def _write_rows(rows: list[dict], output: str | None) -> list[dict]:
    """`rows`, also written to `output` as JSONL when it is given."""
    if output:
        import json

        from tunelab.checkpoint import write_output

        write_output("".join(json.dumps(row) + "\n" for row in rows), output)
    return rows


def _rows(values: list, name: str, key: str):
    """In-memory rows (dicts, or texts standing for `{key: text}`) as rows read from a file."""
    from tunelab.data.load import Row

    rows = []
    for i, value in enumerate(values):
        if isinstance(value, str):
            value = {key: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}[{i}]: expected a text or a dict of columns, got {type(value).__name__}")
        rows.append(Row(f"{name}[{i}]", value))
    if not rows:
        raise ConfigError(f"{name}= is an empty list")
    return rows


def _signed(command: str, returns: str, lists: str = ""):
    """Give a tool function the signature of `tunelab COMMAND`'s flags, and the command's help after its own."""
    def sign(function):
        function.__doc__ = (f"{function.__doc__}\n\n{_description(command)}\n\nKeyword arguments: the command's "
                            f"flags by their Python names (`max_new_tokens=`), checked as the command checks them."
                            f"{lists} Returns {returns}.")
        params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                    default=inspect.Parameter.empty if action.required else action.default)
                  for name, action in command_flags(command).items()]
        function.__signature__ = inspect.Signature(params)
        return function
    return sign


@_signed("generate", "a list of {prompt, response} dicts (written to a file only with output=)",
         " `prompts=` is a file, or a list of prompt texts or row dicts.")
def generate(**arguments) -> list[dict]:
    """Generate a response for every prompt, as `tunelab generate` does."""
    from tunelab.data.formats import to_examples
    from tunelab.generation import generate_rows, prompt_examples

    parsed, rows = _rows_command("generate", arguments, "prompts", "prompt")
    options = cli._generation_options(parsed)
    examples = to_examples(rows, "auto", "prompts")[1] if rows is not None else prompt_examples(parsed.prompts)
    with quiet_libraries():
        return _write_rows(generate_rows(parsed.model, examples, options), parsed.output)


@_signed("eval", "the metrics as one flat dict (output=R.json also writes R.json, R.md and R.generations.jsonl)")
def evaluate(**arguments) -> dict:
    """Generate for the prompts of `data=` and compute every metric the inputs allow, as `tunelab eval` does."""
    from tunelab.evaluation import markdown_table, run_eval, save_eval
    from tunelab.safety import check_output_file

    parsed = command_arguments("eval", arguments)
    options = cli._generation_options(parsed)
    paths = cli.eval_output_paths(parsed.output) if parsed.output else {}
    for path in paths.values():
        check_output_file(path, flag="output=", inputs=(parsed.data,))
    with quiet_libraries():
        results = run_eval(parsed.model, parsed.data, reward=parsed.reward, compare=parsed.compare,
                           reference=parsed.ref, options=options, few_shot=parsed.few_shot, limit=parsed.limit)
    generations = results.pop("generations")
    if paths:
        save_eval(paths, results, generations, markdown_table({Path(parsed.model).name or parsed.model: results}))
    return results


@_signed("score", "the rows with `reward` added (written to a file only with output=)",
         " `data=` is a file, or a list of row dicts.")
def score(**arguments) -> list[dict]:
    """Score rows with a reward model, as `tunelab score` does."""
    from tunelab.data.load import load_rows
    from tunelab.scoring import score_rows

    parsed, rows = _rows_command("score", arguments, "data", "text")
    with quiet_libraries():
        return _write_rows(score_rows(parsed.model, rows if rows is not None else load_rows(parsed.data),
                                      parsed.batch_size), parsed.output)


@_signed("merge", "the merged model's folder")
def merge(**arguments) -> Path:
    """Fold a LoRA adapter into its base model, as `tunelab merge` does."""
    from tunelab.modeling import merge_adapter

    parsed = command_arguments("merge", arguments)
    with quiet_libraries():
        return Path(merge_adapter(parsed.adapter, parsed.output, overwrite=parsed.overwrite))
