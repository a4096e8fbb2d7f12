"""R1-style distillation data with rejection sampling (project issue 3).

DeepSeek-V3 report §5.1, "Reasoning Data": an expert model (R1) generates responses; for
each instance two SFT sample types are built — ``<problem, original response>`` and
``<system prompt, problem, R1 response>``, the system prompt "designed to guide the model
to produce responses enriched with mechanisms for reflection and verification" — and
"rejection sampling" keeps only high-quality responses, removing R1's typical faults
(overthinking, poor formatting, excessive length; R1's report adds language mixing).

Pipeline: load + validate prompts → optional n-gram decontamination → for each shard of
prompts: teacher samples ``num_generations`` responses each → filters + verifiers
(``rewards``) → keep policy → SFT rows + rejection records committed atomically (see
:mod:`data_pipelines.shards`) → ``stats.json`` and ``lengths.png`` rebuilt from the shards.

Run: ``dsv3-posttrain distill --recipe distill.yaml --num_generations 8``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import DataError
from .filters import FilterConfig, first_failure
from .formatting import (DEFAULT_SYSTEM_PROMPT, SAMPLE_TYPE_ORIGINAL, SAMPLE_TYPE_R1, sft_messages,
                         strip_system, with_system)

log = logging.getLogger(__name__)

KEEP_POLICIES = ("all_correct", "shortest_correct", "first_k_correct")
BACKEND_NAMES = ("scripted", "vllm", "hf", "openai")
DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")


@dataclass
class DistillConfig:
    """Settings of one distillation run; field names follow TRL where TRL has one."""

    # -- input ----------------------------------------------------------------------
    dataset_name: str = field(default="builtin:arith", metadata={"help": (
        "Prompt dataset: 'builtin:arith' (options after '?', e.g. 'builtin:arith?n_train=500&seed=1'), "
        "a local .jsonl/.json/.parquet file or directory of shards, or a Hugging Face Hub id.")})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read prompts from."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N rows of the split (>= 1)."})
    prompt_column: str = field(default="prompt", metadata={
        "help": "Column with the prompt: a string or chat messages [{'role', 'content'}, ...]."})
    answer_column: str = field(default="answer", metadata={
        "help": "Column with the gold final answer the math verifier compares against."})
    reference_column: str | None = field(default=None, metadata={"help": (
        "Column with an original (reference) response; when set, each kept instance also yields a "
        "<problem, original response> SFT sample.")})
    tests_column: str = field(default="tests", metadata={
        "help": "Column with code tests; when present, responses are checked by running them (rewards)."})
    on_bad_row: str = field(default="error", metadata={"help": (
        "'error': stop at the first bad row (malformed line, empty/non-string prompt, missing answer) "
        "naming its file and line; 'skip': drop it and count it in stats.json.")})
    decontaminate_against: list[str] = field(default_factory=list, metadata={"help": (
        "Evaluation sets whose prompts must not leak into the data, e.g. ['builtin:arith:test', "
        "'eval.jsonl', 'org/name@test']; prompts sharing a word n-gram with them are dropped.")})
    ngram: int = field(default=8, metadata={"help": "Word n-gram size for decontamination."})

    # -- teacher --------------------------------------------------------------------
    backend: str = field(default="scripted", metadata={"help": (
        "Teacher backend: 'vllm' (offline engine), 'openai' (OpenAI-compatible endpoint), 'hf' "
        "(transformers generate) or 'scripted' (built-in synthetic teacher for builtin:arith).")})
    model_name_or_path: str | None = field(default=None, metadata={"help": (
        "Teacher model: a local HF model directory (vllm, hf) or the served model name (openai). "
        "Also used to count tokens when the backend does not report them.")})
    num_generations: int = field(default=4, metadata={"help": "Samples per prompt (R1 evaluation uses 4-64)."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (R1 recommends 0.5-0.7)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling top-p (R1 recommends 0.95)."})
    max_completion_length: int = field(default=2048, metadata={"help": "Maximum new tokens per sample."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (per prompt/sample seeds derive from it)."})
    wrong_fraction: float = field(default=0.2, metadata={
        "help": "Scripted teacher only: probability that a sample carries a (consistent) mistake."})
    # vllm
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: tensor-parallel GPUs."})
    dtype: str = field(default="auto", metadata={"help": "vllm/hf: weight dtype ('auto', 'bfloat16', 'float32')."})
    max_model_len: int | None = field(default=None, metadata={"help": "vllm: context length (prompt + completion)."})
    vllm_kwargs: dict[str, Any] | None = field(default=None, metadata={
        "help": "vllm: extra keyword arguments for vllm.LLM (e.g. {'gpu_memory_utilization': 0.8})."})
    # hf
    generation_batch_size: int = field(default=16, metadata={"help": "hf: sequences per generate() call."})
    # openai
    api_base: str | None = field(default=None, metadata={"help": "openai: base URL, e.g. http://127.0.0.1:8000/v1."})
    api_key_env: str | None = field(default="OPENAI_API_KEY", metadata={
        "help": "openai: name of the environment variable holding the API key (the key itself is never stored)."})
    max_concurrency: int = field(default=8, metadata={"help": "openai: maximum requests in flight."})
    max_retries: int = field(default=5, metadata={
        "help": "openai: retries on 429/5xx/timeouts/connection errors, with exponential backoff."})
    request_timeout: float = field(default=600.0, metadata={"help": "openai: seconds per request."})
    retry_backoff: float = field(default=0.5, metadata={
        "help": "openai: first retry delay in seconds, doubled on each further retry (Retry-After wins)."})

    # -- rejection sampling -----------------------------------------------------------
    keep_policy: str = field(default="all_correct", metadata={"help": (
        "Which correct samples to keep per prompt: 'all_correct', 'shortest_correct' or "
        "'first_k_correct' (the first keep_k by sample index).")})
    keep_k: int = field(default=1, metadata={"help": "k for keep_policy 'first_k_correct'."})
    min_length: int = field(default=1, metadata={
        "help": "Reject responses shorter than this (tokens when counted, else characters)."})
    max_length: int | None = field(default=None, metadata={
        "help": "Reject responses longer than this (tokens when counted, else characters); truncated ones always."})
    language_mixing_threshold: float = field(default=0.05, metadata={
        "help": "Reject when more than this fraction of the CoT's letters are non-ASCII (language mixing)."})
    repetition_ngram: int = field(default=4, metadata={"help": "Word n-gram size of the repetition filter."})
    repetition_threshold: float = field(default=0.5, metadata={
        "help": "Reject when more than this fraction of the CoT's word n-grams are repeats (degenerate loops)."})
    verify_timeout: float = field(default=5.0, metadata={"help": "Seconds per answer check (hard timeout)."})

    # -- output ---------------------------------------------------------------------
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={
        "help": "System prompt of the <system prompt, problem, R1 response> samples (asks for reflection and verification)."})
    output_dir: str = field(default="runs/distill", metadata={"help": "Where shards, stats.json and lengths.png go."})
    output_format: str = field(default="jsonl", metadata={"help": "Shard format: 'jsonl' or 'parquet'."})
    shard_size: int = field(default=64, metadata={
        "help": "Prompts per shard: the unit of generation, atomic commit and resumption."})
    overwrite: bool = field(default=False, metadata={
        "help": "Delete earlier output in output_dir instead of resuming it."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self) -> None:
        checks = [
            (self.backend in BACKEND_NAMES, f"unknown backend {self.backend!r}; choose one of {', '.join(BACKEND_NAMES)}"),
            (self.keep_policy in KEEP_POLICIES, f"unknown keep_policy {self.keep_policy!r}; choose one of {', '.join(KEEP_POLICIES)}"),
            (self.on_bad_row in ("error", "skip"), f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}"),
            (self.output_format in ("jsonl", "parquet"), f"output_format must be 'jsonl' or 'parquet', got {self.output_format!r}"),
            (self.max_prompts is None or self.max_prompts >= 1, f"max_prompts must be >= 1 (or unset: all rows), "
             f"got {self.max_prompts}"),
            (self.num_generations >= 1, "num_generations must be >= 1"),
            (self.shard_size >= 1, "shard_size must be >= 1"),
            (self.keep_k >= 1, "keep_k must be >= 1"),
            (0.0 <= self.wrong_fraction <= 1.0, "wrong_fraction must be in [0, 1]"),
            (self.temperature >= 0 and 0 < self.top_p <= 1, "need temperature >= 0 and 0 < top_p <= 1"),
            (self.max_completion_length >= 1, "max_completion_length must be >= 1"),
            # what vllm.LLM accepts, each also a torch dtype for the hf backend; any other name
            # (e.g. 'bf16') ended in a traceback from torch's getattr or vLLM's pydantic config
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DataError(f"distill config: {msg}")
        if isinstance(self.decontaminate_against, str):
            self.decontaminate_against = [self.decontaminate_against]

    def run_fingerprint(self) -> dict[str, Any]:
        """Settings that determine the output rows; a resumed run must match them.

        Local inputs (``dataset_name``, ``decontaminate_against``) count by their contents
        too, as ``"contents of NAME": "sha256:..."`` (see :func:`input_contents`): the
        same path with other rows in it is another run."""
        keys = ["dataset_name", "dataset_config", "dataset_split", "max_prompts", "prompt_column",
                "answer_column", "reference_column", "tests_column", "on_bad_row", "decontaminate_against",
                "ngram", "backend", "model_name_or_path", "num_generations", "temperature", "top_p",
                "max_completion_length", "seed", "keep_policy", "keep_k", "min_length", "max_length",
                "language_mixing_threshold", "repetition_ngram", "repetition_threshold", "system_prompt",
                "output_format", "shard_size", "api_base"]
        if self.backend == "scripted":
            keys.append("wrong_fraction")
        if self.backend == "hf":  # its samples are seeded per micro-batch
            keys.append("generation_batch_size")
        if self.backend in ("hf", "vllm"):  # the teacher's numerics: another dtype samples other answers
            keys.append("dtype")
        if self.backend == "vllm":  # so do its engine options and a tensor-parallel split (reduction order)
            keys += ["tensor_parallel_size", "vllm_kwargs"]
        return {**{k: getattr(self, k) for k in keys}, **input_contents(self)}


# --- local inputs -------------------------------------------------------------------

CONTENTS_KEY = "contents of "  # run_config.json key prefix: "contents of prompts.jsonl"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def input_contents(cfg: DistillConfig) -> dict[str, str]:
    """``{"contents of NAME": "sha256:HEX"}`` for each local file or directory the run reads
    (``dataset_name`` and ``decontaminate_against``), streamed, never held in memory.  A
    directory's digest covers every data file in it (any split) with its relative path.
    The built-in task and Hub ids are skipped: their name and options pin them."""
    from .loading import local_data_files

    names = [cfg.dataset_name]
    for name in cfg.decontaminate_against:  # "NAME@split", as decontaminate.load_eval_texts reads it
        names.append(name.rsplit("@", 1)[0] if "@" in name else name)
    out: dict[str, str] = {}
    for name in names:
        key = CONTENTS_KEY + name
        if key in out:
            continue
        files = local_data_files(name)
        if files is None:
            continue
        root = Path(name).expanduser()
        if root.is_dir():
            h = hashlib.sha256()
            for f in files:
                rel = Path(os.path.relpath(os.path.abspath(f), os.path.abspath(root))).as_posix()
                h.update(f"{rel}\0{_sha256_file(f)}\n".encode())
            digest = h.hexdigest()
        else:
            digest = _sha256_file(root)
        out[key] = f"sha256:{digest}"
    return out


def _compare_with_older_run(out_dir: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What ShardStore.open compares output_dir's run_config.json with: ``fingerprint``,
    unless that file predates recorded input contents (no "contents of" keys).  Then, with
    the same settings, the run resumes, with a warning that its inputs cannot be checked, and
    their contents are recorded from now on; with other settings ShardStore.open refuses it,
    naming only the settings (the contents were never recorded, so not known to differ)."""
    from .shards import RUN_CONFIG, atomic_write_bytes

    contents = [k for k in fingerprint if k.startswith(CONTENTS_KEY)]
    path = Path(out_dir) / RUN_CONFIG
    if not contents or not path.exists():
        return fingerprint
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return fingerprint  # ShardStore.open treats it as torn
    if not isinstance(old, dict) or any(k.startswith(CONTENTS_KEY) for k in old):
        return fingerprint
    settings = {k: v for k, v in fingerprint.items() if k not in contents}
    if old != settings:
        return settings
    log.warning("%s was written before distill recorded its inputs' contents: resuming without checking "
                "that %s did not change since; from now on a change is refused",
                out_dir, ", ".join(k[len(CONTENTS_KEY):] for k in contents))
    atomic_write_bytes(path, (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode())
    return fingerprint


# --- prompts ------------------------------------------------------------------------


@dataclass
class PromptItem:
    source_id: str
    messages: list[dict[str, str]]
    answer: str | None
    reference: str | None
    tests: Any = None


def _hash(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


def prepare_prompts(cfg: DistillConfig) -> tuple[list[PromptItem], dict[str, Any]]:
    """Load, validate, deduplicate and decontaminate the prompts; returns them with counts."""
    from .loading import (answer_problem, bad_rows_in_use, load_rows, prompt_problem, require_columns, row_location,
                          tests_problem, to_messages)
    from rewards import gold_answer_text
    from rewards.code_reward import parse_tests

    skip = cfg.on_bad_row == "skip"
    bad: list[dict[str, str]] = []
    ds = load_rows(cfg.dataset_name, cfg.dataset_split, dataset_config=cfg.dataset_config,
                   bad_rows=bad if skip else None)
    source = cfg.dataset_name
    has_tests = bool(cfg.tests_column) and cfg.tests_column in ds.column_names
    require_columns(ds, [cfg.prompt_column] + ([] if has_tests else [cfg.answer_column]), source)
    if cfg.reference_column:
        require_columns(ds, [cfg.reference_column], source)
    has_answer = cfg.answer_column in ds.column_names
    loader_skipped = len(bad)  # unreadable lines the loader dropped (skip mode)

    n_rows = ds.num_rows if cfg.max_prompts is None else min(ds.num_rows, cfg.max_prompts)
    # max_prompts cut the rows: only the unreadable lines before the last used row count
    bad[:] = bad_rows_in_use(bad, ds, n_rows, source)
    loader_skipped = len(bad)
    items: list[PromptItem] = []
    seen: set[str] = set()
    duplicates = 0
    for i, row in enumerate(ds):
        if i >= n_rows:
            break
        tests = row.get(cfg.tests_column) if has_tests else None
        tests_error = None if tests is None else tests_problem(tests)
        if tests is not None and tests_error is None and not parse_tests(tests):
            # No test cases ([], "", "null": how a math row of a mixed math/code set often reads) is
            # no tests: the row is checked by its answer, not sent to the code verifier (all "no_code").
            tests = None
        problems = [(cfg.prompt_column, prompt_problem(row[cfg.prompt_column]))]
        if tests is None:  # checked by its answer, so it needs one
            problems.append((cfg.answer_column, answer_problem(row.get(cfg.answer_column))))
        else:
            problems.append((cfg.tests_column, tests_error))
            if has_answer and row.get(cfg.answer_column) is not None:
                problems.append((cfg.answer_column, answer_problem(row[cfg.answer_column])))
        ref = row.get(cfg.reference_column) if cfg.reference_column else None
        if ref is not None and not isinstance(ref, str):
            problems.append((cfg.reference_column, f"reference is a {type(ref).__name__}, not a string"))
        col, why = next(((c, p) for c, p in problems if p), (None, None))
        if why:
            where = row_location(ds, i, source)
            if not skip:
                raise DataError(f"{where}: {why} (column {col!r})")
            bad.append({"location": where, "reason": f"{why} (column {col!r})"})
            continue
        messages = to_messages(row[cfg.prompt_column])
        sid = _hash("prompt", messages)
        if sid in seen:
            duplicates += 1
            continue
        seen.add(sid)
        answer = row.get(cfg.answer_column) if has_answer else None
        # as the verifier reads a gold: str(1e-05) is "1e-05", which math-verify takes for e - 5
        items.append(PromptItem(sid, messages, gold_answer_text(answer),
                                ref if ref and ref.strip() else None, tests))

    decontaminated = 0
    if cfg.decontaminate_against:
        from .decontaminate import Decontaminator, load_eval_texts, prompt_text

        deco = Decontaminator(load_eval_texts(cfg.decontaminate_against), cfg.ngram)
        kept = [p for p in items if not deco.contaminated(prompt_text(p.messages))]
        decontaminated = len(items) - len(kept)
        items = kept
    stats = {"input_rows": n_rows + loader_skipped,
             "skipped_bad_rows": len(bad), "bad_rows": bad[:100], "duplicates": duplicates,
             "decontaminated": decontaminated, "decontaminate_against": list(cfg.decontaminate_against),
             "used": len(items)}
    return items, stats


# --- judging ------------------------------------------------------------------------


def _teacher_fingerprint(cfg: DistillConfig, teacher_name: str) -> str:
    return _hash(teacher_name, cfg.temperature, cfg.top_p, cfg.max_completion_length, cfg.seed,
                 cfg.wrong_fraction if cfg.backend == "scripted" else None)


def _verdicts(batch: Sequence[PromptItem], flat: list[tuple[int, int, Any]], cfg: DistillConfig) -> list[str]:
    from .verify import verify_code_tests, verify_math_answers

    out = ["correct"] * len(flat)
    math_idx = [j for j, (k, _, _) in enumerate(flat) if batch[k].tests is None]
    code_idx = [j for j, (k, _, _) in enumerate(flat) if batch[k].tests is not None]
    if math_idx:
        res = verify_math_answers([flat[j][2].text for j in math_idx],
                                  [batch[flat[j][0]].answer for j in math_idx], cfg.verify_timeout)
        for j, v in zip(math_idx, res):
            out[j] = v
    if code_idx:
        res = verify_code_tests([flat[j][2].text for j in code_idx],
                                [batch[flat[j][0]].tests for j in code_idx], cfg.verify_timeout)
        for j, v in zip(code_idx, res):
            out[j] = v
    return out


def _select(candidates: list[tuple[int, int]], policy: str, k: int) -> set[int]:
    """``candidates``: (sample_index, length) of the correct, filter-passing samples."""
    if not candidates:
        return set()
    if policy == "all_correct":
        return {i for i, _ in candidates}
    if policy == "shortest_correct":
        return {min(candidates, key=lambda c: (c[1], c[0]))[0]}
    return {i for i, _ in sorted(candidates)[:k]}


def judge(batch: Sequence[PromptItem], completions: list[list[Any]], cfg: DistillConfig, teacher_name: str,
          counter: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rejection sampling for one shard: returns (SFT rows, rejected-sample records)."""
    from .filters import response_length

    fcfg = FilterConfig(min_length=cfg.min_length, max_length=cfg.max_length,
                        language_mixing_threshold=cfg.language_mixing_threshold,
                        repetition_ngram=cfg.repetition_ngram, repetition_threshold=cfg.repetition_threshold)
    if len(completions) != len(batch):
        raise DataError(f"teacher returned {len(completions)} results for {len(batch)} prompts")
    flat = [(k, i, c) for k, comps in enumerate(completions) for i, c in enumerate(comps)]
    for _, _, c in flat:  # fill token counts the backend did not report
        if c.completion_tokens is None and counter.available:
            c.completion_tokens = counter.completion(c.text)
    prompt_tokens = [next((c.prompt_tokens for c in comps if c.prompt_tokens is not None), None)
                     if comps else None for comps in completions]
    for k, p in enumerate(batch):
        if prompt_tokens[k] is None and counter.available:
            prompt_tokens[k] = counter.prompt(p.messages)
    verdicts = _verdicts(batch, flat, cfg)
    reasons = [first_failure(c.text, c.completion_tokens, c.finish_reason, fcfg) or
               (None if v == "correct" else v) for (_, _, c), v in zip(flat, verdicts)]

    tfp = _teacher_fingerprint(cfg, teacher_name)
    kept_rows, rejected_rows = [], []
    for k, p in enumerate(batch):
        js = [j for j, (kk, _, _) in enumerate(flat) if kk == k]
        cands = [(flat[j][1], response_length(flat[j][2].text, flat[j][2].completion_tokens))
                 for j in js if reasons[j] is None]
        chosen = _select(cands, cfg.keep_policy, cfg.keep_k)
        r1_prompt = with_system(p.messages, cfg.system_prompt)
        for j in js:
            _, i, c = flat[j]
            sample_id = _hash("sample", p.source_id, i, tfp)
            meta = {"source_id": p.source_id, "sample_id": sample_id, "sample_index": i, "answer": p.answer,
                    "teacher": teacher_name, "verdict": verdicts[j], "prompt_tokens": prompt_tokens[k],
                    "completion_tokens": c.completion_tokens, "completion_chars": len(c.text)}
            if i in chosen:
                kept_rows.append({"id": _hash(sample_id, SAMPLE_TYPE_R1), "sample_type": SAMPLE_TYPE_R1,
                                  "messages": sft_messages(r1_prompt, c.text), **meta, "rejection_reason": None})
            else:
                rejected_rows.append({"id": sample_id, "prompt": p.messages, "response": c.text,
                                      "finish_reason": c.finish_reason, **meta,
                                      "rejection_reason": reasons[j] or "not_selected"})
        if chosen and p.reference:
            # The report's <problem, original response> sample: once per kept instance.
            orig_prompt = strip_system(p.messages)
            kept_rows.append({
                "id": _hash(p.source_id, SAMPLE_TYPE_ORIGINAL, p.reference), "sample_type": SAMPLE_TYPE_ORIGINAL,
                "messages": sft_messages(orig_prompt, p.reference), "source_id": p.source_id, "sample_id": None,
                "sample_index": None, "answer": p.answer, "teacher": f"reference ({cfg.reference_column})",
                "verdict": "reference", "prompt_tokens": counter.prompt(orig_prompt) if counter.available else None,
                "completion_tokens": counter.completion(p.reference) if counter.available else None,
                "completion_chars": len(p.reference), "rejection_reason": None})
    return kept_rows, rejected_rows


def _schemas() -> dict[str, Any]:
    """Fixed parquet schemas so every shard (even all-null columns) has the same types."""
    import pyarrow as pa

    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    common = [("source_id", pa.string()), ("sample_id", pa.string()), ("sample_index", pa.int64()),
              ("answer", pa.string()), ("teacher", pa.string()), ("verdict", pa.string()),
              ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("completion_chars", pa.int64()),
              ("rejection_reason", pa.string())]
    return {
        "data": pa.schema([("id", pa.string()), ("sample_type", pa.string()), ("messages", msgs), *common]),
        "rejected": pa.schema([("id", pa.string()), ("prompt", msgs), ("response", pa.string()),
                               ("finish_reason", pa.string()), *common]),
    }


def teacher_display_name(cfg: DistillConfig) -> str:
    """The teacher's name as rows record it, without starting the teacher."""
    if cfg.backend == "scripted":
        from .teachers.scripted import SCRIPTED_NAME

        return SCRIPTED_NAME
    if cfg.backend == "openai":
        return f"openai:{cfg.model_name_or_path}@{(cfg.api_base or '').rstrip('/')}"
    return f"{cfg.backend}:{cfg.model_name_or_path}"


# --- the run ------------------------------------------------------------------------


def greedy_copies_warning(cfg: DistillConfig) -> str | None:
    """What to say when the teacher decodes greedily and several answers are asked per prompt: they are all
    the same answer, and each kept copy becomes its own SFT row."""
    if cfg.backend == "scripted" or cfg.temperature != 0 or cfg.num_generations < 2:
        return None
    return (f"temperature 0 with num_generations {cfg.num_generations}: greedy decoding gives each prompt the same "
            f"answer {cfg.num_generations} times, and every kept copy becomes its own SFT row; sample "
            "(temperature > 0) or set num_generations 1")


def run_distill(cfg: DistillConfig) -> dict[str, Any]:
    """Generate, filter and write the distillation dataset; resumes an interrupted run in
    the same ``output_dir``.  Returns the statistics also written to ``stats.json``."""
    from tqdm.auto import tqdm

    from .distill_stats import build_stats, write_histogram, write_stats
    from .shards import ShardStore
    from .teachers import SamplingSettings, make_teacher
    from .tokens import TokenCounter

    started = time.time()
    if (warning := greedy_copies_warning(cfg)) is not None:
        log.warning(warning)
    # Before the prompts are read: an input edited while they are read is refused on resume
    # rather than recorded as what produced the shards.
    fingerprint = cfg.run_fingerprint()
    items, prompt_stats = prepare_prompts(cfg)
    store = ShardStore(cfg.output_dir, cfg.output_format, _schemas() if cfg.output_format == "parquet" else None)
    if not cfg.overwrite:
        fingerprint = _compare_with_older_run(cfg.output_dir, fingerprint)
    done = store.open(fingerprint, overwrite=cfg.overwrite)
    done_ids = {sid for ids in done.values() for sid in ids}
    todo = [p for p in items if p.source_id not in done_ids]
    next_shard = max(done) + 1 if done else 0
    name = teacher_display_name(cfg)

    if todo:
        teacher = make_teacher(cfg)
        name = teacher.name
        counter = TokenCounter(cfg.model_name_or_path if cfg.backend in ("scripted", "openai") else None)
        sampling = SamplingSettings(temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_tokens=cfg.max_completion_length, seed=cfg.seed,
                                    logprobs=False)  # the samples are judged on their text
        kept_n = total_n = 0
        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="prompt", desc="distill",
                   disable=cfg.disable_tqdm, dynamic_ncols=True)
        try:
            for start in range(0, len(todo), cfg.shard_size):
                batch = todo[start:start + cfg.shard_size]
                comps = teacher.generate([p.messages for p in batch], cfg.num_generations, sampling)
                kept, rejected = judge(batch, comps, cfg, name, counter)
                store.commit(next_shard, kept, rejected, [p.source_id for p in batch])
                next_shard += 1
                kept_n += sum(r["sample_type"] == SAMPLE_TYPE_R1 for r in kept)
                total_n += sum(len(c) for c in comps)
                bar.update(len(batch))
                bar.set_postfix(accept=f"{kept_n / max(total_n, 1):.1%}", samples=total_n)
        finally:
            bar.close()
            teacher.close()

    committed = store.committed()
    stats, lengths = build_stats(store.iter_rows("data", committed), store.iter_rows("rejected", committed),
                                 prompt_stats, name, asdict(cfg))
    stats["histogram"] = "lengths.png"
    stats["elapsed_s_this_invocation"] = round(time.time() - started, 3)
    out = Path(cfg.output_dir)
    write_histogram(out / "lengths.png", lengths, f"Response lengths: {name}")
    write_stats(out / "stats.json", stats)
    return stats


if __name__ == "__main__":
    # One configuration path: `dsv3-posttrain distill --recipe FILE --key value` (posttrain.recipe's
    # parser, with its did-you-mean and type checks) fills DistillConfig.
    print("run distillation with: dsv3-posttrain distill --recipe FILE [--key value ...]", file=sys.stderr)
    sys.exit(2)
