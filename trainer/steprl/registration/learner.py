"""The SPAC learner: SAC on the low-dimensional plan, plus the unsupervised registration loss.

One ``train_iteration`` is one episode on a batch of pairs (``episode_steps`` steps). At each
step, in this order:

1. **Act and learn to register** (paper Eq. 8): the planner samples a plan ``z`` by
   reparameterisation, the actor decodes it into a raw step ``a``; the loss
   ``-LNCC(fixed, moving o (u + a)) + smooth * |grad a|^2 + kl * KL(pi(z|s) || N(0, I))`` trains
   planner and actor. The ORIGINAL moving image is warped by the composed field.
2. **Step the environment** with ``a`` clamped to ``+-train_max_step`` voxels; the reward is the
   Dice improvement of (pseudo-)labels; the transition ``(s, z, r, s')`` enters the replay buffer.
3. **SAC update** from a replay batch (once the buffer holds ``replay_batch`` transitions and
   ``sac_start`` episodes have run: a warm-up in which the planner and actor learn to register
   by the registration loss alone, so the critics first see sensible transitions; an episode
   without SAC costs about a third of one with it in 3D):
   twin critics regress the soft Bellman target with clipped double Q,
   ``y = r + gamma (1 - d) (min Q'(s', z') - alpha log pi(z'|s'))``; the planner maximises
   ``min Q(s, z) - alpha log pi(z|s)``; ``log alpha`` is learned towards ``target_entropy``;
   target critics follow by Polyak averaging with ``tau``.

**Training through the rollout** (``unroll = W > 0``; the 3D recipe, a departure from the paper's
schedule): instead of step 1 above, each episode runs the policy's own rollout of
``episode_steps`` steps and backpropagates the registration loss through windows of ``W``
composed steps (shared weights, like a recursive cascade; truncated backpropagation: each
window starts from the detached field the previous one reached). The loss of a window is the
mean over its steps of the loss of the COMPOSED field after that step, so every step is asked
to leave the best registration it can and Dice rises step after step; the same clamp and the
same number of steps are used in training and at test (unrolled methods degrade past the depth
they were trained for). One window is one optimiser update. SAC on the plan starts from that
warm start once ``sac_start`` episodes have run (the paper trains both from the start).

Multi-process (torchrun): every rank runs its own episodes (different seeds) and gradients
are averaged across ranks before every optimiser step, which is what DDP does.
"""

from __future__ import annotations

import copy
import logging
import sys

import numpy as np
import torch
import torch.nn.functional as F

from steprl import metrics, spatial
from steprl.losses import field_mse, gradient_penalty, kl_to_standard_normal, ncc_loss
from steprl.registration.config import LAYOUT_FIELDS, TEST_STEPS, SPACConfig, SPACTrainConfig
from steprl.registration.data import PairSource
from steprl.registration.environment import RegistrationEnv
from steprl.registration.networks import Critic, SPACPolicy, count_parameters, squash
from steprl.registration.replay import ReplayBuffer
from steprl.training.distributed import DistInfo, average_gradients
from steprl.training.record import carried_runs, check_same_layout, counting_seconds, cpu_hours

log = logging.getLogger(__name__)


class SPACLearner:
    """Implements :class:`steprl.training.loop.Learner` for SPAC."""

    method = "spac"

    def __init__(self, net_cfg: SPACConfig, cfg: SPACTrainConfig, source: PairSource, dist: DistInfo) -> None:
        self.net_cfg, self.cfg, self.source, self.dist = net_cfg, cfg, source, dist
        self.device = dist.device
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.policy = SPACPolicy(net_cfg).to(self.device)
        self.critic1, self.critic2 = Critic(net_cfg).to(self.device), Critic(net_cfg).to(self.device)
        self.critic1_target, self.critic2_target = copy.deepcopy(self.critic1), copy.deepcopy(self.critic2)
        for p in [*self.critic1_target.parameters(), *self.critic2_target.parameters()]:
            p.requires_grad_(False)
        self.log_alpha = torch.nn.Parameter(torch.tensor(cfg.init_log_alpha, device=self.device))
        self.alpha_holder = torch.nn.Module()
        self.alpha_holder.log_alpha = self.log_alpha
        self.target_entropy = cfg.target_entropy if cfg.target_entropy is not None else -net_cfg.plan_dim / 2
        self.modules = {"policy": self.policy, "critic1": self.critic1, "critic2": self.critic2,
                        "critic1_target": self.critic1_target, "critic2_target": self.critic2_target,
                        "alpha": self.alpha_holder}
        self.optimizers = {
            "policy": torch.optim.Adam(self.policy.parameters(), lr=cfg.lr),
            "planner": torch.optim.Adam(self.policy.planner.parameters(), lr=cfg.planner_lr),
            "critics": torch.optim.Adam([*self.critic1.parameters(), *self.critic2.parameters()], lr=cfg.critic_lr),
            "alpha": torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr),
        }
        self.replay = ReplayBuffer(cfg.replay_capacity)
        self.data_description: dict = {}
        self.earlier_runs: list[dict] = []  # the training record of the model this run started from
        self.seconds = 0.0  # wall time spent in training and validation, over resumes
        self.rng = np.random.default_rng(cfg.seed + 1000 * dist.rank)
        if dist.is_main:
            log.info("SPAC %dD: policy %d parameters, each critic %d", net_cfg.ndim, count_parameters(self.policy),
                     count_parameters(self.critic1))

    def init_from(self, model) -> None:
        """Start from the policy weights of a model file or bundled model (``--init-from``).

        The network layout must match (:data:`~steprl.registration.config.LAYOUT_FIELDS`; the
        grid, the step bound and ``zero_mean`` may differ: the weights do not depend on them);
        the model's training record is carried into this run's card, so a model trained over
        many runs keeps the whole history of its commands, updates and CPU-hours.
        """
        from steprl.modelfile import check_state_dict, load_model, resolve_model_path

        path = resolve_model_path(model)
        state, card = load_model(path, method="spac", ndim=self.net_cfg.ndim, device="cpu")
        theirs = {k: v for k, v in SPACConfig.from_dict(card["config"]).to_dict().items() if k in LAYOUT_FIELDS}
        ours = {k: v for k, v in self.net_cfg.to_dict().items() if k in LAYOUT_FIELDS}
        if not theirs.get("field_input") and ours["field_input"]:  # grow the input layer, same function
            state = _with_field_input(state, self.policy)
            theirs["field_input"] = True
        check_same_layout(path, theirs, ours, "Give the same network options as the model (see `steprl info MODEL`).")
        check_state_dict(self.policy, state, path)
        self.policy.to(self.device)
        self.earlier_runs = carried_runs(card)
        if self.dist.is_main:
            log.info("initialised the policy from %s (%d earlier runs)", path, len(self.earlier_runs))

    # ---- the Learner protocol -------------------------------------------------------
    def train_iteration(self, iteration: int) -> dict[str, float]:
        with counting_seconds(self):
            return self._train_iteration(iteration)

    def _training_env(self, batch) -> RegistrationEnv:
        """An episode's environment: the training clamp; hard-Dice rewards with the distance loss."""
        cfg = self.cfg
        return RegistrationEnv(batch.fixed, batch.moving, batch.fixed_labels, batch.moving_labels,
                               self.source.num_labels, cfg.episode_steps, cfg.train_max_step, cfg.reward_scale,
                               score="hard" if cfg.distance_weight > 0 else "soft",
                               field_in_state=self.net_cfg.field_input)

    def _train_iteration(self, iteration: int) -> dict[str, float]:
        cfg = self.cfg
        batch = self.source.sample(cfg.batch_pairs, self.rng).to(self.device)
        if cfg.unroll > 0:
            return self._rollout_iteration(iteration, batch)
        env = self._training_env(batch)
        state = env.reset()
        logs: dict[str, list[float]] = {}
        done = False
        while not done:
            plan, step, aux = self._registration_update(env, state, batch.true_field, batch.field_known)
            out = env.step(step)
            self.replay.add(state, plan, out.reward, out.state, out.done)
            state, done = out.state, out.done
            _append(logs, aux)
            _append(logs, {"reward": out.reward.mean().item()})
            if iteration >= cfg.sac_start and len(self.replay) >= cfg.replay_batch:
                _append(logs, self._sac_update())
        result = {k: float(np.mean(v)) for k, v in logs.items()}
        result["dice_final"] = env.dice.mean().item()
        return result

    def validate(self) -> dict[str, float]:
        """Deterministic rollouts on the fixed validation pairs; ``score`` = final mean Dice."""
        with counting_seconds(self):
            return self._validate()

    def _validate(self) -> dict[str, float]:
        """Deterministic rollouts with the test clamp: HARD Dice (nearest-neighbour labels) per step, NCC, and the
        final field's folding (% det J <= 0) and std log det J (the smoothness the acceptance bounds)."""
        batch = self.source.validation().to(self.device)
        env = RegistrationEnv(batch.fixed, batch.moving, batch.fixed_labels, batch.moving_labels,
                              self.source.num_labels, self.cfg.val_steps, self.cfg.test_max_step, score="hard",
                              field_in_state=self.net_cfg.field_input)
        state = env.reset()
        curve = [env.dice.mean().item()]  # hard Dice, as evaluation measures it (label_distance says why)
        self.policy.eval()
        with torch.no_grad():
            for _ in range(self.cfg.val_steps):
                _, step = self.policy.act(state, deterministic=True)
                state = env.step(step).state
                curve.append(env.dice.mean().item())
            ncc = -ncc_loss(batch.fixed, env.warped(), self.cfg.ncc_window).item()
            jacobian = metrics.jacobian_stats(spatial.jacobian_determinant(env.field))
            soft = env.dice_of(env.field).mean().item()
        self.policy.train()
        out = {"score": curve[-1], "dice_identity": curve[0], "dice_step1": curve[1], "dice_final": curve[-1],
               "soft_dice_final": soft, "ncc_final": ncc, **jacobian}
        if len(curve) > 10:
            out["dice_step10"] = curve[10]
        return out

    def end_epoch(self, epoch: int) -> None:
        pass

    def export_model(self) -> tuple[dict[str, torch.Tensor], dict]:
        state = {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}
        card = {
            "method": "spac",
            "ndim": self.net_cfg.ndim,
            "config": self.net_cfg.to_dict(),
            "inference": {"max_step": self.cfg.test_max_step, "steps": TEST_STEPS, "ncc_window": self.cfg.ncc_window,
                          **getattr(self.source, "inference_card", {})},
            "normalisation": {"kind": "percentile", "percentiles": [0.5, 99.5]},
            "training": {**self.cfg.to_dict(), "labels": "real" if self.source.labels_are_real else "kmeans-3",
                         "data": self.data_description, "command": " ".join(["steprl", *sys.argv[1:]]),
                         "cpu_hours": cpu_hours(self.seconds),
                         "device": self.device.type,
                         **({"earlier_runs": self.earlier_runs} if self.earlier_runs else {})},
        }
        return state, card

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "replay_next": self.replay.next, "seconds": self.seconds,
                "earlier_runs": self.earlier_runs}

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.replay.next = int(state["replay_next"])
        self.seconds = float(state["seconds"])
        self.earlier_runs = list(state["earlier_runs"])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The replay buffer, so a resumed run continues exactly where it stopped."""
        return self.replay.to_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.replay.load_tensors(tensors)

    # ---- updates ----------------------------------------------------------------------
    def _step_optimizer(self, name: str, loss: torch.Tensor, params, clip: float | None = None) -> float | None:
        """One optimiser step; with ``clip``, the global gradient norm is clipped and returned (before clipping)."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(params)
        average_gradients(params)
        norm = None
        if clip:
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip).item()
        opt.step()
        return norm

    def _registration_update(self, env: RegistrationEnv, state: torch.Tensor, true_field: torch.Tensor | None = None,
                             field_known: torch.Tensor | None = None):
        """Paper Eq. 8 on the current states; returns the sampled plan, raw step and logs.

        With ``true_field`` ``(B, ndim, *S)`` (voxels) and ``field_known`` ``(B,)``, the loss also
        has ``field_weight`` times the mean squared distance of the composed field to the true
        one over the known items: every step is asked to complete the registration.
        """
        mu, log_std, skips = self.policy.planner(state)
        plan, _ = squash(mu, log_std)
        step = self.policy.actor(plan, skips)
        cfg = self.cfg
        loss, logs = self._step_loss(env, spatial.compose(env.field, step), true_field, field_known, smooth_of=step)
        kl = kl_to_standard_normal(mu, log_std)
        loss = loss + cfg.kl_weight * kl
        logs["kl"] = kl.item()
        norm = self._step_optimizer("policy", loss, self.policy.parameters(), cfg.grad_clip)
        if norm is not None:
            logs["grad_norm"] = norm
        return plan.detach(), step.detach(), logs

    def _step_loss(self, env: RegistrationEnv, field: torch.Tensor, true_field: torch.Tensor | None,
                   field_known: torch.Tensor | None, smooth_of: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """Registration loss of a COMPOSED voxel field ``(B, ndim, *S)``: -LNCC, label Dice, smoothness, known field.

        The smoothness term penalises ``smooth_of`` (default: the composed field itself; the
        paper's per-step update penalises the step).
        """
        cfg = self.cfg
        smooth = gradient_penalty(field if smooth_of is None else smooth_of)
        loss = cfg.smooth_weight * smooth
        logs = {"smooth": smooth.item()}
        if cfg.ncc_weight > 0:
            ncc = -ncc_loss(env.fixed, env.warped(field), cfg.ncc_window)
            loss = loss - cfg.ncc_weight * ncc
            logs["ncc"] = ncc.item()
        if cfg.dice_weight > 0:
            dice = env.dice_of(field, cfg.label_sigma).mean()
            loss = loss + cfg.dice_weight * (1 - dice)
            logs["soft_dice"] = dice.item()
        if cfg.distance_weight > 0:
            distance = env.distance_of(field, cfg.distance_clip).mean()
            loss = loss + cfg.distance_weight * distance
            logs["label_distance"] = distance.item()
        if cfg.field_weight > 0 and true_field is not None and bool(field_known.any()):
            error = field_mse(field, true_field)  # (B,) voxels^2
            field_loss = error[field_known].mean()
            loss = loss + cfg.field_weight * field_loss
            logs["field_mse"] = field_loss.item()
        return loss, logs

    def _rollout_iteration(self, iteration: int, batch) -> dict[str, float]:
        """One episode trained through its own rollout, in windows of ``unroll`` steps (module docstring).

        Each window: ``W`` policy steps with gradients through the composed fields and the
        warped states, loss = mean over the window's steps of :meth:`_step_loss` plus the plan's
        KL; one optimiser update. The transitions go to the replay buffer for SAC.

        Before SAC starts the rollout uses the plan MEAN, as at test time: a sampled plan is
        broadcast over the whole grid, so its noise only adds a random global component to every
        step, and nothing yet needs exploring. (It was not the cause of the constant drift the
        first runs showed: that persisted with mean plans; ``SPACConfig.zero_mean`` says what was.)
        Exploration noise is for SAC, which starts after ``sac_start``.
        """
        cfg = self.cfg
        env = self._training_env(batch)
        state = env.reset()
        logs: dict[str, list[float]] = {}
        done = False
        sac = iteration >= cfg.sac_start
        while not done:
            field, states, plans, fields, losses = env.field, [], [], [], []
            for _ in range(min(cfg.unroll, cfg.episode_steps - env.t)):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    mu, log_std, skips = self.policy.planner(state)
                    plan, _ = squash(mu.float(), log_std.float(), deterministic=not sac)
                    step = self.policy.actor(plan, skips).float()
                field = spatial.compose(field, env.clamp(step))
                loss, step_logs = self._step_loss(env, field, batch.true_field, batch.field_known)
                losses.append(loss + cfg.kl_weight * kl_to_standard_normal(mu, log_std))
                _append(logs, step_logs)
                states.append(state)
                plans.append(plan.detach())
                fields.append(field.detach())
                state = env.state_of(field)
            norm = self._step_optimizer("policy", torch.stack(losses).mean(), self.policy.parameters(), cfg.grad_clip)
            if norm is not None:
                _append(logs, {"grad_norm": norm})
            if sac:  # the window's transitions, scored by the environment, for the replay buffer
                for s, plan, f in zip(states, plans, fields):
                    out = env.advance(f)
                    _append(logs, {"reward": out.reward.mean().item()})
                    self.replay.add(s.detach(), plan, out.reward, out.state, out.done)
                    state, done = out.state, out.done
            else:  # no rewards needed (their 32-label warps cost a third of an update), nor replay memory
                env.jump(fields[-1], len(fields))
                state, done = env.state_of(field.detach()), env.t >= env.max_steps
            if sac and len(self.replay) >= cfg.replay_batch:
                _append(logs, self._sac_update())
        result = {k: float(np.mean(v)) for k, v in logs.items()}
        if sac:
            result["dice_final"] = env.dice.mean().item()
        elif "soft_dice" in logs:
            result["soft_dice_last"] = logs["soft_dice"][-1]  # the loss's Dice after the episode's last step
        return result

    def _sac_update(self) -> dict[str, float]:
        cfg = self.cfg
        s, z, r, s2, d = self.replay.sample(cfg.replay_batch, self.rng, self.device)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            mu2, ls2, _ = self.policy.planner(s2)
            z2, log_pi2 = squash(mu2, ls2)
            q_next = torch.min(self.critic1_target(s2, z2), self.critic2_target(s2, z2)).squeeze(1)
            target = r + cfg.gamma * (1 - d) * (q_next - alpha * log_pi2)
        q1, q2 = self.critic1(s, z).squeeze(1), self.critic2(s, z).squeeze(1)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        critic_params = [*self.critic1.parameters(), *self.critic2.parameters()]
        self._step_optimizer("critics", critic_loss, critic_params)

        mu, log_std, _ = self.policy.planner(s)
        z_new, log_pi = squash(mu, log_std)
        q_new = torch.min(self.critic1(s, z_new), self.critic2(s, z_new)).squeeze(1)
        planner_loss = (alpha * log_pi - q_new).mean()
        self._step_optimizer("planner", planner_loss, self.policy.planner.parameters())
        for p in critic_params:  # the planner loss reached the critics: drop those gradients
            p.grad = None

        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        self._step_optimizer("alpha", alpha_loss, [self.log_alpha])
        with torch.no_grad():
            for target_net, net in ((self.critic1_target, self.critic1), (self.critic2_target, self.critic2)):
                for tp, p in zip(target_net.parameters(), net.parameters()):
                    tp.lerp_(p, cfg.tau)
        return {"critic_loss": critic_loss.item(), "planner_loss": planner_loss.item(),
                "alpha": self.log_alpha.exp().item(), "q": q1.mean().item()}


def _with_field_input(state: dict[str, torch.Tensor], policy: SPACPolicy) -> dict[str, torch.Tensor]:
    """A policy's weights without ``field_input``, widened for it: the planner's first conv gets zero
    weights for the field channels (appended last by ``planner_input``), so the warm-started policy
    computes exactly what the model did until training gives the field a say."""
    ours = policy.state_dict()
    out = dict(state)
    for name, tensor in state.items():
        wanted = ours.get(name)
        if (name.startswith("planner.") and wanted is not None and tensor.ndim > 2 and wanted.shape[1] > tensor.shape[1]
                and wanted.shape[0] == tensor.shape[0] and wanted.shape[2:] == tensor.shape[2:]):
            pad = tensor.new_zeros(tensor.shape[0], wanted.shape[1] - tensor.shape[1], *tensor.shape[2:])
            out[name] = torch.cat([tensor, pad], dim=1)
    return out


def _append(logs: dict[str, list[float]], values: dict[str, float]) -> None:
    for k, v in values.items():
        logs.setdefault(k, []).append(v)
