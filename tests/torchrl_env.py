"""A tiny TorchRL environment and a policy whose action equals its one weight (no gym needed).

Module-level so multi-process collectors can pickle ``make_env`` and build the same
policy in their worker processes.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Composite, Unbounded
from torchrl.envs import EnvBase

EPISODE_STEPS = 5


class CountingEnv(EnvBase):
    """Observation: the step count; reward: the action; done after ``EPISODE_STEPS`` steps."""

    def __init__(self) -> None:
        super().__init__(batch_size=torch.Size([]))
        self.observation_spec = Composite(observation=Unbounded(shape=(1,)))
        self.action_spec = Unbounded(shape=(1,))
        self.reward_spec = Unbounded(shape=(1,))
        self._t = 0

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: object) -> TensorDictBase:
        self._t = 0
        return TensorDict({"observation": torch.zeros(1)}, batch_size=[])

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._t += 1
        done = torch.tensor([self._t >= EPISODE_STEPS])
        return TensorDict(
            {
                "observation": torch.full((1,), float(self._t)),
                "reward": tensordict["action"].clone(),
                "done": done,
                "terminated": done.clone(),
            },
            batch_size=[],
        )

    def _set_seed(self, seed: int | None) -> None:
        pass


def make_env() -> CountingEnv:
    return CountingEnv()


class ValueNet(nn.Module):
    """Outputs its single weight, whatever the observation."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(value)))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.value.detach().expand(observation.shape).clone()


def make_policy(value: float = 0.0) -> TensorDictModule:
    return TensorDictModule(ValueNet(value), in_keys=["observation"], out_keys=["action"])


def set_value(policy: TensorDictModule, value: float) -> None:
    """What a training step does here: change the weight in place."""
    with torch.no_grad():
        policy.module.value.fill_(value)


def action_values(batch: TensorDictBase) -> list[float]:
    """The distinct actions of a batch (one value when one set of weights produced it)."""
    return sorted(set(batch["action"].flatten().tolist()))
