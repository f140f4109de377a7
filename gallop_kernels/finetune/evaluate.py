"""Accuracy on multiple-choice tasks, in the two modes the reports name.

- ``generate`` (mode a, the paper's LLM-Adapters protocol): the model writes a
  short reply to the instruction prompt (greedy; the protocol used 4 beams); the
  first label word of the task found in it ("answer2", "true", ...) is its
  answer, and a reply without one is wrong. Only this mode can show collapse.
- ``loglik`` (mode b, as lm-eval-harness): the choice whose continuation has
  the highest log-likelihood (``acc``), or per byte (``acc_norm``). Faster, and
  never below chance.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from .choices import MODES
from .tasks import Example


def extract_answer(reply: str, labels: list[str]) -> int | None:
    """Index of the first label word found in ``reply`` (case-insensitive), or None."""
    pattern = r"\b(" + "|".join(re.escape(label) for label in labels) + r")\b"
    match = re.search(pattern, reply.lower())
    return None if match is None else labels.index(match.group(1))


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
def generate_replies(model, tokenizer, examples: list[Example], *, batch_size: int = 16, max_new_tokens: int = 10,
                     max_len: int = 384, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy replies to each example's prompt, batched with left padding."""
    ids = _prompt_ids(tokenizer, [ex.prompt() for ex in examples], max_len)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    replies = [""] * len(ids)
    pad = tokenizer.pad_token_id
    bar = tqdm(total=len(order), desc=desc, unit="question", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = _left_pad([ids[i] for i in chunk], pad)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        texts = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            replies[i] = text
        bar.update(len(chunk))
    bar.close()
    return replies


def accuracy_generate(model, tokenizer, examples: list[Example], **kw) -> dict:
    """Mode (a): {"acc", "no_answer" (share of replies without a label word), "replies"}."""
    replies = generate_replies(model, tokenizer, examples, **kw)
    picks = [extract_answer(r, ex.labels) for r, ex in zip(replies, examples)]
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
    seqs = []
    for ctx, cont in pairs:
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        t = tokenizer(cont, add_special_tokens=False)["input_ids"]
        seqs.append(((c + t)[-max_len:], min(len(t), max_len - 1)))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [0.0] * len(seqs)
    bar = tqdm(total=len(order), desc=desc, unit="choice", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(seqs[i][0]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # right padding: positions are unaffected
            s = seqs[i][0]
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, i in enumerate(chunk):
            s, n_cont = seqs[i]
            pos = torch.arange(len(s) - n_cont, len(s))
            out[i] = float(logp[row, pos - 1, ids[row, pos]].sum())
        bar.update(len(chunk))
    bar.close()
    return out


def accuracy_loglik(model, tokenizer, examples: list[Example], **kw) -> dict:
    """Mode (b): {"acc", "acc_norm"}; acc_norm divides by the continuation's length in bytes."""
    pairs = [pair for ex in examples for pair in ex.loglik]
    scores = continuation_logprobs(model, tokenizer, pairs, **kw)
    acc = acc_norm = 0
    pos = 0
    for ex in examples:
        s = scores[pos:pos + len(ex.loglik)]
        norm = [v / max(len(cont.encode()), 1) for v, (_, cont) in zip(s, ex.loglik)]
        pos += len(ex.loglik)
        acc += max(range(len(s)), key=s.__getitem__) == ex.answer
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == ex.answer
    n = max(len(examples), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n}


def evaluate_tasks(model, tokenizer, tests: dict[str, list[Example]], modes=MODES, progress: bool = True,
                   **kw) -> dict[str, dict[str, dict]]:
    """{mode: {task: result}} over every task in ``tests`` and every mode in ``modes``."""
    model.eval()
    run = {"generate": accuracy_generate, "loglik": accuracy_loglik}
    return {
        mode: {name: run[mode](model, tokenizer, exs, progress=progress, desc=f"{mode} {name}", **kw)
               for name, exs in tests.items()}
        for mode in modes
    }
