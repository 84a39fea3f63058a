"""Tiny tokenizers and models built in-process, so tests need no network and run fast."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The cat sat on the mat and looked at the dog.",
    "A preference pair has a prompt, a chosen answer and a rejected answer.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog!",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "I think you are right. Actually, that is not correct.",
    "What is the capital of Spain? Madrid is the capital of Spain.",
    "Hello, how are you today? I am fine, thank you.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "system user assistant instruction input output",
] * 4

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def make_tokenizer(chat_template: bool = True, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a small corpus; ChatML template unless ``chat_template=False``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        bos_token=None,
        pad_token="<pad>",
        unk_token=None,
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def make_model(tokenizer, hidden_size: int = 32, seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    """2-layer Llama in fp32 with dropout off; ``tied``: the LM head is the input embedding (as SmolLM2's)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    return model.float().eval()


def save_tiny(path, chat_template: bool = True, hidden_size: int = 32, seed: int = 0, tied: bool = False) -> str:
    """Write a tiny model + tokenizer directory loadable with from_pretrained."""
    tokenizer = make_tokenizer(chat_template=chat_template)
    model = make_model(tokenizer, hidden_size=hidden_size, seed=seed, tied=tied)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the console-script entry point in-process; returns (exit code, stdout, stderr)."""
    import sys

    from preftune import cli

    monkeypatch.setattr(sys, "argv", ["preftune", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
