"""Shared fixtures: a real byte-level BPE tokenizer from the demo world (built in well under a second)."""

import os
import signal

import pytest

# train.precision=auto means fp32 in every test and every process a test starts, whatever the CPU: runs are
# compared with each other bit for bit, and bf16 is tested where a test asks for it (tests/test_precision.py)
os.environ["TUNELAB_PRECISION"] = "fp32"
# the tokenized cache is off in tests (and in the processes they start) unless a test points data.cache_dir at
# a folder of its own: no test reads rows another one rendered
os.environ["TUNELAB_CACHE_DIR"] = "none"
# tests press Ctrl-C on runs and servers, in this process and in the ones they start: a suite launched with SIGINT
# ignored (a background job of a script, nohup) would pass the ignoring on to them, and Ctrl-C would do nothing
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tunelab.demo.world import build_tokenizer, make_reviews

INSTRUCTION_TEXTS = [
    "Write a review of The Silent Harbor.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nSummarize the text.\n\n### Input:\nThe film was long.\n\n### Response:\n",
    "You are a helpful assistant. Answer briefly.",
    "Translate the sentence into French.",
    "What is the capital of France? Paris is the capital of France.",
]


@pytest.fixture(scope="session")
def tokenizer():
    """The demo tokenizer: bos <s> (added with add_special_tokens=True), eos </s>, pad <pad>, ChatML template."""
    texts = [r["text"] for r in make_reviews(300, seed=0)] + INSTRUCTION_TEXTS * 3
    return build_tokenizer(texts)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    """A directory holding the saved tokenizer, loadable with AutoTokenizer / `--model`."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path
