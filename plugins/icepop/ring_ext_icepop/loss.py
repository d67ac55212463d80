"""verl adapter: the mismatch policy losses (one per variant: `icepop`, `seq_geo`, ...) and the rollout log-probs
they need.

verl's actor loss (`verl.workers.utils.losses.ppo_loss`) selects old log-probs, advantages and masks
from the micro-batch and drops `rollout_log_probs` before calling the registered policy loss. For
the mismatch losses `with_rollout_log_probs` wraps that call site: it pads the rollout log-probs
(and the entropy, when verl computed it) of the same micro-batch and hands them to the loss through
a context variable. A run whose batch has no rollout log-probs stops with an error; it never falls
back to the vanilla loss.

Each loss is verl's own PPO-clip (`compute_policy_loss_vanilla`, dual clip included) with the
per-token weights of `weights.mismatch_weights` as its `rollout_is_weights`: masked tokens contribute
0 but stay in the `loss_agg_mode` denominator, so the loss scale does not jump when the mask does.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any, Callable

import torch

from ring_ext.batch_fields import ROLLOUT_POLICY_LAG
from ring_ext_icepop.metrics import metrics_and_host, metrics_by_lag
from ring_ext_icepop.variants import VARIANTS
from ring_ext_icepop.weights import mismatch_weights

METRIC_PREFIX = "mismatch/"
_ROLLOUT = ContextVar[dict[str, torch.Tensor] | None]("ring_ext_icepop_rollout", default=None)


class RolloutLogProbsMissing(RuntimeError):
    pass


def with_rollout_log_probs(ppo_loss: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps verl's `verl.workers.utils.losses.ppo_loss` (the plugin's patch)."""
    from verl.workers.utils.losses import no_padding_2_padding

    @functools.wraps(ppo_loss)
    def wrapped(config: Any, model_output: Any, data: Any, dp_group: Any = None) -> Any:
        mode = config.policy_loss.get("loss_mode", "vanilla")
        if mode not in VARIANTS:
            return ppo_loss(config, model_output, data, dp_group)
        if "rollout_log_probs" not in data.keys():
            raise RolloutLogProbsMissing(
                f"policy loss '{mode}' needs the rollout engine's per-token log-probs, but the batch has no "
                "'rollout_log_probs': keep actor_rollout_ref.rollout.calculate_log_probs=True."
            )
        extra = {"infer_logp": data.select("rollout_log_probs").to_padded_tensor()["rollout_log_probs"]}
        if ROLLOUT_POLICY_LAG in data.keys():  # C3PO++ batches: per-token version lag (diagnostics, bands by lag)
            extra["lag"] = data.select(ROLLOUT_POLICY_LAG).to_padded_tensor()[ROLLOUT_POLICY_LAG]
        if model_output.get("entropy", None) is not None:
            extra["entropy"] = no_padding_2_padding(model_output["entropy"], data)
        token = _ROLLOUT.set(extra)
        try:
            loss, metrics = ppo_loss(config, model_output, data, dp_group)
        finally:
            _ROLLOUT.reset(token)
        return loss, _exact_extrema(metrics)

    return wrapped


def _exact_extrema(metrics: dict[str, Any]) -> dict[str, Any]:
    """verl averages policy-loss metrics over micro-batches; min/max must aggregate as min/max."""
    from verl.utils.metric.utils import AggregationType, Metric

    for key, metric in metrics.items():
        if key.startswith(METRIC_PREFIX) and isinstance(metric, Metric) and key.endswith(("_min", "_max")):
            exact = Metric(AggregationType.MIN if key.endswith("_min") else AggregationType.MAX)
            exact.extend(metric.values)
            metrics[key] = exact
    return metrics


def mismatch_policy_loss(
    kind: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    from ring_ext_icepop.config import variant_from_config

    rollout = _ROLLOUT.get()
    if rollout is None:
        raise RolloutLogProbsMissing(
            f"policy loss '{kind}' was called without rollout log-probs: call it through verl's ppo_loss "
            "with ring-ext-icepop installed (it patches the call site), or use rollout_logprobs_context()."
        )
    infer_logp = rollout["infer_logp"].to(old_log_prob.device)
    if infer_logp.shape != old_log_prob.shape:
        raise ValueError(f"rollout log-probs {tuple(infer_logp.shape)} != old log-probs {tuple(old_log_prob.shape)}")
    mask = response_mask.bool()
    variant = variant_from_config(kind, config.policy_loss)
    lag = rollout["lag"].to(mask.device) if "lag" in rollout else None
    weights = mismatch_weights(old_log_prob, infer_logp, mask, variant, lag=lag)
    # (old - old) + new - new: 0.0 where old and current log-probs are both finite (x - x == 0 exactly), nan
    # otherwise. Its sum rides along with the metrics' single device-to-host transfer, so the all-finite batch (the
    # usual one) costs no extra sync and none of the masking below.
    old, new = old_log_prob.detach(), log_prob.detach()
    non_finite = torch.sub(old, old).add_(new).sub_(new).sum()
    metrics, host = metrics_and_host(
        weights, mask, entropy=rollout.get("entropy"), train_logp=old_log_prob, prefix=METRIC_PREFIX,
        extra={"non_finite": non_finite},
    )
    if lag is not None:
        band = variant.band if getattr(variant, "lag_bands", None) is not None else None  # type: ignore[attr-defined]
        metrics |= metrics_by_lag(weights, mask, lag, METRIC_PREFIX, band=band)
    is_weights = weights.weight.to(log_prob.dtype)
    if host["extra:non_finite"] != 0:  # nan: some log-prob is nan or +-inf
        # A rejected token may carry a non-finite log-prob: zero it before verl's ratio so 0 * inf cannot
        # become NaN; torch.where also stops its gradient.
        finite = torch.isfinite(old_log_prob) & torch.isfinite(log_prob)
        old_log_prob = torch.where(finite, old_log_prob, torch.zeros_like(old_log_prob))
        log_prob = torch.where(finite, log_prob, torch.zeros_like(log_prob))
        is_weights = is_weights * finite  # a -inf current log-prob cannot be trained on
    if host["n"] == 0:  # == not mask.any(), without another sync
        # verl's local token-mean would divide 0 by 0; an empty micro-batch contributes a zero loss
        # that is still connected to the graph, so every rank runs the same backward.
        empty = {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": 0.0, "actor/pg_clipfrac_lower": 0.0}
        return log_prob.sum() * 0.0, empty | metrics
    if rollout_is_weights is not None:
        is_weights = is_weights * rollout_is_weights
    pg_loss, pg_metrics = compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=is_weights,
    )
    return pg_loss, pg_metrics | metrics


def rollout_logprobs_context(infer_logp: torch.Tensor, entropy: torch.Tensor | None = None,
                             lag: torch.Tensor | None = None) -> Any:
    """Context manager giving the losses their rollout log-probs outside verl's call site (tests, benchmarks)."""
    import contextlib

    given = {"infer_logp": infer_logp, "entropy": entropy, "lag": lag}

    @contextlib.contextmanager
    def scope() -> Any:
        token = _ROLLOUT.set({k: v for k, v in given.items() if v is not None})
        try:
            yield
        finally:
            _ROLLOUT.reset(token)

    return scope()


def _registered_loss(kind: str) -> Callable[..., Any]:
    def loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return mismatch_policy_loss(
            kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
        )

    loss.__name__ = loss.__qualname__ = f"{kind}_policy_loss"
    return loss


LOSSES: dict[str, Callable[..., Any]] = {kind: _registered_loss(kind) for kind in VARIANTS}
