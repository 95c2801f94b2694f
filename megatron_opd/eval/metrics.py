"""avg@k and the unbiased pass@k estimator.

With ``k`` sampled responses per problem, avg@k is the mean correctness over all
responses (the paper's Avg@16), and pass@k the chance that at least one of ``k``
responses is correct. Estimating pass@k from ``n >= k`` samples of which ``c`` are
correct uses the unbiased estimator of Chen et al. (2021)::

    pass@k = 1 - C(n - c, k) / C(n, k)

computed as a running product so large ``n`` does not overflow.
"""

from __future__ import annotations

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (``0 <= c <= n``, ``1 <= k <= n``)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def avg_at_k(correct) -> float:
    """Mean correctness of ``correct [n_problems, k]`` (bool or 0/1): avg@k."""
    correct = torch.as_tensor(correct, dtype=torch.float64)
    if correct.dim() != 2 or correct.numel() == 0:
        raise ValueError(
            f"avg_at_k expects a non-empty [n_problems, k] table, got shape {tuple(correct.shape)}"
        )
    return correct.mean().item()


def mean_pass_at_k(correct, k: int) -> float:
    """pass@k averaged over problems, from ``correct [n_problems, n]`` with ``n >= k``."""
    correct = torch.as_tensor(correct, dtype=torch.int64)
    if correct.dim() != 2 or correct.numel() == 0:
        raise ValueError(
            f"mean_pass_at_k expects a non-empty [n_problems, n] table, got {tuple(correct.shape)}"
        )
    n = correct.shape[1]
    values = [pass_at_k(n, int(c), k) for c in correct.sum(dim=1).tolist()]
    return sum(values) / len(values)
