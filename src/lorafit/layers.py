"""LoRA layers: a frozen base layer plus one low-rank update per adapter.

For an input x the output is ``h = W0 x + (alpha / r) * B A dropout(x)``: W0 is the frozen base
weight, A (r x in) and B (out x r) are the trainable low-rank factors (Hu et al., 2021,
arXiv:2106.09685). B starts at zero, so a fresh adapter leaves the model unchanged. Merging adds
``(alpha / r) * B A`` into W0 so inference pays nothing extra; it happens only when asked.

Parameter names (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``, ``base_layer``) follow
PEFT so state dicts map one-to-one onto PEFT's adapter files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit import fast
from lorafit.fast.lora_update import linear_update, weight_side_forward
from lorafit.errors import LorafitError
from lorafit.config import lora_scaling
from lorafit.variants import dora, residual_init

BASE_ADAPTER = "__base__"
"""In a mixed batch, the name for rows that use no adapter at all."""
ADAPTER_PREFIX = "lora_"
"""How every per-adapter container of a LoRA layer is named (PEFT's rule): parameter names and file keys
with a ``.lora_`` part belong to an adapter, not to the base model."""


@dataclass
class BatchRouting:
    """Which adapter each row of the current batch uses; shared by all LoRA layers of one model."""

    adapter_names: list[str] | None = None
    _index_cache: dict = field(default_factory=dict)

    def row_slots(self, names: list[str], batch_size: int, device: torch.device) -> torch.Tensor:
        """Per row, its adapter's position in ``names`` (len(names) for the base model)."""
        key = (tuple(names), batch_size, device)
        if key not in self._index_cache:
            rows = self.adapter_names
            # a row whose adapter does not adapt this layer passes through it unchanged
            slot = {name: i for i, name in enumerate(names)}
            if batch_size != len(rows):
                rows = self._rows_for(rows, batch_size, slot, len(names))
            self._index_cache[key] = torch.tensor([slot.get(name, len(names)) for name in rows], device=device)
        return self._index_cache[key]

    @staticmethod
    def _rows_for(rows: list[str], batch_size: int, slot: dict[str, int], base: int) -> list[str]:
        """Row names for an input whose first dimension is not the batch's rows."""
        if batch_size % len(rows) == 0:
            # generate() with num_return_sequences or beams repeats each prompt's row in place
            return [name for name in rows for _ in range(batch_size // len(rows))]
        if batch_size == 1 and len({slot.get(name, base) for name in rows}) == 1:
            return rows[:1]  # an input every row shares, and every row treats this layer alike
        if batch_size != 1:
            raise LorafitError(f"adapter_names has {len(rows)} entries but a layer here got an input of {batch_size} "
                               "rows; give one name per row of the batch")
        raise LorafitError(
            f"adapter_names: a layer here runs on an input shared by all {len(rows)} rows (as DeBERTa's "
            "relative-position embeddings go through query_proj/key_proj with share_att_key, or pos_query_proj/"
            "pos_key_proj), so rows cannot use different adapters on it; run each adapter's rows as their own batch "
            "or leave those projections out of target_modules")

    def set(self, adapter_names: list[str] | None) -> None:
        self.adapter_names = adapter_names
        self._index_cache.clear()


class LoraLayer(nn.Module):
    """What every LoRA layer shares: adapters by name, which are active, merging, mixed batches.

    A layer keeps whatever it has per adapter in ModuleDicts/ParameterDicts keyed by the adapter's name
    (PEFT's layout), and ``adapter_shapes`` declares which of those tensors make up an adapter. Saving,
    loading, checking files, freezing, counting and deleting go by that declaration, so a LoRA variant
    with a further tensor (DoRA's magnitude vector) declares it there, creates it in ``add_adapter``, and
    needs nothing else. Adapters with ``use_dora`` hold their magnitude in ``lora_magnitude_vector`` and run
    their forward and merge through ``lorafit.variants.dora``.
    """

    fan_in_fan_out = False
    """True when the base weight is stored (in, out), as transformers' Conv1D stores it."""

    fast_variant = None
    """``fast_variant(layer, x, result)``: a faster ``add_update``/``add_mixed_update`` (see lorafit.fast)."""

    def __init__(self, base_layer: nn.Module, routing: BatchRouting) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._stack_cache: tuple | None = None  # mixed-batch factors, see fast.lora_update.stacked_factors
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, for the adapters that use it
        self.merged_norms: dict[str, torch.Tensor] = {}  # DoRA's n of each merge, which its unmerge divides by
        # the fast update this layer's forward calls instead of the plain one; None: the plain one
        self.fast_update = self.fast_variant if fast.allowed() else None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: some transformers models read it off the layers they call (T5's
        feed-forward casts its input to ``wo.weight.dtype``), so a wrapped layer must still have one."""
        return self.base_layer.weight

    def weight_dtype(self) -> torch.dtype:
        """Adapters of a half-precision base stay in fp32; training low-rank factors in fp16 is unstable."""
        dtype = self.base_layer.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int, fan_in_fan_out: bool = False,
                       use_dora: bool = False) -> dict[str, tuple[int, ...]]:
        """The tensors an adapter of rank ``r`` around ``base_layer`` has, with their shapes, by file key.

        A key ``<container>.<attribute>`` (or ``<container>``) is the tensor ``<container>[adapter].<attribute>``;
        its parameter name puts the adapter's name after the container (``lora_A.default.weight``), and its key
        in adapter files leaves it out, as in PEFT. Container names start with ``ADAPTER_PREFIX``.
        """
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s live tensors under the keys of ``adapter_shapes``."""
        tensors = {}
        for key in self.adapter_shapes(self.base_layer, self.r[name], self.fan_in_fan_out,
                                       use_dora=name in self.lora_magnitude_vector):
            container, *attributes = key.split(".")
            tensor = getattr(self, container)[name]
            for attribute in attributes:
                tensor = getattr(tensor, attribute)
            tensors[key] = tensor
        return tensors

    def register_scaling(self, name: str, r: int, alpha: float, use_rslora: bool) -> None:
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = lora_scaling(alpha, r, use_rslora)

    def delete_adapter(self, name: str) -> None:
        still_merged = [n for n in self.merged_adapters if n != name]
        if name in self.merged_adapters:
            self.unmerge()
        for table in (self.r, self.lora_alpha, self.scaling, self.merged_norms):
            table.pop(name, None)
        for container in self.children():  # every per-adapter dict, declared tensors and the rest (dropout)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and name in container:
                del container[name]  # their pop takes no default
        self._stack_cache = None
        if self.active_adapter == name:
            self.active_adapter = None
        if len(still_merged) != len(self.merged_adapters):  # put the other merged adapters back
            self.merge(still_merged)

    # --- merging -------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``(alpha / r) * B A`` laid out like the base weight."""
        raise NotImplementedError

    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add each adapter's update into the base weight; adapters already merged are skipped.

        ``safe_merge`` runs ``check_merge`` first, so an update with NaN or inf leaves the layer as it was.
        """
        weight = self.base_layer.weight
        names = self._unmerged(names if names is not None else [self.active_adapter])
        if safe_merge:
            self.check_merge(names)
        base = self.unmerged_weight() if any(n in self.lora_magnitude_vector for n in names) else None
        for name in names:
            self.merge_into(weight.data, name, base)
            self.merged_adapters.append(name)

    def merge_into(self, weight: torch.Tensor, name: str, base: torch.Tensor | None) -> None:
        """Fold adapter ``name`` into ``weight`` in place; DoRA takes its norm from ``base``, the weight with no
        adapter merged."""
        if name in self.lora_magnitude_vector:
            dora.merge(self, name, weight, base)
        else:
            weight += self.delta_weight(name).to(weight.dtype)

    def unmerge_from(self, weight: torch.Tensor, name: str) -> None:
        """Undo ``merge_into`` in place."""
        if name in self.lora_magnitude_vector:
            dora.unmerge(self, name, weight)
        else:
            weight -= self.delta_weight(name).to(weight.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        """A copy of the base weight (de-quantized where it is packed) with every merged adapter taken out."""
        weight = self.base_weight().clone()
        for name in reversed(self.merged_adapters):
            self.unmerge_from(weight, name)
        return weight

    def check_merge(self, names: list[str]) -> None:
        """The safe-merge check: raise, changing nothing, if merging ``names`` would put NaN or inf into the
        base weight."""
        merged = self.base_weight().clone()
        base = self.unmerged_weight() if any(n in self.lora_magnitude_vector for n in names) else None
        for name in self._unmerged(names):
            self.merge_into(merged, name, base)
        if not torch.isfinite(merged).all():
            raise LorafitError(f"merging {', '.join(map(repr, names))} would put NaN or inf into the base weights "
                               f"(of a {self.base_name}); the model is unchanged: the adapter's weights are not "
                               "finite or too large (did training diverge?)")

    def base_weight(self) -> torch.Tensor:
        """The base weight as merging adds to it (a quantized layer's, de-quantized)."""
        return self.base_layer.weight.data

    def _unmerged(self, names: list[str | None]) -> list[str]:
        """Those of ``names`` this layer has and has not merged yet, each once."""
        return [n for n in dict.fromkeys(names) if n is not None and n in self.r and n not in self.merged_adapters]

    def unmerge(self) -> None:
        """Subtract merged updates again, newest first."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            self.unmerge_from(weight.data, self.merged_adapters.pop())

    @property
    def base_name(self) -> str:
        return type(self.base_layer).__name__

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            if self.merged and (self.disabled or self.routing.adapter_names is not None):
                raise RuntimeError("adapters are merged into the weights; call unmerge_adapter() first")
            return result
        mixed = self.routing.adapter_names is not None
        if not mixed and (self.active_adapter is None or self.active_adapter not in self.r):
            return result
        if self.fast_update is not None:
            return self.fast_update(self, x, result)
        if mixed:
            return self.add_mixed_update(x, result)
        return self.add_update(x, result, self.active_adapter)

    def add_update(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result + (alpha / r) * B A dropout(x)`` for adapter ``name``."""
        raise NotImplementedError

    def add_mixed_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The same, with each row of the batch on its own adapter (``routing.adapter_names``)."""
        raise NotImplementedError


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2 stores the weight as (in, out))."""

    fast_variant = staticmethod(linear_update)

    def __init__(self, base_layer: nn.Module, routing: BatchRouting, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, routing)
        self.fan_in_fan_out = stored_transposed(base_layer, fan_in_fan_out)
        self.in_features, self.out_features = linear_features(base_layer, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int, fan_in_fan_out: bool = False,
                       use_dora: bool = False) -> dict[str, tuple[int, ...]]:
        in_features, out_features = linear_features(base_layer, fan_in_fan_out)
        shapes = {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}
        return {**shapes, dora.MAGNITUDE: (out_features,)} if use_dora else shapes

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool,
                    use_dora: bool = False) -> None:
        self._stack_cache = None
        kwargs = {"bias": False, "device": self.base_layer.weight.device, "dtype": self.weight_dtype()}
        self.lora_A[name] = nn.Linear(self.in_features, r, **kwargs)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kwargs)
        self.lora_dropout[name] = fast.lora_dropout(dropout, self.fast_update is not None)
        self.register_scaling(name, r, alpha, use_rslora)
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
        if residual_init.changes_base(init):
            residual_init.initialise(self, name, init)
        elif init is not False:
            nn.init.zeros_(self.lora_B[name].weight)
        if use_dora:  # after the factors: m starts at ||W0 + s B A||
            self.lora_magnitude_vector[name] = dora.initial_magnitude(self, name, self.unmerged_weight())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.fast_update is not None and not args and not kwargs:
            result = weight_side_forward(self, x)  # None where adding the update to the base output is better
            if result is not None:
                return result
        return super().forward(x, *args, **kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def lora_update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The reference update ``(dropout(x) @ A.T @ B.T) * scaling``, in the adapter's dtype."""
        weight_A, weight_B = self.lora_A[name].weight, self.lora_B[name].weight
        return (self.lora_dropout[name](x.to(weight_A.dtype)) @ weight_A.T @ weight_B.T) * self.scaling[name]

    def add_update(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return result + dora.linear_update(self, x, result, name).to(result.dtype)
        return result + self.lora_update(x, name).to(result.dtype)

    def add_mixed_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each adapter's update for its own rows; the base rows get none. No dropout: mixed batches
        are for inference, and the fast variant draws none either."""
        names = list(self.r)
        slots = self.routing.row_slots(names, x.shape[0], x.device)
        update = torch.zeros_like(result, dtype=self.weight_dtype())
        for i, name in enumerate(names):
            rows = (slots == i).nonzero().squeeze(1)
            if rows.numel() and name in self.lora_magnitude_vector:
                update[rows] = dora.linear_update(self, x[rows], result[rows], name, dropout=False)
            elif rows.numel():
                weight_A, weight_B = self.lora_A[name].weight, self.lora_B[name].weight
                update[rows] = (x[rows].to(weight_A.dtype) @ weight_A.T @ weight_B.T) * self.scaling[name]
        return result + update.to(result.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: a row lookup in A^T (num_embeddings x r), then B.

    As in the original loralib, A starts at zero and B random, so the update again starts at zero.
    """

    def __init__(self, base_layer: nn.Embedding, routing: BatchRouting, fan_in_fan_out: bool = False) -> None:
        # fan_in_fan_out means nothing for an embedding (PEFT ignores it too); taken so every kind is built alike
        super().__init__(base_layer, routing)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int, fan_in_fan_out: bool = False,
                       use_dora: bool = False) -> dict[str, tuple[int, ...]]:
        num_embeddings, dim = base_layer.weight.shape
        shapes = {"lora_embedding_A": (r, num_embeddings), "lora_embedding_B": (dim, r)}
        return {**shapes, dora.MAGNITUDE: (dim,)} if use_dora else shapes

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool,
                    use_dora: bool = False) -> None:
        num_embeddings, dim = self.base_layer.weight.shape
        kwargs = {"device": self.base_layer.weight.device, "dtype": self.weight_dtype()}
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num_embeddings, **kwargs))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **kwargs))
        self.lora_dropout[name] = fast.lora_dropout(dropout, self.fast_update is not None)
        self.register_scaling(name, r, alpha, use_rslora)
        if init is not False:
            nn.init.zeros_(self.lora_embedding_A[name])
            # PEFT redraws B here; drawing it too keeps the generator in step with PEFT for a given seed
            # (add_weighted_adapter's DARE masks, drawn after the new adapter is created, rely on it)
            nn.init.normal_(self.lora_embedding_B[name])
        if use_dora:  # after the factors: m starts at ||W0 + s B A||
            self.lora_magnitude_vector[name] = dora.initial_magnitude(self, name, self.unmerged_weight())

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def embedding_update(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        rows = self._lookup(ids, self.lora_embedding_A[name].T)  # (..., r)
        return (rows * (self.scaling[name] * self.embed_scale())) @ self.lora_embedding_B[name].T

    def embed_scale(self) -> float | torch.Tensor:
        """The factor a scaled embedding (Gemma's ``embed_scale``) multiplies its lookup by; the update gets it
        too, so an unmerged adapter equals the merged one (and PEFT, which scales it the same way)."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale.to(self.weight_dtype())
        return float(scale) if isinstance(scale, (int, float)) else 1.0

    def add_update(self, ids: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.embedding_output(self, ids, result, name).to(result.dtype)
        return result + self.embedding_update(ids, name).to(result.dtype)

    def add_mixed_update(self, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        names = list(self.r)
        slots = self.routing.row_slots(names, ids.shape[0], ids.device)
        output = result.to(self.weight_dtype(), copy=True)
        for i, name in enumerate(names):
            rows = (slots == i).nonzero().squeeze(1)
            if rows.numel():
                output[rows] = self.add_update(ids[rows], output[rows], name)
        return output.to(result.dtype)


def stored_transposed(layer: nn.Module, fan_in_fan_out: bool) -> bool:
    """True when the weight is (in, out): always for Conv1D, never for nn.Linear (as in PEFT, whose
    GPT-2 configs carry fan_in_fan_out=True even when they also target a Linear such as lm_head)."""
    if isinstance(layer, Conv1D):
        return True
    return fan_in_fan_out and not isinstance(layer, nn.Linear)


def linear_features(layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, or of a Conv1D whose weight is stored transposed."""
    out_features, in_features = layer.weight.shape
    if stored_transposed(layer, fan_in_fan_out):
        return out_features, in_features
    return in_features, out_features


LAYER_KINDS: dict[type[nn.Module], type[LoraLayer]] = {nn.Linear: LoraLinear, Conv1D: LoraLinear,
                                                       nn.Embedding: LoraEmbedding}
"""The LoRA layer class that wraps each type of base module (subclasses included)."""


def layer_kind(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for a base module, or None when LoRA has no variant for its type."""
    from lorafit.quantized import QuantizedLoraLinear, is_quantized  # it imports this module

    if is_quantized(module):  # before nn.Linear, which bitsandbytes' layers subclass
        return QuantizedLoraLinear
    return next((kind for base, kind in LAYER_KINDS.items() if isinstance(module, base)), None)


def wrap_layer(module: nn.Module, routing: BatchRouting, fan_in_fan_out: bool) -> LoraLayer | None:
    """The LoRA layer for a base module, or None when LoRA has no variant for its type."""
    kind = layer_kind(module)
    return None if kind is None else kind(module, routing, fan_in_fan_out)
