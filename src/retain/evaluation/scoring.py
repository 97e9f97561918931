"""Scoring a task, batched: choice log-likelihood, exact match of greedy answers, perplexity.

Written by hand rather than through an evaluation harness because every score must use
the run's own prompt format, adapter routing and batching, on tiny models as on real ones.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
import re
import string
from typing import Callable, Iterator, Sequence

import torch

from retain import sharding
from retain.streams.task import GENERATED, Example, Task
from retain.parallel import SINGLE, Processes

Advance = Callable[[int], None]
log = logging.getLogger(__name__)


def _noop(_: int) -> None:
    pass


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """The model in eval mode (no dropout) inside, in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def context_limit(model, max_length: int | None = None) -> int | None:
    """The longest sequence scoring may feed ``model``: ``max_length`` (``eval.max_length``) or
    the model's positions less those a wrapper adds (soft prompts), whichever is smaller.

    Beyond its positions a model either fails (learned position embeddings) or reads
    positions it never trained on (RoPE), so longer prompts are cut from the left, as
    lm-evaluation-harness cuts them: the end of a prompt holds the question and the answer cue."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int):
        positions -= int(getattr(model, "added_positions", 0) or 0)
    limits = [v for v in (max_length, positions) if isinstance(v, int) and v > 0]
    return min(limits) if limits else None


def cut_prompts(model, encoded: list[list[int]], max_length: int | None, reserve: int, what: str) -> list[list[int]]:
    """Each prompt's last tokens that leave ``reserve`` (the answer's) within ``context_limit``;
    says once how many were longer."""
    limit = context_limit(model, max_length)
    if limit is None:
        return encoded
    limit = max(limit - reserve, 1)
    long = sum(len(ids) > limit for ids in encoded)
    if long:
        log.warning("%s: %d of %d prompts are longer than %d tokens and were cut from the left "
                    "(eval.max_length or the model's positions, less the answer's tokens)", what, long,
                    len(encoded), limit)
    return [ids[-limit:] for ids in encoded]


def encode_pair(tokenizer, prompt: str, continuation: str, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of prompt+continuation and the continuation's length; prompt cut from the left."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(p) + len(c) > max_length:
        keep = max(max_length - len(c), 1)
        p = p[-keep:]
        c = c[: max_length - len(p)]
    # With no prompt token (plain text and no BOS) the first token has no context to score.
    return p + c, len(c) if p else max(len(c) - 1, 0)


def _pad(encoded: Sequence[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def right_pad(encoded: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded on the right."""
    return _pad(encoded, pad, left=False)


def left_pad(encoded: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded on the left (the last token aligned)."""
    return _pad(encoded, pad, left=True)


def _token_logprobs(logits: torch.Tensor, rows: list[int], cols: list[int], targets: list[int]) -> torch.Tensor:
    """log p(target) at the given (row, column) positions of a logits tensor: only those
    positions' rows of the vocabulary are normalized (a logsumexp each)."""
    picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)].float()
    tgt = torch.tensor(targets, device=logits.device)
    return picked.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - picked.logsumexp(-1)


@torch.no_grad()
def continuation_logprobs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32, advance: Advance = _noop,
    max_length: int | None = None,
) -> list[tuple[float, int]]:
    """Sum of log p(continuation | prompt) and its token count, for each pair.

    For a plain (or PEFT) model the rows are left-padded, so every continuation ends in the
    last columns and only those columns' logits are computed (``logits_to_keep``). Wrappers
    that rewrite the input (l2p's soft prompts) get right-padded rows as they expect. Either
    way only the continuation positions are normalized, never the whole vocabulary at every
    position. A pair longer than ``context_limit`` loses the start of its prompt."""
    limit = context_limit(model, max_length)
    encoded = [encode_pair(tokenizer, p, c, limit) for p, c in pairs]
    return encoded_logprobs(model, encoded, tokenizer.pad_token_id, batch_size, advance)


@torch.no_grad()
def encoded_logprobs(model, encoded: Sequence[tuple[list[int], int]], pad: int, batch_size: int = 32,
                     advance: Advance = _noop) -> list[tuple[float, int]]:
    """``continuation_logprobs`` of token ids: (sequence, length of its continuation) each."""
    from retain.embeddings import ModelWrapper

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    device = _device(model)
    lean = not isinstance(model, ModelWrapper)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [encoded[i][0] for i in idx]
        if lean:
            ids, mask = left_pad(seqs, pad)
            keep = min(max(encoded[i][1] for i in idx) + 1, ids.shape[1])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=keep).logits
            offset = ids.shape[1] - keep  # column of logits[:, 0] in the padded rows
            ends = [ids.shape[1]] * len(idx)
        else:
            ids, mask = right_pad(seqs, pad)
            offset, ends = 0, [len(s) for s in seqs]
            query = mask.clone()  # the prompt alone: see ModelWrapper
            for row, i in enumerate(idx):
                query[row, ends[row] - encoded[i][1]:ends[row]] = 0
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           query_mask=query.to(device)).logits
        rows, cols, targets, owner = [], [], [], []
        for row, i in enumerate(idx):
            n = encoded[i][1]
            for col in range(ends[row] - n, ends[row]):  # the token at col is predicted at col - 1
                rows.append(row)
                cols.append(col - 1 - offset)
                targets.append(int(ids[row, col]))
                owner.append(row)
        sums = torch.zeros(len(idx))
        if rows:
            sums.index_add_(0, torch.tensor(owner), _token_logprobs(logits, rows, cols, targets).cpu())
        for row, i in enumerate(idx):
            out[i] = (float(sums[row]), encoded[i][1])
        advance(len(idx))
    return out


def prefix_cache_ok(model, prompts: Sequence[list[int]]) -> bool:
    """Whether the prompt's cached state can stand in for re-reading it with each option.

    Not for wrappers that rewrite the input sequence or route on the whole of it (l2p's
    prompt pool, LoRA experts): they score each option as a full sequence, as before."""
    from retain.embeddings import ModelWrapper

    return not isinstance(model, ModelWrapper) and all(prompts)


def _cache_keyword() -> str:
    """transformers 5 calls the key/value cache ``cache`` (``past_key_values`` before)."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE = _cache_keyword()


@torch.no_grad()
def shared_prefix_logliks(model, prompts: Sequence[list[int]], options: Sequence[Sequence[list[int]]], pad: int,
                          batch_size: int = 32, advance: Advance = _noop) -> list[list[float]]:
    """Sum of log p(option | prompt) for every option of every prompt, each prompt encoded once.

    Up to ``batch_size`` prompts of similar length run together, left-padded, keeping only
    the last position's logits: when every option is one token that is the whole answer.
    Otherwise all options of each prompt run as one packed row over the prompts' key/value
    cache (``_packed_continuations``). Only option positions are normalized (a logsumexp
    each), never the vocabulary at every position of the prompt."""
    device = _device(model)
    out: list[list[float]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        single = all(len(o) == 1 for i in idx for o in options[i])
        ids, mask = left_pad([prompts[i] for i in idx], pad)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=not single,
                    logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)
        rest = [[0.0] * len(options[i]) for i in idx]
        if not single:
            rest = _packed_continuations(model, getattr(res, CACHE), mask, [options[i] for i in idx], pad)
        for r, i in enumerate(idx):
            out[i] = [float(first[r, o[0]]) + rest[r][j] if o else 0.0 for j, o in enumerate(options[i])]
        advance(sum(len(options[i]) for i in idx))
    return out


def _packed_continuations(model, cache, prompt_mask: torch.Tensor, options: list[Sequence[list[int]]],
                          pad: int) -> list[list[float]]:
    """log p(tokens 2.. of each option | its prompt, token 1) for a batch of prompts in one pass.

    Each row holds all its prompt's options one after another (every token but the last of
    each), with a 4-D attention mask by which each option sees the prompt's cache and its
    own earlier tokens only, and positions that restart after the prompt for each option:
    the prompt's keys and values are never copied."""
    device = prompt_mask.device
    segments = [[o[:-1] for o in opts] for opts in options]
    width = max(sum(len(seg) for seg in row) for row in segments)
    if width == 0:
        return [[0.0] * len(opts) for opts in options]
    batch, plen = prompt_mask.shape
    ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
    positions = torch.zeros((batch, width), dtype=torch.long, device=device)
    allowed = torch.zeros((batch, width, plen + width), dtype=torch.bool, device=device)
    allowed[:, :, :plen] = prompt_mask.bool().unsqueeze(1)
    start_of = prompt_mask.sum(-1)
    targets = []  # (row, column, token predicted there, option)
    for r, row in enumerate(segments):
        col = 0
        for j, seg in enumerate(row):
            for t, token in enumerate(seg):
                ids[r, col + t] = token
                positions[r, col + t] = start_of[r] + t
                allowed[r, col + t, plen + col: plen + col + t + 1] = True
                targets.append((r, col + t, options[r][j][t + 1], j))
            col += len(seg)
        allowed[r, col:, plen + col:] = torch.eye(width - col, dtype=torch.bool, device=device)  # padding
    dtype = next(model.parameters()).dtype
    mask4d = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    logits = model(input_ids=ids, attention_mask=mask4d.unsqueeze(1), position_ids=positions, use_cache=False,
                   **{CACHE: cache}).logits
    out = [[0.0] * len(opts) for opts in options]
    if targets:
        logp = _token_logprobs(logits, [t[0] for t in targets], [t[1] for t in targets],
                               [t[2] for t in targets]).tolist()
        for (r, _, _, j), value in zip(targets, logp):
            out[r][j] += value
    return out


def choice_logliks(model, tokenizer, task: Task, examples: Sequence[Example], batch_size: int = 32,
                   advance: Advance = _noop, shared_prefix: bool | None = None,
                   max_length: int | None = None) -> list[list[float]]:
    """Log-likelihood of each option of each example (the answer as the task renders it).

    ``shared_prefix``: encode each prompt once for all its options (None: wherever the
    model allows it, see ``prefix_cache_ok``); False scores each option as a whole sequence.
    Prompts are cut from the left so that prompt and longest option fit ``context_limit``."""
    prompts = [tokenizer(task.prompt(tokenizer, ex), add_special_tokens=True)["input_ids"] for ex in examples]
    options = [[tokenizer(task.target(o), add_special_tokens=False)["input_ids"] for o in ex.options or ()]
               for ex in examples]
    longest = max((len(o) for opts in options for o in opts), default=0)
    prompts = cut_prompts(model, prompts, max_length, longest, f"task {task.name}")
    if shared_prefix is None:
        shared_prefix = prefix_cache_ok(model, prompts)
    if shared_prefix:
        return shared_prefix_logliks(model, prompts, options, tokenizer.pad_token_id, batch_size, advance)
    # Every option after the same (cut) prompt, each as a whole sequence.
    encoded = [(prompt + o, len(o) if prompt else max(len(o) - 1, 0))  # as encode_pair counts
               for prompt, opts in zip(prompts, options) for o in opts]
    owners = [k for k, opts in enumerate(options) for _ in opts]
    out: list[list[float]] = [[] for _ in examples]
    for owner, (lp, _) in zip(owners, encoded_logprobs(model, encoded, tokenizer.pad_token_id, batch_size, advance)):
        out[owner].append(lp)
    return out


def argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (ties go to the earlier option, as numpy's)."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def pick(logliks: Sequence[float], options: Sequence[str], normalize_length: bool = False) -> int:
    """The chosen option: highest log-likelihood, or highest per character of the option's
    text (``acc_norm``: the harness divides by ``len(choice)``, the option without the
    space before it)."""
    if normalize_length:
        return argmax([lp / max(len(o), 1) for lp, o in zip(logliks, options)])
    return argmax(logliks)


@dataclass
class TaskScore:
    """A task's score and what stands behind it."""

    #: The score R records: accuracy in percent (``acc``, or ``acc_norm`` for tasks scored
    #: that way), or perplexity.
    value: float
    #: Test items scored.
    n: int
    #: Standard error of ``value`` in points: sample standard deviation of the per-item
    #: scores over sqrt(n), as lm-evaluation-harness reports it; None for perplexity.
    stderr: float | None
    #: Every score computed (``acc`` and ``acc_norm`` for choice tasks).
    scores: dict[str, float]
    #: Per test item, in test order: its score in points under the task's own scoring (100/0
    #: for an accuracy) and the model's answer (the chosen option's index, or the generated
    #: text); None for perplexity, which is one ratio over all tokens, not a mean of items.
    items: list[float] | None = None
    predictions: list | None = None


def item_score(metric: str, answer: str, example: Example) -> float:
    """One generated answer's score in points (100 right, 0 wrong, or a similarity)."""
    from retain.evaluation import text_metrics as tm

    if metric == "exact_match":
        return 100.0 * any(normalize(answer) == normalize(ref) for ref in example.answers)
    if metric == "rouge_l":  # the best reference, as SuperNI's and SAPT's evaluation take it
        return max(tm.rouge_l(answer, ref) for ref in example.answers)
    if metric == "sari":
        return tm.sari(example.input, answer, list(example.answers))
    if metric == "edit_similarity":
        # The reference line as a model should write it: the first line, without the outer spaces.
        return tm.edit_similarity(answer.strip().split("\n", 1)[0], example.output.strip())
    if metric == "number":
        return 100.0 * tm.numbers_match(answer, example.output)
    if metric == "choice_letter":
        return 100.0 * tm.choices_match(answer, example.output)
    raise ValueError(f"no per-item score for metric '{metric}'")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation over sqrt(n): lm-evaluation-harness's standard error of a mean."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def binomial_stderr(hits: int, n: int) -> float | None:
    """Standard error, in points, of an accuracy of ``hits``/``n`` (sample std / sqrt(n))."""
    if n < 2:
        return None
    p = hits / n
    return 100.0 * math.sqrt(p * (1 - p) / (n - 1))


_PUNCT = re.compile(f"^[{re.escape(string.punctuation)}\\s]+|[{re.escape(string.punctuation)}\\s]+$")


def normalize(text: str) -> str:
    """First line, lower case, outer punctuation and inner runs of spaces removed."""
    text = text.strip().split("\n", 1)[0].lower()
    return " ".join(_PUNCT.sub("", text).split())


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 32,
             advance: Advance = _noop, max_length: int | None = None, what: str = "generation") -> list[str]:
    """Greedy answers, left-padded batches, decoded without special tokens. A prompt is cut
    from the left so that it and ``max_new_tokens`` fit ``context_limit``."""
    device = _device(model)
    synced = sharding.is_sharded(model)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    encoded = cut_prompts(model, encoded, max_length, max_new_tokens, what)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], pad)
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            # Sharded weights: each forward is a collective, so every process steps until all are done.
            synced_gpus=synced,
        )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
        advance(len(idx))
    return answers


def evaluate_task(model, tokenizer, task: Task, examples: Sequence[Example] | None = None, *, batch_size: int = 32,
                  max_new_tokens: int = 16, advance: Advance = _noop, processes: Processes = SINGLE,
                  max_length: int | None = None) -> TaskScore:
    """The task's score with its standard error (and, for choice tasks, both acc and acc_norm).

    In a data-parallel run each process scores its share of the items and the raw answers
    (log-likelihoods, generations) are gathered in item order, so every process returns the
    score one process computes."""
    examples = list(task.test if examples is None else examples)
    if not examples:
        return TaskScore(float("nan"), 0, None, {})
    n = len(examples)
    share = processes.share(examples)
    with eval_mode(model):
        if task.metric == "choice":
            logliks = processes.gather(choice_logliks(model, tokenizer, task, share, batch_size, advance,
                                                      max_length=max_length))
            gold = [ex.answer_index for ex in examples]
            picks = {key: [pick(lls, ex.options, key == "acc_norm") for lls, ex in zip(logliks, examples)]
                     for key in ("acc", "acc_norm")}
            hits = {key: sum(p == g for p, g in zip(chosen, gold)) for key, chosen in picks.items()}
            key = "acc_norm" if task.choice_norm else "acc"
            return TaskScore(100.0 * hits[key] / n, n, binomial_stderr(hits[key], n),
                             {k: 100.0 * v / n for k, v in hits.items()},
                             [100.0 * (p == g) for p, g in zip(picks[key], gold)], picks[key])
        if task.metric in GENERATED:
            prompts = [task.prompt(tokenizer, ex) for ex in share]
            # A task's own answer length (a summary) wins over the run's default (a label).
            answers = processes.gather(generate(model, tokenizer, prompts, task.max_new_tokens or max_new_tokens,
                                                batch_size, advance, max_length, f"task {task.name}"))
            values = [item_score(task.metric, a, ex) for a, ex in zip(answers, examples)]
            mean = sum(values) / n
            return TaskScore(mean, n, mean_stderr(values), {task.metric: mean}, values, answers)
        pairs = [(task.prompt(tokenizer, ex) if ex.input else "", task.target(ex.output)) for ex in share]
        scores = processes.gather(continuation_logprobs(model, tokenizer, pairs, batch_size, advance, max_length))
        nll, count = -sum(s for s, _ in scores), sum(n for _, n in scores)
        ppl = math.exp(nll / max(count, 1))
        return TaskScore(ppl, n, None, {"perplexity": ppl})


def score_task(model, tokenizer, task: Task, examples: Sequence[Example] | None = None, *, batch_size: int = 32,
               max_new_tokens: int = 16, advance: Advance = _noop, max_length: int | None = None) -> float:
    """The task's score: accuracy in percent, or perplexity for ``perplexity`` tasks."""
    return evaluate_task(model, tokenizer, task, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         advance=advance, max_length=max_length).value


def work_units(task: Task, n_examples: int, processes: Processes = SINGLE) -> int:
    """Sequences the scorer runs for a task (for progress bars): this process's share."""
    share = processes.share(task.test[:n_examples])
    if task.metric == "choice":
        return sum(len(ex.options or ()) for ex in share)
    return len(share)
