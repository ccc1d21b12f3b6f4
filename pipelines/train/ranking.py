"""The model's log-likelihood of each candidate target (a closed label set), given each example's
inputs: what the ``label`` and ``multilabel`` metrics rank (:mod:`pipelines.metrics.labels`).

For example b and candidate c: the sum over the candidate's tokens (its end token included) of the
teacher-forced log-probability, ``log p(y_c | x_b) = sum_t log p(y_c,t | y_c,<t, x_b)``, the same
decoder pass and the same tokens as the training loss (which is its negative mean over tokens). The
encoder runs once per batch; its output is repeated for a chunk of candidates at a time, so a batch
of B examples and C labels costs ceil(C / chunk) decoder passes over B x chunk short sequences
(VGGSound: 309 labels; AudioSet: 527), the chunk sized so that the logits stay under
``max_logits`` numbers.
"""

import torch
from transformers.modeling_outputs import BaseModelOutput

MAX_LOGITS = 2**25  # numbers of the (rows, tokens, vocabulary) logits of one chunk: 128 MiB in float32


def candidate_tokens(tokenizer, labels, max_length: int, device=None) -> tuple:
    """``(labels, mask)`` (C, T) of the candidates as the decoder learns them (``-100`` at padding)."""
    ids, mask = tokenizer.encode_batch(list(labels), max_length=max_length)
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    return ids.masked_fill(mask == 0, -100).to(device), mask.to(device)


@torch.inference_mode()
def candidate_log_likelihoods(model, encoder_outputs, labels: torch.Tensor, max_logits: int = MAX_LOGITS) -> torch.Tensor:
    """``(B, C)`` float32: the log-likelihood of each candidate given each example.

    Args:
        model: the fused T5 (unwrapped).
        encoder_outputs: :meth:`~fuse.model.FusionT5ForConditionalGeneration.encode` of the batch
            (``last_hidden_state`` (B, L, D), ``attention_mask`` (B, L) or None).
        labels: (C, T) candidate token ids, ``-100`` at padding (:func:`candidate_tokens`).
        max_logits: the largest number of logits one decoder pass may make.
    """
    hidden = encoder_outputs.last_hidden_state  # (B, L, D)
    mask = getattr(encoder_outputs, "attention_mask", None)
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # (B, L)
    b, (c, t) = hidden.shape[0], labels.shape
    vocab = model.config.vocab_size
    chunk = max(1, min(c, max_logits // max(1, b * t * vocab)))
    out = []
    for start in range(0, c, chunk):
        cand = labels[start:start + chunk].to(hidden.device)  # (c', T)
        n = cand.shape[0]
        rows = cand.repeat(b, 1)  # (B * c', T): example-major, each example's c' candidates in turn
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(n, 0)),
                       attention_mask=mask.repeat_interleave(n, 0),
                       decoder_input_ids=model._shift_right(rows)).logits  # (B * c', T, V); no loss wanted
        logp = torch.log_softmax(logits.float(), dim=-1)
        keep = rows != -100
        tokens = logp.gather(-1, rows.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep  # (B * c', T)
        out.append(tokens.sum(-1).view(b, n))  # (B, c')
    return torch.cat(out, dim=1)  # (B, C)
