"""Per-domain counters for metrics.jsonl / TensorBoard.

Keys: `domain/<name>/samples` and `domain/<name>/tokens` (cumulative since the start of
training, restored on resume) and `domain/<name>/loss` (token-mean loss of that domain's
samples since the previous as_dict() call; absent for a domain with no loss tokens since then).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


class DomainTracker:
    def __init__(self, domain_names: Sequence[str]) -> None:
        self.domain_names = list(domain_names)
        n = len(self.domain_names)
        self.samples = torch.zeros(n, dtype=torch.int64)
        self.tokens = torch.zeros(n, dtype=torch.int64)
        self._loss_sum = torch.zeros(n, dtype=torch.float64)
        self._loss_tokens = torch.zeros(n, dtype=torch.float64)

    def update(
        self,
        domain: torch.Tensor,
        tokens: Union[int, torch.Tensor],
        loss_sum: torch.Tensor,
        loss_tokens: torch.Tensor,
    ) -> None:
        """domain: [b] domain indices; tokens: tokens per sample (an int, or [b]);
        loss_sum: [b] summed per-token loss of each sample; loss_tokens: [b] its loss-token count.
        (Sum these over DP ranks first, or sum the trackers' results, for global numbers.)"""
        domain = domain.detach().to("cpu", torch.int64).reshape(-1)
        b = domain.numel()
        if isinstance(tokens, torch.Tensor):
            tok = tokens.detach().to("cpu", torch.int64).reshape(-1).expand(b) if tokens.numel() == 1 else tokens.detach().to("cpu", torch.int64).reshape(-1)
        else:
            tok = torch.full((b,), int(tokens), dtype=torch.int64)
        self.samples.index_add_(0, domain, torch.ones(b, dtype=torch.int64))
        self.tokens.index_add_(0, domain, tok)
        self._loss_sum.index_add_(0, domain, loss_sum.detach().to("cpu", torch.float64).reshape(-1))
        self._loss_tokens.index_add_(0, domain, loss_tokens.detach().to("cpu", torch.float64).reshape(-1))

    def add_totals(self, totals: torch.Tensor) -> None:
        """Add per-domain sums already reduced over ranks: [n_domains, 4] =
        (samples, tokens, loss_sum, loss_tokens)."""
        totals = totals.detach().to("cpu", torch.float64)
        self.samples += totals[:, 0].round().to(torch.int64)
        self.tokens += totals[:, 1].round().to(torch.int64)
        self._loss_sum += totals[:, 2]
        self._loss_tokens += totals[:, 3]

    def as_dict(self, reset_loss: bool = True) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, name in enumerate(self.domain_names):
            out[f"domain/{name}/samples"] = int(self.samples[i])
            out[f"domain/{name}/tokens"] = int(self.tokens[i])
            if self._loss_tokens[i] > 0:
                out[f"domain/{name}/loss"] = float(self._loss_sum[i] / self._loss_tokens[i])
        if reset_loss:
            self._loss_sum.zero_()
            self._loss_tokens.zero_()
        return out

    def state_dict(self) -> dict:
        return {
            "domain_names": list(self.domain_names),
            "samples": self.samples.tolist(),
            "tokens": self.tokens.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["domain_names"]) != self.domain_names:
            raise ValueError(
                f"domain tracker state is for {state['domain_names']}, this run has {self.domain_names}"
            )
        self.samples = torch.tensor(state["samples"], dtype=torch.int64)
        self.tokens = torch.tensor(state["tokens"], dtype=torch.int64)
        self._loss_sum.zero_()
        self._loss_tokens.zero_()
