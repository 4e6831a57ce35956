"""LoRA variants: what a variant adds to the plain layers of ``lorafit.layers``, one module each.

A layer declares a variant's extra tensors in ``adapter_shapes`` (so saving, loading, counting and
deleting follow) and calls its module for the forward and the merge of the adapters that use it.
"""
