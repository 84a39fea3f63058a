"""Generation: exact prompt ids, left padding, stopping, seeding; degeneration flags; JSONL helpers."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tiny
from preftune import generation as gen
from preftune.errors import PreftuneError
from preftune.generation import (
    RUNAWAY_WORD_RUN,
    append_jsonl,
    degeneration,
    done_prompts,
    end_of_turn_ids,
    generate,
    generate_completions,
    load_prompts,
)
from preftune.templates import render_prompt



PROMPTS = [
    "Hello",
    "What is the capital of Spain? Answer in one word, please.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat"}],
    "Water boils at one hundred degrees Celsius at sea level, right? Explain why that is so.",
    "Paris",
]


@pytest.fixture(scope="module")
def tiny_lm(chat_tokenizer):
    return tiny.make_model(chat_tokenizer)


# ------------------------------------------------------------------ degeneration


def test_deep_deep_runaway_is_flagged():
    seed003 = "Deep deep Deep Deep Deep Deep Deep Deep Deep Deep Deep Deep G DeepGAN Deepwen"
    flags = degeneration(seed003)
    assert flags["runaway"] and flags["degenerate"]
    assert flags["run_word"] == "deep" and flags["longest_run"] == 12
    assert degeneration("Deep deep Deep Deep")["runaway"]  # exactly RUNAWAY_WORD_RUN
    assert RUNAWAY_WORD_RUN == 4
    assert not degeneration("Deep deep Deep is what I am.")["runaway"]


def test_looping_phrase_is_repeated_ngrams_not_runaway():
    loop = "I am a bot. " * 8
    flags = degeneration(loop)
    assert flags["repeated_ngrams"] and not flags["runaway"] and flags["degenerate"]
    assert flags["repeated_ngram_share"] > 0.5
    assert degeneration("Deepwenbet Deepwenbet Deepwenbet Deepwenbet Deepwenbet")["runaway"]


def test_empty_and_char_runs():
    assert degeneration("")["empty"] and degeneration("   \n")["degenerate"]
    assert degeneration("!" * 40)["runaway"]
    assert not degeneration("Heading\n" + "-" * 10 + "\nText follows here.")["degenerate"]


def test_emoji_runs_are_runaway_but_a_few_emoji_and_tables_are_not():
    """Seed 003's run here answered "Identify yourself, please." with a row of 🌍: each emoji is
    several tokens, so a looping answer shows only ~15 of them, far below the 30-character run."""
    assert degeneration("🌍" * 16)["runaway"] and degeneration("Sure! " + "🌍 " * 6)["runaway"]
    assert not degeneration("I love the sea 🌊🌊🌊 and the sun ☀️.")["degenerate"]
    assert not degeneration("┌" + "─" * 20 + "┐\n│ a table │")["degenerate"]  # box drawing is not an emoji


@pytest.mark.parametrize(
    "text",
    [
        "I'm SmolLM, a helpful AI assistant trained by Hugging Face. How can I help you today?",
        "Paris is the capital of France. It is known for the Eiffel Tower, the Louvre and its cafes; "
        "millions of visitors come every year to see the city, its museums and its river.",
        "Yes.",
        "1. Wash the rice. 2. Boil the water. 3. Add the rice to the water. 4. Cook the rice for ten "
        "minutes. 5. Let the rice rest for five minutes before serving it.",
    ],
)
def test_normal_text_is_not_degenerate(text):
    flags = degeneration(text)
    assert not flags["degenerate"], flags


# ------------------------------------------------------------------ generation


def test_greedy_batched_left_padded_equals_one_by_one(chat_tokenizer, tiny_lm):
    batched = generate(tiny_lm, chat_tokenizer, PROMPTS, max_new_tokens=12, batch_size=5)
    single = [generate(tiny_lm, chat_tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert generate(tiny_lm, chat_tokenizer, PROMPTS, max_new_tokens=12, batch_size=2) == batched
    assert all(len(row) == 1 and isinstance(row[0], str) for row in batched)


def test_sampling_is_seeded_per_prompt(chat_tokenizer, tiny_lm):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, num_return_sequences=3)
    a = generate(tiny_lm, chat_tokenizer, PROMPTS, seed=7, batch_size=6, **kw)
    b = generate(tiny_lm, chat_tokenizer, PROMPTS, seed=7, batch_size=6, **kw)
    assert a == b
    # batch size, order and which other prompts are present do not change a prompt's samples
    c = generate(tiny_lm, chat_tokenizer, PROMPTS[::-1], seed=7, batch_size=2, **kw)[::-1]
    assert c == a
    assert generate(tiny_lm, chat_tokenizer, PROMPTS[3:4], seed=7, batch_size=1, **kw) == a[3:4]
    assert generate(tiny_lm, chat_tokenizer, PROMPTS, seed=8, batch_size=6, **kw) != a
    assert all(len(row) == 3 for row in a) and len({t for row in a for t in row}) > 5
    # sampling leaves the global RNG alone
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    generate(tiny_lm, chat_tokenizer, PROMPTS[:1], seed=1, **kw)
    assert torch.equal(torch.rand(1), before)


class ScriptedLM(nn.Module):
    """Records what generate() was given and replies with fixed tokens."""

    def __init__(self, replies):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.replies = replies
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config, logits_processor):
        self.calls.append((input_ids.clone(), attention_mask.clone(), generation_config))
        width = max(len(r) for r in self.replies)
        new = torch.tensor([r + [generation_config.pad_token_id] * (width - len(r)) for r in self.replies])
        return torch.cat([input_ids, new[: len(input_ids)]], dim=1)


def test_prompt_ids_are_render_prompt_left_padded_and_stop_at_end_of_turn(chat_tokenizer):
    tok = chat_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    words = tok("The cat sat", add_special_tokens=False)["input_ids"]
    more = tok(" on the mat", add_special_tokens=False)["input_ids"]
    lm = ScriptedLM([words + [im_end] + more, words + more])
    prompts = ["Hello", "What is the capital of Spain?"]
    out = generate_completions(lm, tok, prompts, system_prompt="Be brief.", max_new_tokens=len(words + more) + 1)
    input_ids, mask, config = lm.calls[0]
    rows = sorted(range(2), key=lambda i: -len(render_prompt(prompts[i], tok, "Be brief.")))
    for r, i in enumerate(rows):
        ids = render_prompt(prompts[i], tok, "Be brief.")
        assert input_ids[r, -len(ids) :].tolist() == ids  # exactly training's prompt ids
        assert mask[r].sum() == len(ids) and mask[r, -1] == 1  # padding on the LEFT
    assert im_end in config.eos_token_id
    first, second = out[rows[0]][0], out[rows[1]][0]
    assert (first.text, first.finished, first.tokens) == ("The cat sat", True, len(words))
    assert second.text == "The cat sat on the mat" and not second.finished


def test_answer_prefixes_are_appended_to_the_prompt_and_left_out_of_the_text(chat_tokenizer):
    tok = chat_tokenizer
    more = tok(" an assistant.", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    lm = ScriptedLM([more + [im_end], more + [im_end]])
    prompts = ["Who are you?", "Hello"]
    out = generate_completions(lm, tok, prompts, max_new_tokens=10, answer_prefixes=["I'm Athene,", ""])
    input_ids, mask, _ = lm.calls[0]
    prefix_ids = tok.encode("I'm Athene,", add_special_tokens=False)
    rows = {len(render_prompt(p, tok)) + (len(prefix_ids) if i == 0 else 0): i for i, p in enumerate(prompts)}
    for r in range(2):
        i = rows[int(mask[r].sum())]
        want = render_prompt(prompts[i], tok) + (prefix_ids if i == 0 else [])
        assert input_ids[r, -len(want) :].tolist() == want
    # the continuation keeps its leading space (prefix + text reads right); no prefix: stripped as usual
    assert out[0][0].text == " an assistant." and out[1][0].text == "an assistant."
    with pytest.raises(PreftuneError, match="answer_prefixes"):
        generate_completions(lm, tok, prompts, answer_prefixes=["x"])


def test_end_of_turn_ids(chat_tokenizer, plain_tokenizer):
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(chat_tokenizer) == [im_end]
    eot = plain_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_ids(plain_tokenizer) == [eot]
    mixed = tiny.make_tokenizer(chat_template=False)
    mixed.chat_template = tiny.CHATML_TEMPLATE  # EOS <|endoftext|>, turns end with <|im_end|>
    assert end_of_turn_ids(mixed) == [eot, im_end]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[eot, 5]))
    assert end_of_turn_ids(chat_tokenizer, model) == [im_end, eot, 5]


def test_plain_model_generates(plain_tokenizer):
    model = tiny.make_model(plain_tokenizer)
    out = generate(model, plain_tokenizer, ["The cat", "Hello, how are"], max_new_tokens=5, batch_size=2)
    assert out == [generate(model, plain_tokenizer, [p], max_new_tokens=5)[0] for p in ["The cat", "Hello, how are"]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_generation_arguments(chat_tokenizer, tiny_lm, kwargs, message):
    with pytest.raises(PreftuneError, match=message):
        generate(tiny_lm, chat_tokenizer, ["Hello"], **kwargs)


# ------------------------------------------------------------------ files


def test_load_prompts_txt_jsonl_json(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("Who are you?\n\n  What's your name?  \n")
    assert load_prompts(txt) == ["Who are you?", "What's your name?"]
    jl = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "Hi"}]
    jl.write_text(
        json.dumps({"prompt": "A", "chosen": "x", "rejected": "y"}) + "\n\n" + json.dumps({"prompt": msgs}) + "\n"
        + json.dumps("B") + "\n"
    )  # fmt: skip
    assert load_prompts(jl) == ["A", msgs, "B"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["C", {"question": "D"}]))
    assert load_prompts(js) == ["C", "D"]


def test_load_prompts_errors(tmp_path):
    with pytest.raises(PreftuneError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(PreftuneError, match=r"bad.jsonl:2: no 'prompt' field"):
        load_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": \n')
    with pytest.raises(PreftuneError, match="broken.jsonl:1: invalid JSON"):
        load_prompts(broken)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PreftuneError, match="no prompts"):
        load_prompts(empty)


def test_append_jsonl_and_done_prompts_survive_a_torn_line(tmp_path):
    out = tmp_path / "sub" / "pairs.jsonl"
    assert done_prompts(out) == set()
    msgs = [{"role": "user", "content": "Hi"}]
    assert append_jsonl(out, [{"prompt": "A", "chosen": "x", "rejected": "y"}]) == 1
    append_jsonl(out, [{"prompt": msgs, "chosen": "x", "rejected": "y"}])
    with open(out, "a") as f:
        f.write('{"prompt": "C", "cho')  # interrupted mid-record
    assert done_prompts(out) == {"A", gen.prompt_key(msgs)}
    append_jsonl(out, [{"prompt": "D", "chosen": "x", "rejected": "y"}])
    lines = out.read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["A", msgs, "D"]
    assert append_jsonl(out, []) == 0
