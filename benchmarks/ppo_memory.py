"""Peak memory of PPO's model roles: one shared base (tunelab with LoRA) against separate models.

    python benchmarks/ppo_memory.py [--hidden 512 --layers 8 --vocab 32000 --batch 8 --length 128]

Each layout runs in its own process (peak RSS is per process), builds a Llama-style model at random,
and does what one PPO minibatch needs: reference log-probs, then a policy + value forward and backward.

  shared:   one base; policy = LoRA adapter, value = scalar head on the same trunk, reference = the
            base with the adapter disabled (what `tunelab ppo` does with LoRA)
  separate: a LoRA policy on its own base, a frozen reference copy, and a critic copy with a value
            head trained in full (the layout of trainers that load one model per role)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8, intermediate_size=args.hidden * 8 // 3, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def lora(model):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))


def _peak_kib() -> int:
    """High-water RSS of this process since exec (ru_maxrss would include the parent's at fork time)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_layout(layout: str, args) -> dict:
    from tunelab.logprobs import token_logprobs
    from tunelab.recipes.ppo import PolicyWithValueHead

    ids = torch.randint(3, args.vocab, (args.batch, args.length))
    attention = torch.ones_like(ids)
    mask = attention.clone()
    mask[:, : args.length // 2] = 0  # second half is the "response"
    baseline = _peak_kib()
    if layout == "shared":
        module = PolicyWithValueHead(lora(build(args)))
        with torch.no_grad(), module.policy.disable_adapter():
            token_logprobs(module.policy, ids, attention, mask)
        logprobs, values, _ = module(ids, attention, mask)
        (logprobs.sum() + values.sum()).backward()
    else:
        policy = lora(build(args))
        reference = build(args).requires_grad_(False)
        critic = PolicyWithValueHead(build(args))
        with torch.no_grad():
            token_logprobs(reference, ids, attention, mask)
        token_logprobs(policy, ids, attention, mask).sum().backward()
        critic(ids, attention, mask)[1].sum().backward()
    peak = _peak_kib()
    return {"layout": layout, "peak_rss_mib": round(peak / 1024, 1), "before_models_mib": round(baseline / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layout", choices=("shared", "separate"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout:
        print(json.dumps(run_layout(args.layout, args)))
        return
    rows = []
    for layout in ("shared", "separate"):
        out = subprocess.run([sys.executable, __file__, "--layout", layout, *sys.argv[1:]], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    shared, separate = rows
    for row in rows:
        print(f"{row['layout']:>9}: peak RSS {row['peak_rss_mib']:,.0f} MiB")
    print(f"shared / separate: {shared['peak_rss_mib'] / separate['peak_rss_mib']:.2f} "
          f"(saves {separate['peak_rss_mib'] - shared['peak_rss_mib']:,.0f} MiB)")


if __name__ == "__main__":
    main()
