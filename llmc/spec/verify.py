"""Exact verification of proposed tokens (Leviathan et al. 2023; Chen et al. 2023).

Greedy rows accept the longest prefix that matches the target's argmax, plus the target's own token at the
first mismatch (or a bonus token when all match). Sampled rows accept proposal x_j with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection they sample from the residual norm(max(0, p_j - q_j)),
and after k acceptances from p_k. The accepted sequence is then distributed exactly as the target's own
samples. A proposer with no distribution (n-gram lookup) is a point mass: q = one-hot.
"""
from __future__ import annotations

import torch


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One categorical sample per row of ``probs [R, V]`` (rows may use their own generator)."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for i, g in enumerate(generators):
        out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out


def _uniform(n: int, k: int, device, generators: list[torch.Generator | None]) -> torch.Tensor:
    u = torch.empty((n, k), device=device)
    for i, g in enumerate(generators):
        u[i] = torch.rand(k, generator=g, device=device)
    return u


def verify(target_probs: torch.Tensor, draft_tokens: torch.Tensor, num_draft: list[int],
           greedy: list[bool], draft_probs: torch.Tensor | None = None,
           generators: list[torch.Generator | None] | None = None) -> list[list[int]]:
    """Tokens to append for each row: the accepted proposals followed by one target token.

    target_probs ``[R, K+1, V]``: the target's sampling distribution at each proposed position (row j is
    the distribution of the token after j accepted proposals); greedy rows may pass one-hot or raw probs.
    draft_tokens ``[R, K]`` (padding ignored beyond ``num_draft[r]``); draft_probs ``[R, K, V]`` or None.
    """
    R, K1, V = target_probs.shape
    gens = generators or [None] * R
    results: list[list[int]] = []
    argmax = target_probs.argmax(-1)  # [R, K+1]
    u = _uniform(R, max(K1 - 1, 1), target_probs.device, gens)
    for r in range(R):
        k = num_draft[r]
        toks = draft_tokens[r, :k]
        if greedy[r]:
            match = (argmax[r, :k] == toks).long()
            a = int(match.cumprod(0).sum()) if k else 0
            results.append(toks[:a].tolist() + [int(argmax[r, a])])
            continue
        p = target_probs[r, :k].gather(-1, toks[:, None]).squeeze(-1) if k else target_probs.new_zeros(0)
        q = draft_probs[r, :k].gather(-1, toks[:, None]).squeeze(-1) if (k and draft_probs is not None) \
            else torch.ones_like(p)
        accept = (u[r, :k] * q < p).long()  # u < p/q without dividing by a zero q
        a = int(accept.cumprod(0).sum()) if k else 0
        if a < k:
            resid = target_probs[r, a].clone()
            if draft_probs is not None:
                resid = (resid - draft_probs[r, a]).clamp_min(0)
            else:
                resid[toks[a]] = 0
            total = resid.sum()
            # p == q exactly leaves nothing to resample; the rejection then had probability 0 anyway.
            resid = resid / total if total > 0 else target_probs[r, a]
            nxt = int(_draw(resid[None], [gens[r]])[0])
        else:
            nxt = int(_draw(target_probs[r, a][None], [gens[r]])[0])
        results.append(toks[:a].tolist() + [nxt])
    return results
