"""Accuracy on multiple-choice tasks, in the two modes the reports name.

- ``generate`` (mode a, the paper's LLM-Adapters protocol): the model writes a
  reply to the instruction prompt, by default as the protocol does (4 beams, 32
  new tokens) and the protocol's extraction picks the answer: the first
  case-sensitive match of the task's label words ("answer1".."answer5",
  "true"/"false", ...); a reply without one is wrong. ``decode="greedy"`` and
  ``extract="lenient"`` (lower-cased, whole words, the example's own labels) are
  faster and kinder. Only this mode can show collapse.
- ``loglik`` (mode b): the choice whose continuation has the highest
  log-likelihood (``acc``), or per byte (``acc_norm``). By default (target
  "label") the continuation is the protocol's reply ``the correct answer is
  <label>`` after the generative prompt, what training teaches; target "text"
  scores each choice's text after a plain question, as lm-eval-harness does.
  Faster than generating, and never below chance.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from . import parallel
from .choices import DECODES, EXTRACTS, MODES
from .tasks import Example

BEAMS = {"beam": 4, "greedy": 1}  # per decode; LLM-Adapters' commonsense_evaluate.py uses num_beams=4
MAX_NEW_TOKENS = 32  # LLM-Adapters' commonsense_evaluate.py
# One regex per dataset in LLM-Adapters' commonsense_evaluate.py (boolq, piqa, siqa/arc/obqa, hellaswag, winogrande).
PROTOCOL_WORDS = (
    ("true", "false"),
    ("solution1", "solution2"),
    ("answer1", "answer2", "answer3", "answer4", "answer5"),
    ("ending1", "ending2", "ending3", "ending4"),
    ("option1", "option2"),
)


def protocol_words(labels: list[str]) -> list[str]:
    """The words the protocol's regex looks for in a reply to a question with ``labels``.

    The protocol's word family that holds the labels (all five ``answerN`` for a
    4-choice ARC question), plus any label of a custom task outside it.
    """
    family = next((words for words in PROTOCOL_WORDS if set(labels) & set(words)), ())
    return [*family, *(label for label in labels if label not in family)]


def extract_answer(reply: str, labels: list[str], rule: str = "protocol") -> int | None:
    """Index into ``labels`` of the answer in ``reply``, or None (a wrong answer).

    - "protocol" (LLM-Adapters): the first case-sensitive match of any of
      :func:`protocol_words` (no word boundaries, as there); a match that is not one
      of ``labels`` ("answer5" for four choices) is wrong.
    - "lenient": the first of ``labels`` found as a whole word, ignoring case.
    """
    if rule == "protocol":
        words = sorted(protocol_words(labels), key=len, reverse=True)  # "answer10" before "answer1"
        match = re.search("|".join(re.escape(w) for w in words), reply)
        word = None if match is None else match.group(0)
    elif rule == "lenient":
        match = re.search(r"\b(" + "|".join(re.escape(label) for label in labels) + r")\b", reply.lower())
        word = None if match is None else match.group(1)
    else:
        raise ValueError(f"unknown extraction rule {rule!r}; expected one of {', '.join(EXTRACTS)}")
    return labels.index(word) if word in labels else None


def _prompt_ids(tokenizer, prompts: list[str], max_len: int) -> list[list[int]]:
    """Token ids per prompt, cut from the left to ``max_len`` (the question's end and the format stay)."""
    return [ids[-max_len:] for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate_replies(model, tokenizer, examples: list[Example], *, batch_size: int = 16,
                     max_new_tokens: int = MAX_NEW_TOKENS, decode: str = "beam", max_len: int = 384,
                     progress: bool = True, desc: str = "generate") -> list[str]:
    """Replies to each example's prompt (``decode``: "beam", 4 beams, or "greedy"), batched with left padding."""
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}; expected one of {', '.join(DECODES)}")
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, [ex.prompt() for ex in examples], max_len)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    replies = {}
    pad = tokenizer.pad_token_id
    sharded = parallel.is_sharded(model)
    chunks = _my_batches(order, batch_size, lockstep=sharded)
    bar = tqdm(total=sum(len(c) for c, keep in chunks if keep), desc=desc, unit="question", disable=not progress,
               leave=False)
    for chunk, keep in chunks:
        input_ids, mask = (t.to(device) for t in _left_pad([ids[i] for i in chunk], pad))
        # sharded: every forward is a collective, so every rank steps until the last one's batch is done
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=BEAMS[decode], pad_token_id=pad, synced_gpus=sharded)
        if keep:
            texts = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
            replies.update(zip(chunk, texts))
            bar.update(len(chunk))
    bar.close()
    replies = parallel.merge(replies)
    return [replies[i] for i in range(len(ids))]


def _my_batches(order: list[int], batch_size: int, lockstep: bool = False) -> list[tuple[list[int], bool]]:
    """This rank's batches of ``order`` (every world-th; all of them in one process), each with whether
    its results are kept. Batches are cut the same way whatever the number of ranks, so each question
    is scored in the same batch as in one process and gets the same answer. With ``lockstep`` (a
    sharded model: each forward is a collective) every rank runs as many batches: a rank short of one
    repeats the first batch, its results dropped."""
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    mine = [(batches[b], True) for b in parallel.mine(len(batches))]
    short = -(-len(batches) // parallel.world()) - len(mine) if lockstep else 0  # 0 too without any batch
    return mine + ([(batches[0], False)] * short if short else [])


def accuracy_generate(model, tokenizer, examples: list[Example], *, extract: str = "protocol", **kw) -> dict:
    """Mode (a): {"acc", "no_answer" (share of replies without a valid label word), "replies"}."""
    replies = generate_replies(model, tokenizer, examples, **kw)
    picks = [extract_answer(r, ex.labels, extract) for r, ex in zip(replies, examples)]
    n = max(len(examples), 1)
    return {
        "acc": sum(p == ex.answer for p, ex in zip(picks, examples)) / n,
        "no_answer": sum(p is None for p in picks) / n,
        "replies": replies,
    }


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16,
                          max_len: int = 384, progress: bool = True, desc: str = "loglik") -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) pair, batched."""
    device = next(model.parameters()).device
    seqs = []
    for ctx, cont in pairs:
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        t = tokenizer(cont, add_special_tokens=False)["input_ids"]
        seqs.append(((c + t)[-max_len:], min(len(t), max_len - 1)))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = {}
    chunks = _my_batches(order, batch_size, lockstep=parallel.is_sharded(model))
    bar = tqdm(total=sum(len(c) for c, keep in chunks if keep), desc=desc, unit="choice", disable=not progress,
               leave=False)
    for chunk, keep in chunks:
        width = max(len(seqs[i][0]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # right padding: positions are unaffected
            s = seqs[i][0]
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        ids = ids.to(device)
        logits = model(input_ids=ids, attention_mask=mask.to(device)).logits
        if not keep:  # a sharded model's lockstep batch
            continue
        for row, i in enumerate(chunk):  # log-softmax at the continuation's positions only: no B x L x V float32 copy
            s, n_cont = seqs[i]
            pos = torch.arange(len(s) - n_cont, len(s), device=device)
            logp = torch.log_softmax(logits[row, pos - 1].float(), dim=-1)
            out[i] = float(logp.gather(1, ids[row, pos].unsqueeze(1)).sum())
        bar.update(len(chunk))
    bar.close()
    out = parallel.merge(out)
    return [out[i] for i in range(len(seqs))]


def accuracy_loglik(model, tokenizer, examples: list[Example], *, target: str = "label", **kw) -> dict:
    """Mode (b): {"acc", "acc_norm"} over Example.choices_scored(target); acc_norm divides by the
    continuation's length in bytes."""
    scored = [ex.choices_scored(target) for ex in examples]
    scores = continuation_logprobs(model, tokenizer, [pair for pairs in scored for pair in pairs], **kw)
    acc = acc_norm = 0
    pos = 0
    for ex, pairs in zip(examples, scored):
        s = scores[pos:pos + len(pairs)]
        norm = [v / max(len(cont.encode()), 1) for v, (_, cont) in zip(s, pairs)]
        pos += len(pairs)
        acc += max(range(len(s)), key=s.__getitem__) == ex.answer
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == ex.answer
    n = max(len(examples), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n}


def evaluate_tasks(model, tokenizer, tests: dict[str, list[Example]], modes=MODES, progress: bool = True, *,
                   batch_size: int = 16, decode: str = "beam", extract: str = "protocol",
                   max_new_tokens: int = MAX_NEW_TOKENS, target: str = "label") -> dict[str, dict[str, dict]]:
    """{mode: {task: result}} over every task in ``tests`` and every mode in ``modes``.

    ``decode``, ``extract`` and ``max_new_tokens`` apply to "generate", ``target`` to "loglik".
    """
    model.eval()
    options = {
        "generate": dict(decode=decode, extract=extract, max_new_tokens=max_new_tokens),
        "loglik": dict(target=target),
    }
    run = {"generate": accuracy_generate, "loglik": accuracy_loglik}
    results = {
        mode: {name: run[mode](model, tokenizer, exs, batch_size=batch_size, progress=progress,
                               desc=f"{mode} {name}", **options[mode])
               for name, exs in tests.items()}
        for mode in modes
    }
    if parallel.is_sharded(model):  # FSDP2 keeps the root's parameters gathered after a forward: shard them again
        model.reshard()
    return results
