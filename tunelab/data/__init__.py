"""Data pipeline: load -> detect format -> validate -> render (ids + loss mask) -> batch."""

from tunelab.data.dataset import SourceSummary, TokenizedData, prepare_sft_data
from tunelab.data.formats import Example, detect_format, to_examples
from tunelab.data.load import DataError, Row, load_rows
from tunelab.data.templates import Rendered, alpaca_prompt, prompt_text, render_example

__all__ = ["DataError", "Example", "Rendered", "Row", "SourceSummary", "TokenizedData", "alpaca_prompt",
           "detect_format", "load_rows", "prepare_sft_data", "prompt_text", "render_example", "to_examples"]
