"""Transformer Engine's linears under the plugin's attention (``model.linear=te``) and FP8 for them
(``model.fp8``): the configuration rules and the TransformerConfig FP8 fields. Pure Python: the
layer spec that imports TE is :mod:`.layer_spec`.

``model.linear`` chooses the linears of the plugin's layer (``model.attention_backend`` plugin or
auto). ``model.attention_backend=te`` is Megatron's whole TE layer, whose linears are TE's
already: there ``model.linear`` is not read, and ``model.fp8`` applies to those linears.

FP8 format: ``hybrid`` (E4M3 for weights and activations, E5M2 for the gradients), the format of
TE's and NeMo's training recipes: gradients span a wider range than activations, and E5M2 has
two more exponent bits (up to 57344 against E4M3's 448). Recipes (the two TE offers on Hopper):

- ``delayed``: per-tensor scales from the amax history of earlier steps (TE's ``DelayedScaling``
  defaults: 1024 steps, their maximum), the scaling NeMo's FP8 recipes train with;
- ``tensorwise``: per-tensor scales from the current tensor's amax (TE's ``Float8CurrentScaling``),
  one more reduction per GEMM input, no history to go stale.

Only the four linears of each layer run in FP8: Megatron's TransformerBlock enters TE's FP8
autocast around its layers, which changes TE modules only. The plugin's core attention (torch
and cuDNN-frontend calls), the embedding, the final norm and the output layer stay bf16.
"""

from __future__ import annotations

from megatron_prolong.te import thd

LINEAR_CHOICES = ("local", "te")
FP8_CHOICES = ("none", "delayed", "tensorwise")
# The floor of the `te` extra (setup.cfg), the releases Megatron-Core 0.19's TE extension and this
# plugin were run with; TE's current (tensorwise) scaling exists from 2.2 on.
MIN_TE_FOR_LINEARS = (2, 8)
# TE's FP8 GEMMs take matrices whose dimensions are multiples of 16 (its ``assert_dim_for_fp8_exec``).
FP8_DIM_MULTIPLE = 16
DELAYED_AMAX_HISTORY = 1024


def uses_te_linears(linear: str, attention_backend: str) -> bool:
    return attention_backend == "te" or linear == "te"


def fp8_options(fp8: str) -> dict:
    """TransformerConfig fields for ``model.fp8`` (empty for ``none``)."""
    if fp8 == "none":
        return {}
    opts = dict(fp8="hybrid", fp8_recipe=fp8)
    if fp8 == "delayed":
        opts.update(fp8_amax_history_len=DELAYED_AMAX_HISTORY, fp8_amax_compute_algo="max")
    return opts


def validate_te_linears(linear: str, attention_backend: str) -> None:
    """``model.linear=te`` on the plugin path: refuse a missing or too old TE. Raises ValueError."""
    if linear != "te" or attention_backend == "te":  # the TE backend has its own check (thd.py)
        return
    version = thd.installed_te_version()
    fix = "install the `te` extra (pip install 'megatron-prolong[te]') or set model.linear=local"
    if version is None:
        raise ValueError(f"model.linear=te needs Transformer Engine, which is not installed; {fix}")
    need = MIN_TE_FOR_LINEARS
    if thd.release(version) < need:
        raise ValueError(f"model.linear=te needs Transformer Engine >= {need[0]}.{need[1]}, installed: {version}; "
                         f"upgrade it (pip install 'transformer-engine[pytorch]>={need[0]}.{need[1]}') or set "
                         "model.linear=local")


def validate_fp8(fp8: str, linear: str, attention_backend: str, precision: str, dims: dict[str, int]) -> None:
    """``model.fp8``: TE linears, bf16 and FP8-sized matrices. ``dims``: config key -> the size one
    rank's GEMMs see. Raises ValueError."""
    if fp8 == "none":
        return
    if not uses_te_linears(linear, attention_backend):
        raise ValueError(f"model.fp8={fp8} runs Transformer Engine's linears in FP8, and model.linear=local has "
                         "none; set model.linear=te (or model.fp8=none)")
    if precision != "bf16":
        raise ValueError(f"model.fp8={fp8} trains the linears in FP8 around bf16 weights and activations; "
                         f"train.precision={precision} is not bf16: set train.precision=bf16 (or model.fp8=none)")
    bad = [f"{key}={n}" for key, n in dims.items() if n % FP8_DIM_MULTIPLE]
    if bad:
        raise ValueError(f"model.fp8={fp8}: Transformer Engine's FP8 GEMMs need every matrix dimension divisible by "
                         f"{FP8_DIM_MULTIPLE}, and {', '.join(bad)} is not; choose sizes that are, or model.fp8=none")
