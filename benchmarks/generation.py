"""Where a rollout's generation time goes: `model.generate` against the bare forward passes it is made of.

    python benchmarks/generation.py [--quick] [--batch 8] [--tokens 64] [--repeats 3] [--threads 2]

On the benchmark world's policy (world.py; built if missing) and PPO prompts, samples one batch of responses the
way tunelab's rollouts do (left-padded prompts, KV cache, temperature 0.7, a fixed response length) in five ways:

- `generate`: transformers' `generate` with its default dynamic cache (which concatenates at every token);
- `generate reserved`: the same with tunelab's reserved cache (`tunelab.rollout.reserved_cache`: one buffer per
  layer with room for the response), as tunelab's rollouts call it;
- `generate static`: the same with `cache_implementation="static"` (a preallocated cache);
- `loop`: a plain decoding loop: one prefill forward, then one forward per token on the dynamic cache, sampling
  with `torch.multinomial`; no logits processors, no stopping criteria: the floor `generate` adds its work to;
- `forward only`: the loop's forward passes alone, fed the tokens `generate` sampled, without sampling.

Prints seconds per batch (best of --repeats), milliseconds per new token and `generate`'s overhead over the loop,
and checks that the three `generate` variants give the same tokens for the same seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import world as world_module  # noqa: E402

TEMPERATURE = 0.7


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick world (the model is the same; fewer rows)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch (default 8, the benchmark's)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per response (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way; the best counts (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--world", default=str(HERE / ".world"), help="directory of the generated worlds")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from tunelab.rollout import left_padded, reserved_cache

    torch.set_num_threads(args.threads)
    size_name = "quick" if args.quick else "full"
    paths = world_module.build(Path(args.world) / size_name, world_module.QUICK if args.quick else world_module.FULL)
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    model = AutoModelForCausalLM.from_pretrained(paths["policy"]).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(paths["ppo"]).read_text().splitlines()][:args.batch]
    encoded = left_padded(tokenizer, prompts, torch.device("cpu"))
    prompt_length = encoded["input_ids"].shape[1]
    common = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True, temperature=TEMPERATURE,
                  top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    @torch.no_grad()
    def generate(**extra):
        torch.manual_seed(0)
        return model.generate(**encoded, **common, **extra)[:, prompt_length:]

    @torch.no_grad()
    def loop(fed: torch.Tensor | None = None):
        """Prefill, then one forward per token; samples unless `fed` gives the tokens."""
        torch.manual_seed(0)
        cache = DynamicCache()
        mask = encoded["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = []
        for step in range(args.tokens):
            logits = out.logits[:, -1].float()
            if fed is None:
                token = torch.multinomial(torch.softmax(logits / TEMPERATURE, -1), 1)
            else:
                token = fed[:, step:step + 1]
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
        return torch.cat(tokens, 1)

    generate()  # warm-up
    figures = {}
    figures["generate"], dynamic = best_of(args.repeats, generate)
    figures["generate reserved"], reserved = best_of(args.repeats,
                                                     lambda: generate(**reserved_cache(model, args.tokens)))
    figures["generate static"], static = best_of(args.repeats, lambda: generate(cache_implementation="static"))
    figures["loop"], _ = best_of(args.repeats, loop)
    figures["forward only"], _ = best_of(args.repeats, lambda: loop(fed=dynamic))
    same = bool(torch.equal(dynamic, static) and torch.equal(dynamic, reserved))
    print(f"policy {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; batch {args.batch}, prompts "
          f"left-padded to {prompt_length} tokens, {args.tokens} new tokens each; {args.threads} threads; best of "
          f"{args.repeats}\n")
    print("| way | seconds per batch | ms per new token | against the loop |")
    print("|---|---|---|---|")
    for name, seconds in figures.items():
        print(f"| {name} | {seconds:.3f} | {1000 * seconds / args.tokens:.1f} | "
              f"{seconds / figures['loop']:.2f}x |")
    print(f"\nthe three generate variants give the same tokens for one seed: {same}")


if __name__ == "__main__":
    main()
