"""The embedded tokenizer: a byte-level BPE trained locally, with DeepSeek-V3's special tokens and
chat template; and `load_checkpoint_tokenizer`, how every trainer loads a checkpoint's tokenizer.

Byte-level BPE covers every input byte, so the tokenizer never fails on text outside the built-in
task; the merges are trained on the task's alphabet so the tiny model sees short sequences.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Order fixes the ids: BOS=0 and EOS=1, as in DeepSeek-V3's config.
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE]

# DeepSeek-V3's chat layout: BOS, system prompt(s), then <｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>.
# `{% generation %}` marks the assistant spans (end-of-turn token included), which is what
# transformers' `return_assistant_tokens_mask` and TRL's `assistant_only_loss` read.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{{ message['content'] }}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{%- generation %}{{ message['content'] + '<｜end▁of▁sentence｜>' }}{%- endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `corpus` and wraps it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # The think tags are single tokens but not special, as in DeepSeek-R1's tokenizer: decoding with
    # skip_special_tokens (TRL's completions, vLLM's text, the distill teachers) keeps them, so the filters
    # and rewards that split a response at </think> see it. (Their ids stay those the trainer gave them.)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_checkpoint_tokenizer(path: str, field: str = "model_name_or_path"):
    """The tokenizer saved with a checkpoint, with a pad token (eos where it has none: pad tokens are never
    targets). A directory without a usable one is a `UserError` naming it; transformers' own error is a
    traceback about converting a slow tokenizer (sentencepiece, tiktoken)."""
    from transformers import AutoTokenizer

    from .errors import UserError

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{field} {path}: cannot load its tokenizer ({lines[0] if lines else type(e).__name__}); a "
                        "checkpoint directory holds tokenizer.json and tokenizer_config.json beside the weights") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
