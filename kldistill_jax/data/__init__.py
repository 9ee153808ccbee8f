"""Data: the built-in arithmetic task, file sources (chat JSONL too), prompt templates, tokenizers (char,
byte, Hugging Face), grain pipelines and the length check that runs on every record before training
(`check_lengths`)."""

from kldistill_jax.data.arithmetic import (ArithmeticTask, extract_answer, is_correct, is_valid_solution,
                                           solutions)
from kldistill_jax.data.pipeline import encode_example, encode_prompt, eval_batches, make_dataset
from kldistill_jax.data.byte_tokenizer import ByteTokenizer
from kldistill_jax.data.sources import (Records, boxed_answer, gsm8k_answer, read_benchmark, read_jsonl,
                                        require_answers, tfds_source)
from kldistill_jax.data.templates import TEMPLATES, Template, format_prompt, format_record
from kldistill_jax.data.tokenizers import CharTokenizer, HFTokenizer, load_tokenizer, stop_sequences
from kldistill_jax.data.validate import TOO_LONG, check_lengths

__all__ = [
    "ArithmeticTask", "extract_answer", "is_correct", "is_valid_solution", "solutions",
    "encode_example", "encode_prompt", "eval_batches", "make_dataset",
    "Records", "boxed_answer", "gsm8k_answer", "read_benchmark", "read_jsonl", "require_answers", "tfds_source",
    "TEMPLATES", "Template", "format_prompt", "format_record",
    "ByteTokenizer", "CharTokenizer", "HFTokenizer", "load_tokenizer", "stop_sequences",
    "TOO_LONG", "check_lengths",
]
