"""``fastmim.patch(model)``: fastmim's fused ops in a model you already have, in place.

The package: this module (the public API), :mod:`.core` (the report, patched classes, units
and their probes), :mod:`.forwards` (the forwards swapped in), :mod:`.plans` (what is patched
in each kind of model).

Three kinds of models are recognised:

- the official MAE (``models_mae.py`` of facebookresearch/mae), by its structure (attributes
  ``patch_embed, cls_token, pos_embed, blocks, norm, decoder_embed, mask_token,
  decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred, norm_pix_loss`` and methods
  ``random_masking, forward_encoder, forward_decoder, forward_loss``), without importing it;
- Hugging Face ``transformers``: ``ViTMAEForPreTraining``, ``ViTMAEModel``, ``ViTModel`` (and the
  ViT heads built on it: ``ViTForImageClassification``, ``ViTForMaskedImageModeling``);
- timm: ``VisionTransformer``, or one ``Block`` or ``Attention``.

What runs afterwards (each through :mod:`fastmim.ops`, which dispatches as everywhere else:
Triton on CUDA, the CPU kernels or the references on CPU):

- the encoder's masking: the official rule on the same noise (``noise = torch.rand(B, L)``
  drawn at the same point from the same generator, or the ``noise=`` given; ``argsort``, keep
  the first ``K``), then ``gather_visible`` (gather + position embedding + cls token in one op);
- the decoder's input: ``unshuffle`` (mask tokens, un-shuffle and position embedding in one op);
- the loss: ``masked_patch_mse`` (patchify, per-patch normalisation and the masked mean in one op);
- attention: the qkv projection's output goes packed to ``attention_qkvpacked`` (Hugging Face's
  separate ``q_proj / k_proj / v_proj`` run as one matmul on their concatenated weights);
- each pre-norm block: the LayerNorm + residual add + linear and bias-GELU + linear fused ops of
  :class:`fastmim.models.vit.FusedBlock` where the fused ops have kernels (elsewhere, CPU, the
  block takes its own steps), and in the official MAE and timm's ``blocks`` the residual stream
  passed between blocks as two terms (blocks with hooks are called as modules, one at a time).

Nothing else changes: parameters, buffers and ``state_dict`` keys stay as they were (a patched
module is the same object with a subclass of its class that overrides ``forward``), and the
model computes the same function for the same RNG state. A module the patch does not fit (an
activation other than exact GELU, qk-norm, a gated or custom attention, an attention mask, a
forward signature it does not know) is left as it was and named in the report; with
``verify=True`` (default) every patched forward is also compared with the original on a small
probe input (same RNG state, evaluation mode, no gradient; the model's RNG state is restored
afterwards) and left as it was if they differ. Models on the meta device cannot be probed.

Modules whose behaviour depends on the training mode fall back at run time as they do in
fastmim's own models: attention dropout (``attn_drop`` / ``attention_probs_dropout_prob``) or an
MLP dropout between GELU and ``fc2`` in training, an attention mask, ``output_attentions``:
those calls take the original forward.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from fastmim.models.patching import core as _core
from fastmim.models.patching.core import ATTENTION, BLOCK, CHAIN, LOSS, MASKING, UNSHUFFLE, PatchReport
from fastmim.models.patching.forwards import _OfficialMAEPatch
from fastmim.models.patching.plans import _plan
from fastmim.ops import ATTN_BACKENDS

__all__ = ["ATTENTION", "BLOCK", "CHAIN", "LOSS", "MASKING", "UNSHUFFLE", "PatchReport", "patch", "patch_report",
           "unpatch"]

logger = logging.getLogger("fastmim.patch")


# ============================================================================================
# Public API
# ============================================================================================


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / FSDP / ``torch.compile`` wrapper (patched in place, the wrapper kept)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel",
                                                       "FullyShardedDataParallel"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def patch(model: nn.Module, *, attn_backend: str | None = None, verify: bool = True,
          return_report: bool = False) -> nn.Module | tuple[nn.Module, PatchReport]:
    """Run fastmim's fused ops in ``model``, in place; returns ``model`` (with ``return_report=True``,
    ``(model, report)``).

    ``model``: the official MAE (recognised by its structure), a transformers ``ViTMAEForPreTraining``,
    ``ViTMAEModel`` or ``ViTModel`` (or a ViT head on it), a timm ``VisionTransformer``, ``Block`` or
    ``Attention``; a DDP / ``torch.compile`` wrapper is looked through. Any other type is a
    ``TypeError``. ``attn_backend``: the attention backend of the patched attentions (``None``:
    fastmim chooses per call, SDPA on CPU; or one of ``fastmim.ops.ATTN_BACKENDS``). ``verify``:
    compare every patched forward with the original on a probe input before keeping it (models on
    the meta device are not probed).

    Parameters, buffers and ``state_dict`` keys do not change, and the model computes the same
    function for the same RNG state. What could not be patched is left as it was; the report
    (:class:`PatchReport`, also :func:`patch_report`) lists both and one log line says it (a
    warning when something was left). Patching a patched model patches it again from its original
    forwards. :func:`unpatch` restores them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastmim.patch: expected a torch.nn.Module, got {type(model).__name__}")
    if attn_backend is not None and attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"fastmim.patch: attn_backend must be one of {ATTN_BACKENDS} or None, got {attn_backend!r}")
    target = _unwrap(model)
    plan = _plan(target, attn_backend)  # before unpatching: an unsupported type changes nothing
    if _is_patched(target):
        unpatch(target)
        plan = _plan(target, attn_backend)
    on_meta = _core._on_meta(target)
    probed: dict[Any, str | None] = {}
    patched, left = [], list(plan.left)
    verified = verify and not on_meta
    for unit in plan.units:
        why = unit.requires() if unit.requires is not None else None
        if why is not None:  # what it builds on was left (e.g. failed its probe); "" : nothing to report
            if why:
                left.append((unit.path, why))
            continue
        unit.apply()
        why = None
        if verified and unit.probe_args is not None:
            key = unit.probe_key if unit.probe_key is not None else id(unit)
            if key not in probed:
                try:
                    probed[key] = _core._probe(unit)
                except Exception as exc:  # noqa: BLE001 - a probe that cannot run keeps the original
                    probed[key] = f"probe failed: {type(exc).__name__}: {exc}"
            why = probed[key]
        if why is not None:
            unit.revert()
            left.append((unit.path, f"differs from the original forward on a probe input: {why}"))
        elif unit.what:
            patched.append((unit.path, unit.what))
    if isinstance(target, _OfficialMAEPatch) and not target._fastmim_methods:
        target.__class__ = _core._original_class(target)
    report = PatchReport(model=_core._original_class(target).__name__, kind=plan.kind, patched=tuple(patched),
                         left=tuple(left), verified=verified)
    target.__dict__["_fastmim_report"] = report
    (logger.warning if left else logger.info)("%s", report.summary())
    return (model, report) if return_report else model


def _is_patched(model: nn.Module) -> bool:
    return any(isinstance(m, _core._Patch) for m in model.modules()) or "_fastmim_report" in model.__dict__


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes (so the original forwards) of every module :func:`patch` changed,
    and drop what it added; returns ``model``. A model that is not patched is returned as it is."""
    target = _unwrap(model)
    for module in target.modules():
        if isinstance(module, _core._Patch):
            module.__class__ = _core._original_class(module)
        for name in [n for n in module.__dict__ if n.startswith(_core._STATE_PREFIX)]:
            del module.__dict__[name]
    return model


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of the last :func:`patch` of ``model`` (``None`` if it is not patched)."""
    return _unwrap(model).__dict__.get("_fastmim_report")
