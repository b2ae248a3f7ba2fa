"""Contrastive fine-tuning of an embedding model on (anchor, positive[, hard negatives]) pairs.

What is specific here: the model role (a transformer body without a head, pooled into one vector per
text), batches of three roles (anchors, positives, hard negatives) with duplicate positives masked,
the InfoNCE loss over in-batch negatives, optional gradient caching, and retrieval metrics on
held-out pairs before and after training.

Negatives are per process and per batch: with N processes each batch of B rows has its own B - 1
in-batch negatives, and the gradient equals one process running those N batches as grad_accum
micro-batches (the loop's rule). A batch is never split into micro-batches by
train.micro_batch_tokens (that would shrink the pool of negatives); contrastive.grad_cache_chunk is
the memory lever instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import distributed
from tunelab.checkpoint import atomic_dir
from tunelab.config import ConfigError, ContrastiveConfig
from tunelab.data.batching import pad_batch
from tunelab.data.dataset import TokenizedData
from tunelab.data.pairs import TextPair, is_encoder_tokenizer, prepare_pair_data
from tunelab.embed import (EmbeddingModule, check_pad_token, embed_ids, load_encoder_body, resolve_pooling,
                           retrieval_metrics, write_embedding_files)
from tunelab.loop import TrainResult, _append_metrics
from tunelab.losses import info_nce_loss
from tunelab.recipes.common import log, prepare_recipe, train_recipe
from tunelab.runlock import releasing
from tunelab.trackers import tracked

ROLES = ("anchor", "positive", "negative")


@dataclass
class ContrastiveResult:
    run_dir: Path
    final_dir: Path
    train: TrainResult
    data: TokenizedData
    before: dict[str, float]
    after: dict[str, float]


def collate_text_pairs(pairs: list[TextPair], pad_id: int) -> dict:
    """Anchors `[B, T_a]`, positives `[B, T_p]` and every row's hard negatives `[M, T_n]` (each role padded
    on its own), and `exclude` `[B, B + M]`: True where a candidate has the same tokens as the row's
    positive (a duplicate is not a negative)."""
    texts = {"anchor": [p.anchor for p in pairs], "positive": [p.positive for p in pairs],
             "negative": [n for p in pairs for n in p.negatives]}
    batch: dict = {}
    for role, sequences in texts.items():
        if sequences:
            padded = pad_batch(sequences, [[0] * len(s) for s in sequences], pad_id)
            batch[f"{role}_ids"], batch[f"{role}_mask"] = padded["input_ids"], padded["attention_mask"]
    candidates = [tuple(s) for s in texts["positive"] + texts["negative"]]
    batch["exclude"] = torch.tensor([[j != i and c == tuple(p) for j, c in enumerate(candidates)]
                                     for i, p in enumerate(texts["positive"])])
    batch["n_items"] = len(pairs)
    batch["n_tokens"] = sum(int(batch[f"{r}_mask"].sum()) for r in ROLES if f"{r}_mask" in batch)
    return batch


def _chunks(batch: dict, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) pieces of at most `size` texts, role by role, each cut to its own longest row."""
    pieces = []
    for role in ROLES:
        if f"{role}_ids" not in batch:
            continue
        ids, mask = batch[f"{role}_ids"], batch[f"{role}_mask"]
        for start in range(0, ids.shape[0], size):
            piece_mask = mask[start:start + size]
            width = int(piece_mask.sum(1).max())
            pieces.append((ids[start:start + size, :width], piece_mask[:, :width]))
    return pieces


class _Replay(torch.autograd.Function):
    """Identity on the cached embeddings; its backward re-runs the model chunk by chunk (with the random
    state of the cached pass) and back-propagates the embeddings' gradient through each chunk."""

    @staticmethod
    def forward(ctx, embeddings, runner):
        ctx.runner = runner
        return embeddings.view_as(embeddings)

    @staticmethod
    def backward(ctx, grad):
        ctx.runner(grad)
        return None, None


def grad_cached_embeddings(module: EmbeddingModule, batch: dict, size: int) -> torch.Tensor:
    """All texts' embeddings (anchors, positives, negatives in order) computed without keeping activations;
    gradients reach the weights through `_Replay` in chunks of `size` texts."""
    pieces = _chunks(batch, size)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    states, outputs = [], []
    with torch.no_grad():
        for ids, mask in pieces:
            states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]))
            outputs.append(module(ids, mask))
    cached = torch.cat(outputs)

    def runner(grad: torch.Tensor) -> None:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            offset = 0
            for (ids, mask), (cpu_state, gpu_states) in zip(pieces, states):
                torch.set_rng_state(cpu_state)
                for d, s in zip(devices, gpu_states):
                    torch.cuda.set_rng_state(s, d)
                out = module(ids, mask)
                out.backward(grad[offset:offset + out.shape[0]])
                offset += out.shape[0]

    return _Replay.apply(cached.detach().requires_grad_(), runner)


def contrastive_step(symmetric: bool, grad_cache_chunk: int | None):
    """The loop's step function: embed the three roles, InfoNCE over in-batch and hard negatives."""
    def step(module: EmbeddingModule, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        inner = getattr(module, "module", module)  # under DDP the EmbeddingModule is wrapped
        if grad_cache_chunk and torch.is_grad_enabled():
            everything = grad_cached_embeddings(module, batch, grad_cache_chunk)
        else:
            everything = torch.cat([module(batch[f"{r}_ids"], batch[f"{r}_mask"]) for r in ROLES
                                    if f"{r}_ids" in batch])
        rows = batch["anchor_ids"].shape[0]
        loss_sum, metrics = info_nce_loss(everything[:rows], everything[rows:], inner.scale(), batch["exclude"],
                                          symmetric)
        shown = {k: float(v) for k, v in metrics.items()}
        if inner.log_scale is not None:
            shown["scale"] = float(inner.scale().detach())
        return loss_sum, shown
    return step


def held_out_retrieval(module: EmbeddingModule, pairs: list[TextPair], pad_id: int, config: ContrastiveConfig
                       ) -> dict[str, float]:
    """Accuracy@1, recall@k and MRR of retrieving each held-out anchor's positive among all held-out positives."""
    if len(pairs) < 2:
        return {}
    device = next(module.parameters()).device
    size = config.contrastive.eval_batch_size
    anchors = embed_ids(module, [p.anchor for p in pairs], pad_id, size, device)
    positives = embed_ids(module, [p.positive for p in pairs], pad_id, size, device)
    return retrieval_metrics(anchors, positives, [tuple(p.positive) for p in pairs], config.contrastive.recall_at)


def _log_retrieval(run, step: int, metrics: dict[str, float], when: str) -> None:
    if not metrics:
        return
    if distributed.is_main():
        _append_metrics(run, {"step": step, "split": "eval", **{f"eval_{k}": v for k, v in metrics.items()}})
    log(f"held-out retrieval {when}: " + ", ".join(f"{k.removeprefix('retrieval_')} {v:.3f}"
                                                   for k, v in metrics.items()))


def write_embedding_final(run, model, tokenizer, config: ContrastiveConfig, pooling: str, whole, data=None,
                          retrieval: tuple[dict, dict] | None = None) -> Path:
    """final/: plain transformers weights (LoRA merged in; a soft prompt stays an adapter), the tokenizer,
    embedding_config.json, for an encoder the sentence-transformers files, and the run's model card
    (README.md: library sentence-transformers for an encoder, with the held-out `retrieval` before / after)."""
    state = None
    if config.peft == "none":
        state = distributed.whole_state_dict(whole, model)
    if distributed.is_main():
        prompt = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
        if config.peft in ("lora", "qlora"):
            model = model.merge_and_unload()
        with atomic_dir(run.final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state} if state else {}))
            tokenizer.save_pretrained(tmp)
            base = getattr(model, "get_base_model", lambda: model)()
            write_embedding_files(tmp, pooling=pooling, normalize=config.contrastive.normalize,
                                  max_length=config.data.max_length, dimension=base.config.hidden_size,
                                  sentence_transformers=is_encoder_tokenizer(tokenizer) and not prompt)
            from tunelab.card import render_card

            library = ("peft" if (tmp / "adapter_config.json").is_file() else
                       "sentence-transformers" if (tmp / "modules.json").is_file() else "transformers")
            render_card(config, data, run.metrics, run.final, library=library,
                        retrieval=retrieval).save(tmp / "README.md")
    distributed.wait()
    return run.final


@releasing
@tracked
def run_contrastive(config: ContrastiveConfig, *, resume: bool = False, overwrite: bool = False,
                    allow_changes: bool = False,
                    quiet: bool = False) -> ContrastiveResult:
    """Train an embedding model with InfoNCE and write `final/` into `config.output`."""
    config.train.micro_batch_tokens = None  # in-batch negatives need the whole batch in one pass
    section = config.contrastive
    if section.grad_cache_chunk and distributed.launched_world_size() > 1:
        # the chunks' backward runs inside the loop's backward, where DDP cannot finish one reduction
        # before the next chunk's forward starts another
        raise ConfigError("contrastive.grad_cache_chunk works on one process only; with several processes "
                          "lower train.batch_size and raise train.grad_accum instead (negatives are per batch)")
    chosen: dict[str, str] = {}

    def prepare_data(tokenizer):
        check_pad_token(tokenizer, config.model.name_or_path)
        chosen["pooling"] = resolve_pooling(section.pooling, config.model.name_or_path, tokenizer)
        return prepare_pair_data(config.data, tokenizer, seed=config.train.seed)

    prepared = prepare_recipe(config, resume=resume, overwrite=overwrite,
                              allow_changes=allow_changes, task_type="FEATURE_EXTRACTION",
                              prepare_data=prepare_data,
                              load_model=lambda tok: load_encoder_body(config.model, config.quantization_in_force()))
    tokenizer, data, model = prepared.tokenizer, prepared.data, prepared.model
    pooling, pad_id = chosen["pooling"], tokenizer.pad_token_id
    module = EmbeddingModule(model, pooling, section.normalize, 1 / section.temperature, section.learnable_scale)
    log(f"embedding: {pooling} pooling, {'normalised' if section.normalize else 'not normalised'}, scale "
        f"{1 / section.temperature:g}{' (learnable)' if section.learnable_scale else ''}"
        + (f", gradient caching in chunks of {section.grad_cache_chunk}" if section.grad_cache_chunk else ""))
    device = distributed.state().device
    before = {}
    if not resume:
        module.to(device)
        before = held_out_retrieval(module, data.held_out, pad_id, config)
        _log_retrieval(prepared.run, 0, before, "before training")
    result = train_recipe(prepared, config, module=module,
                          step_fn=contrastive_step(section.symmetric, section.grad_cache_chunk),
                          collate=lambda pairs: collate_text_pairs(pairs, pad_id),
                          length=lambda p: max([len(p.anchor), len(p.positive), *map(len, p.negatives)]),
                          desc="contrastive", resume=resume, quiet=quiet)
    after = held_out_retrieval(module, data.held_out, pad_id, config)
    _log_retrieval(prepared.run, result.steps, after, "after training")
    if after and config.train.report and distributed.is_main():
        from tunelab.report import report_at_end

        report_at_end(prepared.run.path, True)  # again, with the retrieval figures in the plots
    final = write_embedding_final(prepared.run, model, tokenizer, config, pooling, result.module, data,
                                  (before, after))
    log(f"contrastive done: {result.steps} steps in {result.seconds:.1f}s"
        + ("; held-out accuracy@1 " + (f"{before['retrieval_accuracy_at_1']:.3f} -> " if before else "")
           + f"{after['retrieval_accuracy_at_1']:.3f}" if after else "") + f"; model in {final}")
    return ContrastiveResult(prepared.run.path, final, result, data, before, after)
