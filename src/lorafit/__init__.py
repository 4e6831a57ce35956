"""lorafit: LoRA fine-tuning for Hugging Face transformers models.

The public API mirrors PEFT's names so code moves over: ``LoraConfig``, ``get_lora_model`` (PEFT's
``get_peft_model``) and ``LoraModel`` (with ``from_pretrained``, ``save_pretrained``, adapters by name).
"""

# first, before torch is imported: the OpenMP runtime torch loads reads its settings once (lorafit/cpu.py)
from lorafit.cpu import choose_thread_policy, started_as_command

if started_as_command():
    choose_thread_policy()

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.layers import BASE_ADAPTER, LoraEmbedding, LoraLayer, LoraLinear
from lorafit.model import LoraModel, get_lora_model
from lorafit.serialization import get_peft_model_state_dict, set_peft_model_state_dict
from lorafit.training.optimizer import create_loraplus_optimizer

__all__ = [
    "BASE_ADAPTER",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "LorafitError",
    "create_loraplus_optimizer",
    "get_lora_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]
__version__ = "0.1.0"
