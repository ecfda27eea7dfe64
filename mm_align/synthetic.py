"""A synthetic preference world and adapter: a tiny parametric policy over toy outcomes.

The world: a context is a feature vector ``x ∈ R^d``; an outcome is one of ``K`` ids; a hidden
utility ``u(x, y) = x · M[:, y]`` decides which of two outcomes a "human" prefers. The policy is
a small MLP giving ``log π(y | x) = log_softmax(f(x))[y]`` — a one-token "language model", so
every token-model loss (DPO, IPO, KTO, ...) runs on it through the real training loop, and
held-out preference accuracy measures whether training moved the policy the right way.

It is the core's own test bed (no modality needed) and the loop-overhead benchmark's model.
With ``noise_scale > 0`` each score carries a random perturbation drawn in ``collate`` from the
sample's seed, shared by the policy and the reference pass: a stand-in for the shared noise and
timestep of diffusion adapters, to test that cached and live reference scores agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mm_align.config import from_dict, option
from mm_align.data import PreferencePair, UnpairedSample
from mm_align.fingerprint import state_dict_fingerprint
from mm_align.lora import lora_state_dict
from mm_align.types import Scores

__all__ = ["SyntheticModelConfig", "SyntheticPolicy", "SyntheticWorld", "SyntheticAdapter", "preference_accuracy"]


@dataclass
class SyntheticModelConfig:
    """The synthetic policy: built from sizes, or loaded from a directory written by ``save_pretrained``."""

    pretrained: str | None = option(None, help="Directory with config.json + model.safetensors.")
    dim: int = option(8, help="Context feature size d.")
    n_outcomes: int = option(16, help="Number of outcomes K.")
    hidden: int = option(64, help="MLP width.")
    depth: int = option(2, help="Hidden layers.")
    init_seed: int = option(0, help="Seed of the random initialisation.")
    noise_scale: float = option(0.0, help=">0: scores carry a per-sample random draw (tests stochastic caching).")


class SyntheticPolicy(nn.Module):
    """``f(x)``: an MLP from context features to outcome logits."""

    def __init__(self, dim: int = 8, n_outcomes: int = 16, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.config = {"dim": dim, "n_outcomes": n_outcomes, "hidden": hidden, "depth": depth}
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, n_outcomes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, d) -> (B, K)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        state = state_dict if state_dict is not None else self.state_dict()
        weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(weights, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SyntheticPolicy:
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: not a SyntheticPolicy directory")
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model


class SyntheticWorld:
    """Contexts, outcomes and the hidden utility that plays the human judge."""

    def __init__(self, dim: int = 8, n_outcomes: int = 16, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim, self.n_outcomes = dim, n_outcomes
        self.utility_matrix = torch.randn(dim, n_outcomes, generator=g)  # M: u(x, y) = x · M[:, y]

    def utility(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.utility_matrix  # (B, d) -> (B, K)

    def _contexts(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.dim, generator=g).mul(1e4).round().div(1e4)  # 4 decimals: exact in JSON

    def pairs(self, n: int, seed: int) -> list[PreferencePair]:
        """``n`` pairs on fresh contexts: two distinct outcomes, the higher-utility one chosen."""
        g = torch.Generator().manual_seed(seed)
        x = self._contexts(n, g)
        u = self.utility(x)
        out = []
        for i in range(n):
            a, b = torch.randperm(self.n_outcomes, generator=g)[:2].tolist()
            w, l = (a, b) if u[i, a] > u[i, b] else (b, a)
            out.append(PreferencePair(prompt=x[i].tolist(), chosen=w, rejected=l, id=f"s{seed}-{i}"))
        return out

    def unpaired(self, n: int, seed: int) -> list[UnpairedSample]:
        """``n`` single outcomes, desirable when above the median utility for their context (KTO data)."""
        g = torch.Generator().manual_seed(seed)
        x = self._contexts(n, g)
        u = self.utility(x)
        y = torch.randint(self.n_outcomes, (n,), generator=g)
        med = u.median(dim=1).values
        return [
            UnpairedSample(prompt=x[i].tolist(), completion=int(y[i]), desirable=bool(u[i, y[i]] > med[i]), id=str(i))
            for i in range(n)
        ]


class SyntheticAdapter:
    """The :class:`~mm_align.types.PreferenceAdapter` of the synthetic world (log-prob scores)."""

    score_kind = "logp"
    Config = SyntheticModelConfig
    dataset_formats: dict[str, str] = {}  # reads the core formats only
    base_dir = None  # records hold no media paths

    def __init__(self, config: SyntheticModelConfig | None = None) -> None:
        self.config = config or SyntheticModelConfig()
        c = self.config
        if c.pretrained:
            self.model: nn.Module = SyntheticPolicy.from_pretrained(c.pretrained)
        else:
            torch.manual_seed(c.init_seed)
            self.model = SyntheticPolicy(c.dim, c.n_outcomes, c.hidden, c.depth)
        self.dim = self.model.config["dim"]
        self.n_outcomes = self.model.config["n_outcomes"]
        self.stochastic_scores = c.noise_scale > 0
        self.lora_target_modules = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        self._fingerprint = state_dict_fingerprint(c, self.model)  # the base weights (in memory), before LoRA

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> SyntheticAdapter:
        return cls(from_dict(SyntheticModelConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    def _outcome(self, value: Any, record: Any, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.n_outcomes:
            raise ValueError(
                f"record {getattr(record, 'id', None)!r}: {field} must be an outcome id in [0, {self.n_outcomes}), "
                f"got {value!r}"
            )
        return value

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        for r in records:
            if not isinstance(r.prompt, list) or len(r.prompt) != self.dim:
                raise ValueError(f"record {r.id!r}: prompt must be a list of {self.dim} floats")
        batch = {"x": torch.tensor([r.prompt for r in records], dtype=torch.float32)}  # (B, d)
        if isinstance(records[0], UnpairedSample):
            batch["completion"] = torch.tensor([self._outcome(r.completion, r, "completion") for r in records])
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
        else:
            batch["chosen"] = torch.tensor([self._outcome(r.chosen, r, "chosen") for r in records])
            batch["rejected"] = torch.tensor([self._outcome(r.rejected, r, "rejected") for r in records])
        if self.stochastic_scores:
            draws = [torch.randn(2, generator=torch.Generator().manual_seed(s)) for s in seeds]
            batch["noise"] = torch.stack(draws) * self.config.noise_scale  # (B, 2): shared by policy and reference
        return batch

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        logp = torch.log_softmax(model(batch["x"]).float(), dim=-1)  # (B, K)
        noise = batch.get("noise")
        ones = torch.ones(len(batch["x"]), device=logp.device)
        if "completion" in batch:
            chosen = logp.gather(1, batch["completion"][:, None])[:, 0]
            if noise is not None:
                chosen = chosen + noise[:, 0]
            return Scores("logp", chosen, desirable=batch["desirable"], n_tokens_chosen=ones)
        chosen = logp.gather(1, batch["chosen"][:, None])[:, 0]
        rejected = logp.gather(1, batch["rejected"][:, None])[:, 0]
        if noise is not None:
            chosen, rejected = chosen + noise[:, 0], rejected + noise[:, 1]
        return Scores("logp", chosen, rejected, n_tokens_chosen=ones, n_tokens_rejected=ones)

    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict | None = None) -> None:
        """LoRA weights (peft naming) or the whole policy; ``state_dict`` is the gathered one under sharding."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if lora:
            save_file(lora_state_dict(model, state_dict), str(out / "adapter_model.safetensors"))
            (out / "adapter_config.json").write_text(json.dumps({"base": asdict(self.config)}, indent=2))
        elif state_dict is not None:
            model.save_pretrained(out, state_dict=state_dict)  # type: ignore[operator]
        else:
            model.save_pretrained(out)  # type: ignore[operator]


@torch.no_grad()
def preference_accuracy(model: nn.Module, pairs: list[PreferencePair]) -> float:
    """Fraction of pairs where the policy itself ranks the chosen outcome above the rejected one."""
    x = torch.tensor([p.prompt for p in pairs], dtype=torch.float32)
    logp = torch.log_softmax(model(x).float(), dim=-1)
    w = logp.gather(1, torch.tensor([p.chosen for p in pairs])[:, None])
    l = logp.gather(1, torch.tensor([p.rejected for p in pairs])[:, None])  # noqa: E741
    return float((w > l).float().mean())
