"""PA3C, the learner of PixelDRL-MG: pixel-wise A3C with PixelRL's reward-map convolution.

Every pixel ``i`` is an agent with its own policy ``pi(a_i | s)``, value ``V_i(s)``, reward
``r_i`` and return ``R_i``; all share one network. Per episode of ``t_max`` steps (a batch of
slices, synchronous; the asynchronous workers of A3C become the batch and, later, DDP ranks):

- **Returns with the reward-map convolution** (PixelRL Eq. 8; PixelDRL-MG Eq. 8). A pixel's
  return also credits its neighbours' futures::

      R(T) = 0                                   (terminal: the episode ends after t_max steps)
      R(t) = r(t) + gamma * (w conv R(t+1))       for t = T-1 .. 0        (maps (B, 1, H, W))

  ``w`` is one learnable 2D kernel (33 x 33 in PixelRL), initialised to the identity, so at
  initialisation ``R(t)`` is the plain discounted return ``sum_k gamma^k r(t+k)``; unrolled,
  ``R(t) = r(t) + gamma w*r(t+1) + gamma^2 w*w*r(t+2) + ...``.
- **No bootstrap at t_max.** After the last step no action remains and no reward follows, so
  the true value of the final state is 0 (PixelRL ends its episodes the same way, with
  ``done=True``). Bootstrapping with ``V(s_T)`` would credit steps that never happen; the
  value network cannot even tell, since the state carries no step counter. ``bootstrap`` is
  still accepted for rollouts cut before the end (then ``R(T) = V(s_T)``, detached, as in
  PixelRL, and it too goes through ``w``).
- **How w learns.** As in PixelRL's code, ``w`` receives gradients from the value loss only:
  the returns are differentiable in ``w`` (and in nothing else), the advantage in the policy
  loss is detached. ``reward_conv_in_policy=True`` also lets the policy term reach ``w``
  (``d w = -grad_w sum log pi (R - V) + grad_w sum (R - V)^2``, the gradient for ``w`` as we
  read it in the PixelRL paper).
- **Loss** (means over steps, slices and pixels)::

      A = R - V
      policy  = -mean(log pi(a | s) * A.detach())
      value   =  mean(A^2)
      entropy =  mean(H(pi(. | s)))
      total   = policy + 0.5 * value - 0.01 * entropy

  (PixelRL's code also halves the squared error inside the value term; here the 0.5 of the
  paper is applied once.) The total is not a progress measure: its policy term is scaled by
  the current advantages, large while the critic is untrained. Watch the return, the value
  term and the Dice instead.

  Without revival a pixel already at zero has no effective action left (both actions give
  the same next state, so its true advantage is 0): with ``active_seq`` those pixels drop
  out of the policy and entropy terms (they still count in the denominators, so the loss
  scale does not change as the mask shrinks), which removes pure noise from the gradient.
  The value term keeps every pixel.
- **Where the signal is.** The reward telescopes, so with ``gamma`` close to 1 an action's
  effect on its own return is small except at the last step: with revival, zeroing an object
  pixel at step ``t < T-1`` costs -1 now but +gamma back if the next step revives it, a net
  ``-(1 - gamma)``; at ``t = T-1`` it costs the full -1. Expect the policy to be shaped
  mostly by the last steps, and returns to be noisy.
- **Optimiser** (paper): Adam, learning rate 1e-3, x0.9 every 25 epochs, gamma 0.95.

The reward-map convolution is needed for training only; inference needs the network alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from steprl.segmentation.environment import T_MAX, SegmentationEnv


@dataclass
class PA3CConfig:
    """Hyper-parameters of the paper (and of PixelRL where the paper is silent)."""

    t_max: int = T_MAX
    gamma: float = 0.95
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    lr: float = 1e-3
    lr_decay: float = 0.9
    lr_decay_every: int = 25  # epochs
    reward_conv_size: int = 33  # PixelRL's reward-map kernel
    allow_revival: bool = True  # see steprl.segmentation.environment
    reward_conv_in_policy: bool = False
    mask_inactive: bool = True


class RewardMapConv(nn.Module):
    """The learnable reward-map convolution ``w``, one ``k x k`` kernel, no bias, zero padding.

    Stored as ``identity + delta`` with ``delta`` initialised to zero, so at initialisation
    ``forward`` is exactly the identity on any device and precision (a convolution with a
    stored identity kernel is not exact under TF32). ``(B, 1, H, W)`` -> ``(B, 1, H, W)``.
    """

    def __init__(self, kernel_size: int = 33) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the reward-map kernel size must be odd, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.delta = nn.Parameter(torch.zeros(1, 1, kernel_size, kernel_size))

    @property
    def kernel(self) -> torch.Tensor:
        """The effective kernel ``w`` ``(1, 1, k, k)``."""
        identity = torch.zeros_like(self.delta)
        identity[..., self.kernel_size // 2, self.kernel_size // 2] = 1.0
        return identity + self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + correlate_same(x, self.delta).to(x.dtype)


def correlate_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, kernel, padding=k // 2)`` for one large odd kernel, computed by FFT in float32.

    ``x`` ``(B, 1, H, W)``, ``kernel`` ``(1, 1, k, k)`` -> ``(B, 1, H, W)`` float32, zero padding.
    A direct 33 x 33 single-channel convolution is slow on CPUs (about 1 s per forward and
    backward for four 256 x 256 maps, ten per episode); the FFT costs milliseconds anywhere.
    """
    height, width = x.shape[-2:]
    size = kernel.shape[-1]
    full = (height + size - 1, width + size - 1)
    flipped = kernel.float().flip(-1, -2)  # cross-correlation = convolution with the flipped kernel
    spectrum = torch.fft.rfft2(x.float(), s=full) * torch.fft.rfft2(flipped, s=full)
    pad = size // 2
    return torch.fft.irfft2(spectrum, s=full)[..., pad : pad + height, pad : pad + width]


def discounted_returns(
    rewards: Sequence[torch.Tensor],
    bootstrap: torch.Tensor | None,
    gamma: float,
    reward_conv: nn.Module | None = None,
) -> list[torch.Tensor]:
    """``R(t) = r(t) + gamma * w(R(t+1))`` for ``t = T-1 .. 0``, ``R(T) = bootstrap`` or 0.

    ``rewards``: ``T`` maps ``(B, 1, H, W)``. ``bootstrap``: ``V(s_T)`` ``(B, 1, H, W)`` for a
    truncated rollout (detached here), ``None`` for a terminal end (PixelDRL-MG's episodes).
    ``reward_conv``: ``w``; ``None`` is the identity (plain n-step returns). Returns ``T`` maps
    ``(B, 1, H, W)``, differentiable in ``w``'s parameters only.
    """
    if not rewards:
        return []
    future = torch.zeros_like(rewards[-1]) if bootstrap is None else bootstrap.detach().to(rewards[-1].dtype)
    returns: list[torch.Tensor] = [rewards[-1]] * len(rewards)
    for t in reversed(range(len(rewards))):
        if reward_conv is not None:
            future = reward_conv(future)
        future = rewards[t] + gamma * future
        returns[t] = future
    return returns


def log_probs_and_entropy(logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(a | s)`` and the policy entropy per pixel, both ``(B, H, W)`` float32.

    ``logits`` ``(B, A, H, W)``, ``actions`` ``(B, H, W)`` integer.
    """
    log_pi = F.log_softmax(logits.float(), dim=1)
    chosen = log_pi.gather(1, actions.long().unsqueeze(1)).squeeze(1)
    entropy = -(log_pi.exp() * log_pi).sum(dim=1)
    return chosen, entropy


def pa3c_loss(
    logits_seq: Sequence[torch.Tensor],
    values_seq: Sequence[torch.Tensor],
    actions_seq: Sequence[torch.Tensor],
    returns_seq: Sequence[torch.Tensor],
    *,
    entropy_coef: float = 0.01,
    value_coef: float = 0.5,
    active_seq: Sequence[torch.Tensor] | None = None,
    reward_conv_in_policy: bool = False,
) -> dict[str, torch.Tensor]:
    """The PA3C loss of one episode (see the module docstring); all sequences have ``T`` items.

    Shapes per step: logits ``(B, 2, H, W)``, values ``(B, 1, H, W)``, actions ``(B, H, W)``,
    returns ``(B, 1, H, W)``, active ``(B, H, W)`` bool (``None``: every pixel acts).
    Returns float32 scalars ``total`` (to backpropagate), ``policy``, ``value``, ``entropy``
    and ``advantage`` (mean ``R - V``, detached, for logs).
    """
    steps = len(logits_seq)
    if not steps or not (len(values_seq) == len(actions_seq) == len(returns_seq) == steps):
        raise ValueError("logits, values, actions and returns need the same, non-zero number of steps")
    if active_seq is not None and len(active_seq) != steps:
        raise ValueError("active_seq needs one mask per step")
    policy = value = entropy = advantage_sum = torch.zeros((), device=logits_seq[0].device)
    count = 0
    for t in range(steps):
        log_pi, step_entropy = log_probs_and_entropy(logits_seq[t], actions_seq[t])
        v = values_seq[t].float()[:, 0]
        ret = returns_seq[t].float()[:, 0]
        advantage = ret - v
        weight = advantage.detach() if not reward_conv_in_policy else ret - v.detach()
        if active_seq is not None:
            active = active_seq[t].to(log_pi.dtype)
            weight = weight * active
            step_entropy = step_entropy * active
        policy = policy - (log_pi * weight).sum()
        entropy = entropy + step_entropy.sum()
        value = value + (advantage**2).sum()
        advantage_sum = advantage_sum + advantage.detach().sum()
        count += advantage.numel()
    policy, value, entropy = policy / count, value / count, entropy / count
    total = policy + value_coef * value - entropy_coef * entropy
    return {"total": total, "policy": policy, "value": value, "entropy": entropy, "advantage": advantage_sum / count}


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One action per pixel drawn from ``softmax(logits)`` ``(B, 2, H, W)`` -> ``(B, H, W)`` long.

    ``generator`` (optional) must live on ``logits``' device.
    """
    keep_probability = torch.softmax(logits.detach().float(), dim=1)[:, 1]
    draw = torch.rand(keep_probability.shape, generator=generator, device=logits.device)
    return (draw < keep_probability).long()


def greedy_actions(logits: torch.Tensor) -> torch.Tensor:
    """The most probable action per pixel, ``(B, 2, H, W)`` -> ``(B, H, W)`` long (ties: keep)."""
    return (logits[:, 1] >= logits[:, 0]).long()


@dataclass
class Episode:
    """What one training episode leaves for the loss; lists of ``T`` per-step tensors."""

    logits: list[torch.Tensor] = field(default_factory=list)  # (B, 2, H, W), with graph
    values: list[torch.Tensor] = field(default_factory=list)  # (B, 1, H, W), with graph
    actions: list[torch.Tensor] = field(default_factory=list)  # (B, H, W) long
    rewards: list[torch.Tensor] = field(default_factory=list)  # (B, 1, H, W)
    active: list[torch.Tensor] = field(default_factory=list)  # (B, H, W) bool, before the step
    final_mask: torch.Tensor | None = None  # (B, 1, H, W)


def collect_episode(
    net: nn.Module,
    env: SegmentationEnv,
    images: torch.Tensor,
    gt: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Episode:
    """Run one sampled episode of ``env.t_max`` steps; the network's outputs keep their graph.

    ``images``, ``gt``: ``(B, 1, H, W)`` on the network's device. Call under the autocast of
    your choice; the loss casts to float32. The mask-independent part of the network
    (``net.encode``) runs once per episode; with late fusion its graph is shared by all steps.
    """
    if gt is None:
        raise ValueError("training episodes need the ground truth (gt) for their rewards")
    episode = Episode()
    env.reset(images, gt)
    encoded = _encode(net, images, with_value=True)
    while not env.done:
        episode.active.append(env.actionable)
        logits, value = _decide(net, encoded, env.mask, with_value=True)
        actions = sample_actions(logits, generator)
        _, reward, _ = env.step(actions)
        episode.logits.append(logits)
        episode.values.append(value)
        episode.actions.append(actions)
        episode.rewards.append(reward)
    episode.final_mask = env.mask
    return episode


def episode_loss(episode: Episode, reward_conv: nn.Module | None, config: PA3CConfig) -> dict[str, torch.Tensor]:
    """Terminal returns (no bootstrap) and the PA3C loss of ``episode``; adds ``return`` (mean R(0))."""
    returns = discounted_returns(episode.rewards, None, config.gamma, reward_conv)
    losses = pa3c_loss(
        episode.logits,
        episode.values,
        episode.actions,
        returns,
        entropy_coef=config.entropy_coef,
        value_coef=config.value_coef,
        active_seq=episode.active if config.mask_inactive else None,
        reward_conv_in_policy=config.reward_conv_in_policy,
    )
    losses["return"] = returns[0].detach().float().mean()
    return losses


@torch.no_grad()
def greedy_masks(
    net: nn.Module, images: torch.Tensor, t_max: int = T_MAX, allow_revival: bool = True
) -> list[torch.Tensor]:
    """Segment with the most probable action at every step; the masks ``f(1) .. f(t_max)``.

    ``images`` ``(B, 1, H, W)``; returns ``t_max`` float masks ``(B, 1, H, W)`` (1 = object),
    the last one being the segmentation. The value head is not evaluated.
    """
    env = SegmentationEnv(t_max, allow_revival)
    env.reset(images)
    encoded = _encode(net, images, with_value=False)
    masks = []
    while not env.done:
        logits, _ = _decide(net, encoded, env.mask, with_value=False)
        env.step(greedy_actions(logits))
        masks.append(env.mask.clone())
    return masks


def _encode(net: nn.Module, images: torch.Tensor, with_value: bool):
    """``net.encode`` when the network splits image and mask (PixelDRLNet), else the images themselves."""
    encode = getattr(net, "encode", None)
    return encode(images, with_value=with_value) if callable(encode) else images


def _decide(net: nn.Module, encoded, mask: torch.Tensor, with_value: bool):
    """One step's ``(logits, value)``: ``net.decide`` on the encoding, or ``net([images, mask])``."""
    decide = getattr(net, "decide", None)
    if callable(decide):
        return decide(encoded, mask, with_value=with_value)
    return net(torch.cat([encoded, mask.to(encoded.dtype)], dim=1), with_value=with_value)


def make_optimizer(modules: Iterable[nn.Module], config: PA3CConfig) -> torch.optim.Adam:
    """Adam over the network and the reward-map convolution, learning rate ``config.lr``."""
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    return torch.optim.Adam(parameters, lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: PA3CConfig) -> torch.optim.lr_scheduler.StepLR:
    """Learning rate x ``lr_decay`` every ``lr_decay_every`` epochs (call ``step()`` once per epoch)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay)
