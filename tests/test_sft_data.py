"""SFT rows → (input_ids, labels) against TRL 1.16's SFTTrainer: tool calls and the row's `tools` /
`chat_template_kwargs` reach the chat template, and plain-text prompt-completion is tokenized as TRL does."""

from __future__ import annotations

import copy
import json

import pytest

from data_pipelines.errors import DataError
from posttrain.sft.data import IGNORE_INDEX, SampleTokenizer, tokenize_dataset

# A chat template that renders tool calls, tool results, reasoning and a chat_template_kwargs variable, with
# {% generation %} around each assistant turn. `'tool_calls' in message` (as DeepSeek-V3's template tests it):
# a null `tool_calls` key that Arrow adds to the other rows' messages would be iterated and fail.
TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if greeting %}[{{ greeting }}]{%- endif %}"
    "{%- if tools %}TOOLS:{%- for t in tools %}{{ t['function']['name'] }};{%- endfor %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'tool' %}<tool>{{ message['content'] }}</tool>"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}{%- generation %}"
    "{%- if 'reasoning_content' in message %}<think>{{ message['reasoning_content'] }}</think>{%- endif %}"
    "{%- if message['content'] is not none %}{{ message['content'] }}{%- endif %}"
    "{%- if 'tool_calls' in message %}{%- for c in message['tool_calls'] %}"
    "<call>{{ c['function']['name'] }}({{ c['function']['arguments'] }})</call>{%- endfor %}{%- endif %}"
    "{{ '<｜end▁of▁sentence｜>' }}{%- endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded tiny tokenizer (the one init_model writes into the tiny checkpoint), without the checkpoint."""
    from posttrain.model_init import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tool_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _targets(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def _tool_conversation(content=None):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": [CALL]},
        {"role": "tool", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."},
    ]


# ---------------------------------------------------------------------------------------------
# tool calls, tools, chat_template_kwargs


def test_tool_calls_reasoning_tools_and_template_kwargs_reach_the_template(tool_tokenizer):
    """Before: `_clean` kept role/content only (the call was trained as an empty reply, a null content was a bad
    row), and the `tools` / `chat_template_kwargs` columns were ignored."""
    tok, eos = tool_tokenizer, tool_tokenizer.eos_token
    rows = [
        # OpenAI form: content null, tools as a JSON string (as TRL reads it: json.loads)
        {"messages": _tool_conversation(None), "tools": json.dumps([WEATHER_TOOL]),
         "chat_template_kwargs": {"greeting": "HELLO"}},
        # Arrow gives this row's messages 'tool_calls': None (and the other row 'reasoning_content': None)
        {"messages": [{"role": "user", "content": "2 + 2?"},
                      {"role": "assistant", "content": "4", "reasoning_content": "two and two"}],
         "tools": None, "chat_template_kwargs": None},
    ]
    ds, stats = tokenize_dataset(_ds(rows), tok, max_length=512)
    assert stats.kept == 2 and stats.bad_rows == 0
    text0 = tok.decode(ds[0]["input_ids"])
    assert text0.startswith(tok.bos_token + "[HELLO]TOOLS:get_weather;<｜User｜>Weather in Paris?")
    assert _targets(tok, ds[0]["labels"]) == (f'<call>get_weather({{"city": "Paris"}})</call>{eos}'
                                              f"It is 18C and sunny.{eos}")
    assert "<tool>18C, sunny</tool>" in text0
    # the call's tokens are targets: every token of the call's span is in the labels
    call_ids = tok('<call>get_weather({"city": "Paris"})</call>', add_special_tokens=False)["input_ids"]
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(call_ids)] == call_ids)
    assert labels[start:start + len(call_ids)] == call_ids
    text1 = tok.decode(ds[1]["input_ids"])
    assert "TOOLS" not in text1 and "[" not in text1 and "None" not in text1
    assert _targets(tok, ds[1]["labels"]) == f"<think>two and two</think>4{eos}"


def test_conversational_prompt_completion_with_a_tool_call(tool_tokenizer):
    tok, eos = tool_tokenizer, tool_tokenizer.eos_token
    conv = _tool_conversation("Let me look.")
    row = {"prompt": conv[:1], "completion": conv[1:], "tools": json.dumps([WEATHER_TOOL])}
    ids, labels = SampleTokenizer(tok)(row, "prompt_completion")
    assert "TOOLS:get_weather;" in tok.decode(ids)
    assert _targets(tok, labels) == (f'Let me look.<call>get_weather({{"city": "Paris"}})</call>{eos}'
                                     f"It is 18C and sunny.{eos}")


@pytest.mark.parametrize("content", ["", None, "Checking."])
def test_a_tool_call_the_chat_template_drops_is_a_bad_row(tokenizer, content):
    """The embedded template renders no tool calls: the turn would be trained as an empty reply (or one without its
    call). The name in the prompt does not count as the call rendered."""
    msgs = _tool_conversation(content)[:2]
    msgs[0]["content"] = "Call get_weather for Paris."
    with pytest.raises(DataError, match=r"row 0: message 1 \(role 'assistant'\) calls 'get_weather', and the chat "
                                        r"template's rendering has no such call"):
        tokenize_dataset(_ds([{"messages": msgs}]), tokenizer, max_length=512)
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ds, stats = tokenize_dataset(_ds([{"messages": msgs}, plain]), tokenizer, max_length=512, on_bad_row="skip")
    assert len(ds) == 1 and stats.bad_rows == 1 and "renders no tool calls" in stats.bad_examples[0]["reason"]


def test_null_content_without_tool_calls_and_bad_tool_columns_are_bad_rows(tool_tokenizer):
    no_calls = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}
    with pytest.raises(DataError, match="row 0: messages message 1 is not a"):
        tokenize_dataset(_ds([no_calls]), tool_tokenizer, max_length=512)
    bad_tools = {"messages": _tool_conversation(), "tools": "[{not json"}
    with pytest.raises(DataError, match="row 0: 'tools' is not valid JSON"):
        tokenize_dataset(_ds([bad_tools]), tool_tokenizer, max_length=512)
    overriding = {"messages": _tool_conversation(), "chat_template_kwargs": {"add_generation_prompt": True}}
    with pytest.raises(DataError, match="row 0: 'chat_template_kwargs' sets 'add_generation_prompt'"):
        tokenize_dataset(_ds([overriding]), tool_tokenizer, max_length=512)


# ---------------------------------------------------------------------------------------------
# plain-text prompt-completion (TRL's add_eos + tokenize_fn)


def test_plain_completion_ending_with_eos_gets_one_eos(tokenizer):
    eos = tokenizer.eos_token
    ds, _ = tokenize_dataset(_ds([{"prompt": "2 + 3 =", "completion": " 5" + eos}]), tokenizer, max_length=512)
    assert ds[0]["input_ids"].count(tokenizer.eos_token_id) == 1
    assert _targets(tokenizer, ds[0]["labels"]) == " 5" + eos


def test_plain_prompt_completion_is_tokenized_together_as_trl(tokenizer):
    """"… 1" + "0" merges into one token " 10": TRL tokenizes prompt + completion together and the completion starts
    where the tokenized prompt and prompt + completion diverge (the merged token is a target)."""
    eos = tokenizer.eos_token
    prompt, completion = "2 + 3 = 1", "0"
    ids, labels = SampleTokenizer(tokenizer)({"prompt": prompt, "completion": completion}, "prompt_completion")
    joint = tokenizer(text=prompt + completion + eos)["input_ids"]
    p = tokenizer(text=prompt)["input_ids"]
    assert ids == joint and ids[:len(p) - 1] == p[:-1] and ids[len(p) - 1] != p[-1]  # merged across the boundary
    assert labels == [IGNORE_INDEX] * (len(p) - 1) + joint[len(p) - 1:]
    assert _targets(tokenizer, labels) == " 10" + eos  # the merged token " 10" holds the prompt's last " 1"


def test_plain_prompt_completion_keeps_the_tokenizers_bos(tokenizer):
    """A tokenizer that adds BOS (DeepSeek-V3's does) gets it, as TRL's `processing_class(text=...)`."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    ds, _ = tokenize_dataset(_ds([{"prompt": "2 + 3 =", "completion": " 5"}]), tok, max_length=512)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == tok(text="2 + 3 = 5" + tok.eos_token)["input_ids"]
    assert _targets(tok, labels) == " 5" + tok.eos_token


def test_plain_prompt_completion_and_assistant_only_loss(tokenizer):
    """assistant_only_loss is on by default (SFTRecipeConfig): plain text then trains the completion only. Asking
    for the prompt's tokens too (completion_only_loss=False) contradicts it, and fails whatever on_bad_row says;
    TRL refuses assistant_only_loss=True on any dataset that is not conversational."""
    rows = _ds([{"prompt": "2 + 3 =", "completion": " 5"}])
    eos = tokenizer.eos_token
    ds, _ = tokenize_dataset(rows, tokenizer, max_length=512)
    assert _targets(tokenizer, ds[0]["labels"]) == " 5" + eos
    with pytest.raises(DataError, match="assistant_only_loss=True .* completion_only_loss=False.*not conversational"):
        tokenize_dataset(rows, tokenizer, max_length=512, completion_only_loss=False, on_bad_row="skip")
    ds, _ = tokenize_dataset(rows, tokenizer, max_length=512, assistant_only_loss=False, completion_only_loss=False)
    assert tokenizer.decode(ds[0]["labels"][1:]) == tokenizer.decode(ds[0]["input_ids"][1:])  # all but the first
    ds, _ = tokenize_dataset(rows, tokenizer, max_length=512, assistant_only_loss=False)
    assert _targets(tokenizer, ds[0]["labels"]) == " 5" + eos


def test_deepseek_v3_template_trains_the_tool_call_and_keeps_content_beside_no_calls(tokenizer):
    """DeepSeek-V3's own template (TRL's copy, swapped for its {% generation %} version): a null-content call is
    trained with its call tokens; an empty `tool_calls` list (no calls) would make it drop the turn's content."""
    from importlib.resources import files

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (files("trl") / "chat_templates" / "deepseekv3.jinja").read_text()
    eos = tok.eos_token
    rows = [{"messages": _tool_conversation(None)},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": []}]}]
    ds, _ = tokenize_dataset(_ds(rows), tok, max_length=1024)
    calls = _targets(tok, ds[0]["labels"])
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather" in calls
    assert calls.endswith(f"It is 18C and sunny.{eos}")
    assert _targets(tok, ds[1]["labels"]).endswith(f"a{eos}")
