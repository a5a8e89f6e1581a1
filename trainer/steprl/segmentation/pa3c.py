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
- **Optimiser** (paper): Adam with a stepwise learning-rate decay (the defaults of
  :class:`~steprl.segmentation.config.SegTrainConfig` and :class:`PA3CConfig` are the paper's).
- **Why the trained policy decides everything at step 1** (issue 3's open question). The
  rewards telescope, so the return of an episode is a weighted sum of the per-step errors
  ``e(t) = (f(t) - G)^2`` (:func:`step_error_weights`, checked in the tests)::

      R(0) = e(0) - (1 - gamma) * sum_{t=1}^{T-1} gamma^(t-1) e(t) - gamma^(T-1) e(T)

  Every mask ``f(1) .. f(T)`` is penalised with a positive weight (0.05, 0.0475, ... and 0.63
  for the last with gamma 0.95, T 10), and with revival every ``f(t)`` is a free choice. No
  information arrives after step 0: the state ``[image, f(t-1)]`` holds nothing the image did
  not, since ``f(t-1)`` is the policy's own output. So the best policy puts the most probable
  mask at EVERY step, from step 1 on; a mask that improves over the steps is one whose first
  steps were worse than they could have been, which this objective penalises. Without
  revival the same holds (waiting has no option value when nothing new is learnt). Extra
  steps can only help through extra computation (the previous mask as context for a network
  too weak to decide in one pass), and the RL signal for that is the small ``1 - gamma``
  weight of the intermediate steps. Measured on noisy ellipses (32 x 32, widths 8/16/32/64,
  200 episodes of 8 slices, seeds 0 / 1, 64 unseen slices;
  ``trainer/benchmarks/bench_pixeldrl_steps.py``, results in
  ``trainer/benchmarks/results/bench_pixeldrl_steps_cpu.md``):

  * late fusion (our default): after step 1 the greedy masks change on 0.4-0.9% of the
    pixels, Dice moves by -0.004..+0.010 from step 1 to 10, and giving the policy the TRUE
    mask instead of its own changes only 0.7-1.7% of its decisions: it has learnt, correctly,
    to ignore the mask. Flat Dice after step 1 is the formulation's optimum, not a bug.
  * the paper's network (mask at the input, the whole network sees it): the policy uses the
    mask more (2-8% of decisions), but with the paper's rewards Dice FALLS after step 1
    (0.730 -> 0.704, seed 0); with ``class_balance`` it RISES over several steps, on unseen
    slices, at every checkpoint from episode 75 (seed 0: +0.04..+0.11) or 125 (seed 1:
    +0.00..+0.03) on, e.g. 0.629 -> 0.661 -> 0.670 -> 0.674 -> 0.677 (seed 0, episode 200).
    The first step over-segments (balanced weights make ambiguous pixels lean to object)
    and the later steps trim it using the mask as global context: real step-by-step
    refinement, the "extra computation" case above. Its final Dice (0.677 / 0.722) is still
    below the one-step late-fusion policy's (0.824 / 0.734) on this task and budget, and it
    costs ~25x more per step, so it is not the default.
- **The all-background phase** (why greedy validation Dice is 0 for many epochs on small
  objects): early in training the policy's shared bias receives one "zero" push per
  background pixel and one "keep" push per object pixel, so with a small object it is driven
  to "zero" everywhere faster than the features learn to separate the classes. The policy
  already RANKS object above background (mean keep probability 0.19 on object vs 0.07 on
  background pixels after 25 episodes in the ellipse experiment) while the greedy mask is
  empty. ``class_balance=True`` (:func:`class_weights`, a stated deviation, off by default)
  weights each pixel's rewards so the two classes push equally. Measured (same experiment):
  greedy Dice after 25 episodes 0.60 / 0.55 instead of 0.00 / 0.55 (late fusion) and 0.42
  instead of 0.00 for the paper's network, which without it stayed at all-background for 75
  episodes; final Dice within the seed spread (late: 0.809 / 0.708 vs 0.824 / 0.734). On a
  smaller object the balancing itself becomes the problem (white matter, 4% of the pixels:
  full weights over-segment, plain rewards collapse; see :func:`balance_strength`), so the
  white-matter starter model fades the weights over its first 200 updates to a floor of 0.3
  (``--class-balance-anneal 200 --class-balance-floor 0.3``).

The reward-map convolution is needed for training only; inference needs the network alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from steprl.segmentation.config import T_MAX, PA3CConfig
from steprl.segmentation.environment import SegmentationEnv


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


def step_error_weights(t_max: int, gamma: float) -> list[float]:
    """Weights ``w_1 .. w_T`` with ``R(0) = e(0) - sum_t w_t e(t)`` (terminal, identity reward map).

    ``e(t) = (f(t) - G)^2`` is the error of the mask after step ``t``; ``w_t = (1 - gamma)
    gamma^(t-1)`` for ``t < T`` and ``gamma^(T-1)`` for the last step (see the module docstring:
    why the optimal policy is a one-step decision). They sum to 1.
    """
    return [(1.0 - gamma) * gamma ** (t - 1) for t in range(1, t_max)] + [gamma ** (t_max - 1)]


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
    gt: torch.Tensor | None = None  # (B, 1, H, W), the target the rewards were computed from


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
    episode.gt = gt
    return episode


def class_weights(gt: torch.Tensor, limit: float = 10.0) -> torch.Tensor:
    """Per-pixel reward weights ``(B, 1, H, W)`` that give object and background equal total weight.

    ``w = 0.5 / pi`` on object pixels and ``0.5 / (1 - pi)`` on background, ``pi`` the object
    fraction of the batch (weights capped at ``limit``; an all-background batch gets 1).

    Why (a deviation from the paper, used only with ``class_balance=True``): every pixel is its
    own agent, and multiplying an agent's rewards by a positive constant does not change that
    agent's optimal policy. What it changes is the compromise the SHARED network makes early
    in training, before its features separate the classes: then the policy's common bias gets
    one "zero" push per background pixel and one "keep" push per object pixel, so with a small
    object (4% white matter, a few % tumour) the greedy policy goes to all-background and
    stays there until the features win (the "collapse" of the BraTS benchmark). Balanced
    weights cancel that push. The price: on pixels the network cannot tell apart the learned
    policy leans towards "object" (a balanced rather than a frequency-weighted decision).
    """
    target = gt.float()
    pi = float(target.mean())
    if pi <= 0.0 or pi >= 1.0:
        return torch.ones_like(target)
    w_obj = min(limit, 0.5 / pi)
    w_bg = min(limit, 0.5 / (1.0 - pi))
    return target * w_obj + (1.0 - target) * w_bg


def balance_strength(config: PA3CConfig, iteration: int) -> float:
    """How much of :func:`class_weights` applies at update ``iteration`` (0-based): 0 without
    ``class_balance``, 1 without annealing, else ``1 - iteration / class_balance_anneal``, not
    below ``class_balance_floor``.

    Why: full balancing keeps biasing ambiguous pixels towards "object" for good (a pixel is
    kept when ``P(object) > w_bg / (w_bg + w_obj)``, 0.05 for white matter at 4% of the pixels,
    weights 10 vs 0.52), which costs precision; fading it out completely brings the
    all-background collapse back. Measured on the white-matter task (96 x 96, 1.87M
    parameters, validation Dice on synthetic slices): full balancing plateaued at 0.32-0.33
    (sensitivity 0.96, precision 0.29 on MNI152); fading to the plain rewards over 200 updates
    reached 0.44 at strength 0.25 and then collapsed to 0.00 within 100 updates once the
    strength went below 0.15. A floor keeps the decision threshold moderate (floor 0.3: pixels
    kept at ``P(object) > 0.19``) and the training away from the collapse.
    """
    if not config.class_balance:
        return 0.0
    if config.class_balance_anneal <= 0:
        return 1.0
    floor = min(1.0, max(0.0, float(config.class_balance_floor)))
    return max(floor, 1.0 - iteration / config.class_balance_anneal)


def episode_loss(episode: Episode, reward_conv: nn.Module | None, config: PA3CConfig,
                 balance: float | None = None) -> dict[str, torch.Tensor]:
    """Terminal returns (no bootstrap) and the PA3C loss of ``episode``; adds ``return`` (mean R(0)).

    ``balance``: the share of :func:`class_weights` applied to the rewards, ``w' = 1 + balance
    (w - 1)``; None: 1 with ``config.class_balance``, else 0 (see :func:`balance_strength`).
    """
    rewards = episode.rewards
    if balance is None:
        balance = 1.0 if config.class_balance else 0.0
    if balance > 0:
        if episode.gt is None:
            raise ValueError("class_balance needs the episode's gt")
        weights = 1.0 + balance * (class_weights(episode.gt) - 1.0)
        weights = weights.to(rewards[0].dtype)
        rewards = [r * weights for r in rewards]
    returns = discounted_returns(rewards, None, config.gamma, reward_conv)
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


def make_optimizer(modules: Iterable[nn.Module], lr: float) -> torch.optim.Adam:
    """Adam over the trainable parameters of ``modules`` (the network and the reward-map convolution)."""
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    return torch.optim.Adam(parameters, lr=lr)
