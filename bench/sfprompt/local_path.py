"""Section 2, diagnostics: what the local-loss / EL2N path sees at initialisation.

The device's local path is ``tail(head(x))``, skipping the body. With tied
embeddings it mostly predicts the input token; this module measures how
much, and whether EL2N scores on it rank examples like EL2N on the whole
split model (which is what pruning would want).
"""

from __future__ import annotations

import gc
from typing import Any

from bench.sfprompt.settings import dolly_examples, make_spec


def _ranks(x: Any) -> Any:
    import torch

    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def local_path_diagnostics(model: Any, tokenizer: Any, n: int) -> dict[str, Any]:
    """What the local-loss / EL2N path (tail(head(x)), no body) sees at initialisation.

    On ``n`` Dolly examples of 128 tokens: the local path's token loss, how often
    its argmax is the *input* token itself (tied embedding: the head scores a
    token's own embedding highest), and whether EL2N on the local path ranks
    examples like EL2N on the whole split model (Spearman rank correlation, and
    the overlap of the kept halves).
    """
    import torch

    from client.pruning import el2n_scores, keep_hardest
    from client.split_trainer import _lm_loss, _local_logits
    from models import IGNORE_INDEX, collate_train
    from models.split import PromptedLM, build_split

    spec = make_spec(model, "norm+head")
    head, trunk, tail = build_split(model, spec, init_seed=0)
    whole = PromptedLM(head, trunk, tail)
    examples = dolly_examples(tokenizer, n, seed=2)
    local_scores, full_scores = [], []
    local_loss, full_loss, self_pred, valid_total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, n, 8):
            b = collate_train(examples[start : start + 8], int(tokenizer.pad_token_id))
            ll = _local_logits(head, tail, b)
            fl = whole(b.input_ids, b.attention_mask).logits
            local_scores.append(el2n_scores(ll, b.labels))
            full_scores.append(el2n_scores(fl, b.labels))
            k = b.input_ids.shape[0]
            local_loss += float(_lm_loss(ll, b.labels)) * k
            full_loss += float(_lm_loss(fl, b.labels)) * k
            valid = b.labels[:, 1:] != IGNORE_INDEX
            same = ll[:, :-1].argmax(-1) == b.input_ids[:, :-1]
            self_pred += int((same & valid).sum())
            valid_total += int(valid.sum())
    ls, fs = torch.cat(local_scores).double(), torch.cat(full_scores).double()
    rl, rf = _ranks(ls), _ranks(fs)
    spearman = float(torch.corrcoef(torch.stack([rl, rf]))[0, 1])
    kl, kf = set(keep_hardest(ls, 0.5)), set(keep_hardest(fs, 0.5))
    del head, trunk, tail, whole
    gc.collect()
    return {
        "examples": n,
        "local_path_loss": local_loss / n,
        "full_split_model_loss": full_loss / n,
        "local_argmax_is_input_token": self_pred / max(valid_total, 1),
        "el2n_local_mean": float(ls.mean()),
        "el2n_local_std": float(ls.std()),
        "el2n_full_mean": float(fs.mean()),
        "el2n_full_std": float(fs.std()),
        "spearman_local_vs_full": spearman,
        "kept_half_overlap": len(kl & kf) / max(len(kf), 1),
        "kept_half_overlap_random_expectation": 0.5,
    }
