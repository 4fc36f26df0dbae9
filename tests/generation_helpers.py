"""Generation checks on the tiny model."""
from __future__ import annotations

import torch


def assert_greedy_by_full_forwards(model, inputs: dict, new_tokens: torch.Tensor) -> None:
    """``new_tokens`` [1, n] (what generate decoded after ``inputs``) equal greedy decoding by full forwards
    without a cache, one token at a time."""
    ids, att = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for step in range(new_tokens.shape[1]):
        kw = dict(extra)
        if "mm_token_type_ids" in inputs:
            kw["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(1, step, dtype=torch.int64)], dim=1)
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=att, **kw).logits[:, -1].argmax(-1, keepdim=True)
        assert nxt.item() == new_tokens[0, step].item(), step
        ids, att = torch.cat([ids, nxt], dim=1), torch.cat([att, torch.ones_like(nxt)], dim=1)
