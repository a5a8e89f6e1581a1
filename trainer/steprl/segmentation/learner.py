"""The segmentation learners for :func:`steprl.training.loop.fit`: PixelDRL-MG (PA3C) and the U-Net baseline.

Both draw the same slices (:mod:`steprl.segmentation.data`), one batch per ``train_iteration``
(one update), so "same data and budget" means the same ``--epochs``, ``--iterations`` and
``--batch``. Both validate the same way: the masks of the validation slices, pooled Dice
(``2 sum TP / (sum |P| + sum |G|)`` over all slices, stable with empty slices) as the score.

- :class:`PixelDRLLearner`: one ``train_iteration`` is one episode of ``t_max`` steps on a
  batch of slices (:func:`steprl.segmentation.pa3c.collect_episode`), terminal n-step returns
  through the learnable reward-map convolution, loss ``policy + 0.5 value - 0.01 entropy``,
  gradients averaged across ranks (torchrun), one Adam step over the network and ``w``.
- :class:`UNetLearner`: MONAI U-Net, Dice + BCE, one Adam step per batch.

Options that deviate from the paper (off by default, recorded in the config and model card):
``PA3CConfig.class_balance`` (per-pixel reward weights against the all-background phase on
small objects, :func:`steprl.segmentation.pa3c.class_weights`), ``SegTrainConfig.grad_clip``
(global gradient-norm clipping; the norm itself is always logged as ``grad_norm``) and
``SegTrainConfig.ema_decay`` (validation and the model file use an exponential moving average of
the weights, :meth:`_SliceLearner.judged_net`; training rolls out the latest weights).

Warm start (``--init-from``, :meth:`_SliceLearner.init_from`): a run may start from the
network weights of a model of the same method and layout; the model's training record comes
along into this run's card (:mod:`steprl.training.record`).

Learning rate (both, as in the paper): ``lr * lr_decay ** ((epoch - 1) // lr_decay_every)``,
i.e. 1e-3 x 0.9 every 25 epochs. It is recomputed from the iteration number before every
update rather than kept in a scheduler, because the fit loop does not checkpoint schedulers:
a resumed run therefore continues with the right rate.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict

import numpy as np
import torch

from steprl.device import autocast
from steprl.errors import ModelFileError
from steprl.segmentation.config import PA3CConfig, PixelDRLConfig, SegTrainConfig
from steprl.segmentation.data import NORMALISATION_CARD, SliceBatch, SliceSource, pooled_dice
from steprl.segmentation.networks import PixelDRLNet, count_parameters, format_parameter_summary
from steprl.segmentation.pa3c import (
    RewardMapConv,
    balance_strength,
    collect_episode,
    episode_loss,
    greedy_masks,
    make_optimizer,
)
from steprl.training.distributed import DistInfo, average_gradients
from steprl.training.record import carried_runs, check_same_layout, counting_seconds, cpu_hours

log = logging.getLogger(__name__)


def learning_rate(cfg: SegTrainConfig, iteration: int) -> float:
    """The paper's step decay as a function of the global iteration (0-based)."""
    epoch_index = iteration // max(1, cfg.iterations_per_epoch)  # epoch - 1
    return cfg.lr * cfg.lr_decay ** (epoch_index // max(1, cfg.lr_decay_every))


class _SliceLearner:
    """What both learners share: RNG, device, learning rate, pooled-Dice validation, warm starts,
    the card (with the CPU-hours and the earlier runs of a warm start)."""

    method = ""
    #: What to do when ``--init-from`` names a model of another network layout.
    layout_fix = "Give the same network options as the model (see `steprl info MODEL`)."
    net: torch.nn.Module

    def __init__(self, cfg: SegTrainConfig, source: SliceSource, dist: DistInfo) -> None:
        self.cfg, self.source, self.dist, self.device = cfg, source, dist, dist.device
        self.rng = np.random.default_rng(cfg.seed + 1000 * dist.rank)
        self.data_description: dict = dict(getattr(source, "description", {}))
        self.modules: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.earlier_runs: list[dict] = []  # the training record of the model this run started from
        self.seconds = 0.0  # wall time spent in training and validation, over resumes
        self.ema: torch.optim.swa_utils.AveragedModel | None = None

    def _start_weight_average(self) -> None:
        """With ``cfg.ema_decay`` > 0, keep an exponential moving average of ``self.net``'s weights
        (and buffers) as the module ``"ema"``, so checkpoints hold it and a resumed run goes on
        averaging. Called by each learner once its network and modules exist."""
        if self.cfg.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay), use_buffers=True)
            self.modules["ema"] = self.ema

    @property
    def judged_net(self) -> torch.nn.Module:
        """The network that validation scores and the model file holds: the weight average with
        ``--ema-decay``, else the trained network itself."""
        return self.ema.module if self.ema is not None else self.net

    def network_config(self) -> dict:
        """The network's layout as the card's ``config`` stores it (JSON values)."""
        raise NotImplementedError

    def _layout_of(self, config: dict) -> dict:
        """A card's ``config`` in the form :meth:`network_config` returns (defaults filled in)."""
        return dict(config)

    def init_from(self, model) -> None:
        """Start from the network weights of a model file or bundled model (``--init-from``).

        The model must be of this learner's method and network layout (its ``config``); the grid
        may differ (both networks are fully convolutional). PixelDRL-MG's reward-map kernel is
        not in a model file: it starts afresh. The model's training record is carried into this
        run's card. The global torch RNG is left as it was, so the run draws what it would have
        drawn without the warm start.

        Raises:
            ModelFileError: a missing or broken model, one of another task, method or layout.
        """
        from steprl.modelfile import check_state_dict
        from steprl.segmentation.model import load_segmenter

        with torch.random.fork_rng(devices=[]):  # building the model's network draws initial weights
            loaded = load_segmenter(model)
        if loaded.method != self.method:
            raise ModelFileError(f"--init-from {loaded.path.name} is a {loaded.method} model, but this run trains "
                                 f"{self.method}.", f"Give --method {loaded.method} to continue that model, or "
                                                    f"a {self.method} model.")
        check_same_layout(loaded.path, self._layout_of(loaded.card["config"]), self.network_config(), self.layout_fix)
        check_state_dict(self.net, loaded.net.state_dict(), loaded.path)
        if self.ema is not None:  # the average starts at the loaded weights
            self.ema.module.load_state_dict(self.net.state_dict())
        self.earlier_runs = carried_runs(loaded.card)
        if self.dist.is_main:
            log.info("initialised the network from %s (%d earlier runs)", loaded.path, len(self.earlier_runs))

    def train_iteration(self, iteration: int) -> dict[str, float]:
        with counting_seconds(self):
            return self._train_iteration(iteration)

    def validate(self) -> dict[str, float]:
        with counting_seconds(self):
            return self._validate()

    def _train_iteration(self, iteration: int) -> dict[str, float]:
        raise NotImplementedError

    def _validate(self) -> dict[str, float]:
        raise NotImplementedError

    def _set_lr(self, iteration: int) -> float:
        lr = learning_rate(self.cfg, iteration)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    def _update(self, loss: torch.Tensor) -> float:
        """One Adam step on ``loss``; returns the global gradient norm (before any clipping)."""
        optimizer = self.optimizers["adam"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        average_gradients(params)
        limit = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], limit)
        optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        return float(norm)

    def _autocast(self):
        return autocast(self.device, self.cfg.bf16)

    def _validation_chunks(self):
        batch = self.source.validation()
        for start in range(0, len(batch), self.cfg.val_batch):
            end = start + self.cfg.val_batch
            yield SliceBatch(batch.images[start:end], batch.masks[start:end]).to(self.device)

    def end_epoch(self, epoch: int) -> None:
        """Nothing to do: the learning rate is a function of the iteration (see the module docstring)."""

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "seconds": self.seconds, "earlier_runs": self.earlier_runs}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` (checkpoints written before the training record lack its keys)."""
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        self.seconds = float(state.get("seconds", 0.0))
        self.earlier_runs = list(state.get("earlier_runs", []))

    def _normalisation(self) -> dict:
        """The card's ``normalisation``; with ``--synth-match-levels`` also the ratio inference remaps to."""
        ratio = self.data_description.get("match_levels")
        if not ratio:
            return dict(NORMALISATION_CARD)
        return {**NORMALISATION_CARD, "tissue_levels": {
            "grey_to_white": float(ratio), "source": "the training data's own ratio (--synth-match-levels)"}}

    def _card(self, inference: dict, extra_training: dict) -> dict:
        return {
            "method": self.method,
            "ndim": 2,
            "config": self.network_config(),
            "inference": {"size": list(self.source.size), **inference},
            "normalisation": self._normalisation(),
            "labels": {"object": self.data_description.get("object", "labels > 0")},
            "parameters_trainable": count_parameters(self.net),
            "training": {**self.cfg.to_dict(), **extra_training, "data": self.data_description,
                         "world_size": self.dist.world_size, "command": " ".join(["steprl", *sys.argv[1:]]),
                         "cpu_hours": cpu_hours(self.seconds), "device": self.device.type,
                         **({"earlier_runs": self.earlier_runs} if self.earlier_runs else {})},
        }


class PixelDRLLearner(_SliceLearner):
    """PA3C on PixelDRL-MG (see the module docstring). Implements :class:`steprl.training.loop.Learner`."""

    method = "pixeldrl-mg"
    layout_fix = ("Give the model's network options (--widths, --head-widths, --head-depths, --norm, --attention, "
                  "--fusion, --fusion-width, --fusion-depth; see `steprl info MODEL`).")

    def __init__(self, net_cfg: PixelDRLConfig, pa3c: PA3CConfig, cfg: SegTrainConfig, source: SliceSource,
                 dist: DistInfo) -> None:
        super().__init__(cfg, source, dist)
        self.pa3c = pa3c
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.net = PixelDRLNet(net_cfg).to(self.device)
        self.reward_conv = RewardMapConv(pa3c.reward_conv_size).to(self.device)
        self.modules = {"net": self.net, "reward_conv": self.reward_conv}
        self.optimizers = {"adam": make_optimizer([self.net, self.reward_conv], cfg.lr)}
        self._start_weight_average()
        from steprl.segmentation.environment import SegmentationEnv

        self.env = SegmentationEnv(pa3c.t_max, pa3c.allow_revival)
        if dist.is_main:
            log.info("PixelDRL-MG (%s fusion): %s", self.net.cfg.fusion, format_parameter_summary(self.net))

    def _train_iteration(self, iteration: int) -> dict[str, float]:
        lr = self._set_lr(iteration)
        batch = self.source.sample(self.cfg.batch, self.rng).to(self.device)
        self.net.train()
        with self._autocast():
            episode = collect_episode(self.net, self.env, batch.images, batch.masks)
        balance = balance_strength(self.pa3c, iteration)
        losses = episode_loss(episode, self.reward_conv, self.pa3c, balance)
        grad_norm = self._update(losses["total"])
        out = {"loss": float(losses["total"].detach()), "grad_norm": grad_norm}
        out.update({k: float(v.detach()) for k, v in losses.items() if k != "total"})
        out["dice_train"] = pooled_dice(episode.final_mask, batch.masks)
        if self.pa3c.class_balance:
            out["balance"] = balance
        out["lr"] = lr
        return out

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Greedy rollouts on the validation slices; ``score`` = pooled Dice after the last step."""
        net = self.judged_net
        net.eval()
        per_step: list[list[torch.Tensor]] = []
        refs = []
        for batch in self._validation_chunks():
            with self._autocast():
                masks = greedy_masks(net, batch.images, self.pa3c.t_max, self.pa3c.allow_revival)
            per_step.append([m.float().cpu() for m in masks])
            refs.append(batch.masks.cpu())
        ref = torch.cat(refs)
        curve = [pooled_dice(torch.cat([chunk[t] for chunk in per_step]), ref) for t in range(self.pa3c.t_max)]
        net.train()
        return {"score": curve[-1], "dice_step1": curve[0], "dice_final": curve[-1], "dice_best_step": max(curve)}

    def export_model(self) -> tuple[dict[str, torch.Tensor], dict]:
        state = {k: v.detach().cpu() for k, v in self.judged_net.state_dict().items()}
        inference = {"steps": self.pa3c.t_max, "allow_revival": self.pa3c.allow_revival}
        centre = self.pa3c.reward_conv_size // 2
        extra = {"pa3c": asdict(self.pa3c),
                 "reward_conv_centre_weight": float(self.reward_conv.kernel[0, 0, centre, centre].detach().cpu())}
        return state, self._card(inference, extra)

    def network_config(self) -> dict:
        return self.net.cfg.to_dict()

    def _layout_of(self, config: dict) -> dict:
        return PixelDRLConfig.from_dict(config).to_dict()  # defaults filled in (head_widths, older cards)


class UNetLearner(_SliceLearner):
    """The MONAI U-Net baseline, Dice + BCE. Implements :class:`steprl.training.loop.Learner`."""

    method = "unet"
    layout_fix = "Give the model's --unet-channels (see `steprl info MODEL`)."

    def __init__(self, unet_cfg: dict, cfg: SegTrainConfig, source: SliceSource, dist: DistInfo) -> None:
        from steprl.segmentation.unet import build_unet, check_grid, dice_ce_loss

        super().__init__(cfg, source, dist)
        check_grid(unet_cfg, source.size)
        self.unet_cfg = dict(unet_cfg)
        torch.manual_seed(cfg.seed)
        self.net = build_unet(unet_cfg).to(self.device)
        self.loss = dice_ce_loss()
        self.modules = {"net": self.net}
        self.optimizers = {"adam": torch.optim.Adam(self.net.parameters(), lr=cfg.lr)}
        self._start_weight_average()
        if dist.is_main:
            log.info("U-Net baseline: %.2fM parameters", count_parameters(self.net) / 1e6)

    def _train_iteration(self, iteration: int) -> dict[str, float]:
        lr = self._set_lr(iteration)
        batch = self.source.sample(self.cfg.batch, self.rng).to(self.device)
        self.net.train()
        with self._autocast():
            logits = self.net(batch.images)
        loss = self.loss(logits.float(), batch.masks)
        self._update(loss)
        return {"loss": float(loss.detach()), "dice_train": pooled_dice((logits.detach() >= 0).float(), batch.masks),
                "lr": lr}

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """``score`` = pooled Dice of the thresholded predictions (probability >= 0.5)."""
        net = self.judged_net
        net.eval()
        preds, refs = [], []
        for batch in self._validation_chunks():
            with self._autocast():
                preds.append((net(batch.images).float() >= 0).float().cpu())
            refs.append(batch.masks.cpu())
        net.train()
        dice = pooled_dice(torch.cat(preds), torch.cat(refs))
        return {"score": dice, "dice_step1": dice, "dice_final": dice, "dice_best_step": dice}

    def export_model(self) -> tuple[dict[str, torch.Tensor], dict]:
        state = {k: v.detach().cpu() for k, v in self.judged_net.state_dict().items()}
        return state, self._card({"steps": 1}, {"loss": "Dice + BCE (MONAI DiceCELoss)"})

    def network_config(self) -> dict:
        return dict(self.unet_cfg)
