"""Writes the tokenizer files in this directory: a small BPE (96 tokens) trained on the built-in
arithmetic task's text, so a student can read the task in other tokens than the shipped char teacher
(configs/cross_tokenizer.py). Merges cross "+", "=", "," and "#" ("=1", "+1", "#1", ...), so many of its
tokens cover two or more of the teacher's characters. Rerun: python assets/arithmetic_bpe/make.py
"""

import pathlib

import tokenizers
import transformers

from kldistill_jax.data import ArithmeticTask, CharTokenizer
from kldistill_jax.data.tokenizers import CHAR_ALPHABET


def main():
  task = ArithmeticTask(20_000, (2, 3, 4, 5), seed=0, split="train")
  texts = [task[i]["prompt"] + task[i]["response"] for i in range(len(task))]
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.decoder = tokenizers.decoders.Fuse()  # tokens join without spaces (no pre-tokenizer either)
  specials = list(CharTokenizer.special_tokens)  # <pad> = 0, </s> = 1, as the char tokenizer
  backend.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=96, special_tokens=specials, initial_alphabet=list(CHAR_ALPHABET), show_progress=False))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=specials[0],
                                              eos_token=specials[1], clean_up_tokenization_spaces=False)
  fast.save_pretrained(str(pathlib.Path(__file__).parent))


if __name__ == "__main__":
  main()
