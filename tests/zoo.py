"""Real architectures for the tests and benchmarks: a tiny Hugging Face BERT and a token task.

Not a test file. Tests import it as ``zoo`` (pytest puts ``tests/`` on ``sys.path``); a benchmark
adds ``tests/`` to ``sys.path`` first. Needs ``transformers``; nothing is downloaded.

The token task: each sequence is ``[CLS]`` followed by filler tokens and a few of three marker
tokens, right-padded with id 0; its label is the marker that occurs most often, with a share of
labels replaced at random so that no model is perfect.

>>> ids, mask, y = token_task(2500, seed=0)
>>> model = train_token_model(tiny_bert(), ids[:2000], mask[:2000], y[:2000])
>>> token_accuracy(model, ids[2000:], mask[2000:], y[2000:]) > 0.9
True
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["PAD", "CLS", "MARKERS", "tiny_bert", "token_task", "train_token_model", "token_accuracy"]

PAD, CLS = 0, 1
MARKERS = (2, 3, 4)  # marker of class c is MARKERS[c]; fillers are the ids after them


def tiny_bert(n_classes: int = 3, vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 2,
              seed: int = 0, **config):
    """An untrained ``BertForSequenceClassification`` whose weights are fixed by ``seed``.

    Eager attention, because its masked softmax gives padded keys a weight of exactly 0, so the
    logits do not depend on how much padding follows a sequence. ``initializer_range`` is 0.1
    instead of BERT's 0.02 (sized for 768 dimensions): with 0.02 at 32 dimensions, 2 of 14 seeds
    stalled at about 0.62 accuracy on :func:`token_task` for 12 epochs. ``config`` overrides any
    other ``BertConfig`` field. Layers a user would explain: ``"bert.embeddings"`` (``(N, T,
    hidden)``), ``"bert.encoder.layer.0"`` ... ``"bert.encoder.layer.{layers-1}"`` (hidden states
    ``(N, T, hidden)``), ``"bert.pooler"`` (``(N, hidden)``) and ``"classifier"`` (logits).
    """
    from transformers import BertConfig, BertForSequenceClassification

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, num_labels=n_classes, pad_token_id=PAD, initializer_range=0.1,
                  attn_implementation="eager")
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**kwargs, **config})).eval()


def token_task(n: int, seq_len: int = 32, n_classes: int = 3, vocab_size: int = 64, min_len: int = 16,
               label_noise: float = 0.1, seed: int = 0):
    """A synthetic sequence-classification set with variable lengths and right padding.

    Returns ``(input_ids, attention_mask, labels)``: int64 tensors of shapes ``(n, seq_len)``,
    ``(n, seq_len)`` and ``(n,)``. Real lengths are uniform in ``[min_len, seq_len]``; position 0
    is ``CLS``; after the real tokens come ``PAD`` ids with mask 0. Each sequence holds 1 to 4
    copies of each of ``n_classes`` marker tokens, with a unique most frequent one that is the
    label; then a share ``label_noise`` of labels is drawn again uniformly (so the best accuracy
    is about ``1 - label_noise * (n_classes - 1) / n_classes``).
    """
    if not 2 <= n_classes <= len(MARKERS):
        raise ValueError(f"The 'n_classes' parameter of token_task must be in [2, {len(MARKERS)}]. Got {n_classes}.")
    if vocab_size <= MARKERS[-1] + 1:
        raise ValueError(f"The 'vocab_size' parameter of token_task must be > {MARKERS[-1] + 1}. Got {vocab_size}.")
    if not 4 * n_classes + 1 <= min_len <= seq_len:
        raise ValueError(f"The 'min_len' parameter of token_task must be in [{4 * n_classes + 1}, seq_len={seq_len}] "
                         f"to hold up to 4 copies of each marker. Got {min_len}.")
    rng = np.random.default_rng(seed)
    ids = np.full((n, seq_len), PAD, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        while True:  # redraw ties for the most frequent marker
            counts = rng.integers(1, 5, n_classes)
            if (counts == counts.max()).sum() == 1:
                break
        length = int(rng.integers(min_len, seq_len + 1))
        body = rng.integers(MARKERS[-1] + 1, vocab_size, length - 1)
        pos = rng.permutation(length - 1)[: counts.sum()]
        body[pos] = np.repeat(np.asarray(MARKERS[:n_classes]), counts)
        ids[i, 0], ids[i, 1:length], mask[i, :length] = CLS, body, 1
        labels[i] = counts.argmax()
    noisy = rng.random(n) < label_noise
    labels[noisy] = rng.integers(0, n_classes, noisy.sum())
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)


def train_token_model(model: nn.Module, input_ids, attention_mask, labels, *, epochs: int = 5,
                      batch_size: int = 32, lr: float = 2e-3, warmup: float = 0.1, seed: int = 0) -> nn.Module:
    """Fine-tune a Hugging Face sequence classifier; returns it in eval mode.

    AdamW (weight decay 0.01), the learning rate rising linearly over the first ``warmup`` share
    of steps and then falling linearly to 0, gradients clipped to norm 1, as Hugging Face's
    ``Trainer`` does by default. On 2,000 sequences of :func:`token_task` the defaults reach its
    ceiling (about 0.93) for each of 16 seeds tried.
    """
    ids, mask, y = (torch.as_tensor(a) for a in (input_ids, attention_mask, labels))
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(ids) // batch_size)
    rise = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / rise if s < rise else max(0.0, (steps - s) / max(1, steps - rise)))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ids), generator=gen).split(batch_size):
            opt.zero_grad()
            out = model(input_ids=ids[idx], attention_mask=mask[idx])
            nn.functional.cross_entropy(out.logits, y[idx]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def token_accuracy(model: nn.Module, input_ids, attention_mask, labels, batch_size: int = 512) -> float:
    """Share of sequences that ``model`` classifies as ``labels``."""
    model.eval()
    pred = torch.cat([model(input_ids=i, attention_mask=m).logits.argmax(1)
                      for i, m in zip(torch.as_tensor(input_ids).split(batch_size),
                                      torch.as_tensor(attention_mask).split(batch_size))])
    return float((pred == torch.as_tensor(labels)).float().mean())
