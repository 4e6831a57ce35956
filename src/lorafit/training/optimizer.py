"""The optimizer of a training run, and LoRA+ for the optimizers of Python users.

LoRA+ (Hayou et al., 2024, arXiv:2402.12354) trains B with a learning rate ``loraplus_lr_ratio`` times
A's: B starts at zero and, with one learning rate for both, learns too slowly in wide models. The
parameters are grouped as PEFT's ``peft.optimizers.create_loraplus_optimizer`` groups them, so a run
moves between the two unchanged: A and other matrices at ``lr``; embedding LoRA factors at
``loraplus_lr_embedding`` (default 1e-6); B, and every other 1-D tensor (biases, DoRA's magnitude), at
``lr * loraplus_lr_ratio``, biases and LayerNorm weights without weight decay.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

from lorafit.layers import LoraEmbedding
from lorafit.training.settings import TrainConfig

LORAPLUS_LR_EMBEDDING = 1e-6
"""PEFT's default learning rate for the LoRA factors of embeddings under LoRA+."""


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on trainable parameters; biases and norm weights get no decay, as transformers' Trainer does.
    With ``--loraplus-lr-ratio``, LoRA+'s groups instead."""
    if config.loraplus_lr_ratio is not None:
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=config.lr,
                                         loraplus_lr_ratio=config.loraplus_lr_ratio,
                                         loraplus_weight_decay=config.weight_decay,
                                         loraplus_lr_embedding=config.loraplus_lr_embedding)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(".bias") or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs) -> torch.optim.Optimizer:
    """``optimizer_cls`` over the trainable parameters of ``model`` in LoRA+'s groups (PEFT's signature).

    ``kwargs`` go to the optimizer, except ``loraplus_weight_decay`` (default 0.0) and
    ``loraplus_lr_embedding`` (default 1e-6), which set those of the groups.
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    embedding_lr = kwargs.pop("loraplus_lr_embedding", LORAPLUS_LR_EMBEDDING)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, weight_decay, embedding_lr)
    return optimizer_cls(groups, **{**kwargs, "lr": lr})


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, weight_decay: float = 0.0,
                          embedding_lr: float = LORAPLUS_LR_EMBEDDING) -> list[dict]:
    """The four groups in PEFT's order: A (and other matrices), embedding factors, B, B without decay."""
    from transformers.trainer_pt_utils import get_parameter_names  # the Trainer's rule; a heavy import

    decay = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    embedding = {id(p) for layer in model.modules() if isinstance(layer, LoraEmbedding)
                 for p in (*layer.lora_embedding_A.values(), *layer.lora_embedding_B.values(),
                           *layer.base_layer.parameters())}
    a, embed, b, b_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            embed.append(param)
        elif "lora_B" in name or param.ndim == 1:
            (b if name in decay else b_no_decay).append(param)
        else:
            a.append(param)
    return [{"params": a, "weight_decay": weight_decay, "lr": lr},
            {"params": embed, "weight_decay": weight_decay, "lr": embedding_lr},
            {"params": b, "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio}]
