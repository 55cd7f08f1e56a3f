"""Regenerate `tiny_tokenizer/`: the small byte-level BPE tokenizer that tiny test models and `recipes/tiny/` use.

Tiny models need a real tokenizer with a chat template, special tokens and generation markers, but not a 49k vocab:
a 512-token BPE keeps their embedding tables small, so CI trains them in seconds. Deterministic: run it again and the
files come out the same.

    python posttrain/assets/make_tiny_tokenizer.py
"""

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<image>"]


def corpus():
    words = ["what", "is", "the", "answer", "think", "compare", "count", "letters", "in", "word", "reverse",
             "convert", "meters", "to", "centimeters", "kilograms", "grams", "larger", "smaller", "sum", "of", "and",
             "plus", "minus", "times", "user", "assistant", "system", "you", "are", "a", "helpful", "AI", "named",
             "SmolLM", "trained", "by", "Hugging", "Face", "hello", "question", "image", "color", "shape", "yes", "no"]
    for a, b in itertools.product(range(0, 100, 7), range(0, 100, 11)):
        yield f"What is {a} + {b}? The answer is {a + b}. {a} - {b} = {a - b}."
    for w1, w2 in itertools.product(words, words[::3]):
        yield f"{w1} {w2} {w1.upper()} {w2.capitalize()}: <think> {w2} </think>"


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = (HERE.parent / "chat_templates" / "chatml.jinja").read_text()
    fast.save_pretrained(HERE / "tiny_tokenizer")
    print(f"wrote {HERE / 'tiny_tokenizer'} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
